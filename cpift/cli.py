"""The ``cpift`` command line: a whole config (``run``), single steps, and comparisons.

Every subcommand has ``--help``. Errors a user can cause (a bad config key, a missing file, an
out-of-range p or τ, a locked run directory) print one line ``cpift: error: …`` and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from ._version import __version__
from .errors import CpiftError, OutputExistsError, ParameterError


def _task_models(pairs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` arguments as a task → model mapping, in order."""
    models = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise ParameterError(f"--task expects NAME=PATH, got {pair!r}")
        if name in models:
            raise ParameterError(f"--task {name} is given twice ({models[name]} and {path}); task names must differ")
        models[name] = path
    if not models:
        raise ParameterError("give at least one --task NAME=PATH")
    return models


def _print_table(frame) -> None:
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.3f}".format):
        print(frame.to_string())


def _print_comparison(run_dirs: list) -> None:
    from .scores import compare, formatted

    _print_table(formatted(compare(run_dirs)))
    print("mean [95 % interval]; n = items per seed; ! = an interval wider than ±10 points: too few items to rank")


def cmd_run(args: argparse.Namespace) -> None:
    from .config import load_config
    from .pipeline import run_config

    seeds = [f"run.seeds=[{args.seeds}]", f"run.seed={args.seeds.split(',')[0]}"] if args.seeds else []
    run = run_config(load_config(args.config, [*args.set, *seeds]), args.out,
                     resume=args.resume or args.add_methods, add_methods=args.add_methods)
    if run.writes:  # the main process of a data-parallel run (cpift.processes) reports once
        print(f"run finished: {run.path}")
        _print_comparison([run.path])


def cmd_probe(args: argparse.Namespace) -> None:
    from .config import load_config
    from .models import save_weights
    from .pipeline import build_tasks, load_base, train_config
    from .train import train

    config = load_config(args.config, args.set)
    tasks = build_tasks(config)
    if args.task not in tasks:
        raise ParameterError(f"--task {args.task!r} is not among the config's tasks: {', '.join(tasks)}")
    model, tokenizer = load_base(config)
    settings = train_config(config).model_copy(update={"steps": config.probe.steps, "lr": config.probe.lr})
    train(model, tokenizer, list(tasks[args.task].train), settings, stage=f"probe/{args.task}")
    save_weights(model, args.out)
    print(f"probe of {args.task!r} saved to {args.out}")


def cmd_regions(args: argparse.Namespace) -> None:
    from .regions import core_regions

    regions = core_regions(args.base, _task_models(args.task), p=args.p, scope=args.scope,
                           include=args.include or None, exclude=args.exclude or None, allow_pickle=args.allow_pickle)
    regions.save(args.out, magnitudes=args.magnitudes, compress=args.compress)
    print(f"core regions at p = {args.p}% saved to {args.out}")
    _print_table(regions.jaccard())


def cmd_group(args: argparse.Namespace) -> None:
    from .grouping import group_tasks, groupings_by_tau, stage_order
    from .regions import CoreRegions

    similarity = CoreRegions.load(args.regions).jaccard()
    groups = group_tasks(similarity, args.tau)
    stages = stage_order(groups, args.order, similarity, seed=args.seed)
    result = {"tau": args.tau, "groups": groups, "stages": stages,
              "groupings_by_tau": [{"tau_min": g.tau_min, "tau_max": g.tau_max, "groups": [list(x) for x in g.groups]}
                                   for g in groupings_by_tau(similarity)]}
    print(json.dumps(result, indent=1))


def cmd_fuse(args: argparse.Namespace) -> None:
    from .fusion import fuse
    from .models import save_weights
    from .regions import CoreRegions

    state = fuse(args.base, _task_models(args.task), CoreRegions.load(args.regions), args.omega, args.overlap,
                 fold=args.fold, allow_pickle=args.allow_pickle)
    save_weights(state, args.out)
    state.report.to_csv(Path(args.out) / "report.csv", index=False)
    print(f"fused model saved to {args.out}; contested elements: {int(state.report['contested'].sum()):,}")


def cmd_train(args: argparse.Namespace) -> None:
    from .config import load_config
    from .pipeline import run_config

    config = load_config(args.config, [*args.set, f'run.methods=["{args.method}"]'])
    run = run_config(config, args.out, resume=args.resume)
    _print_comparison([run.path])


def cmd_eval(args: argparse.Namespace) -> None:
    from .config import load_config
    from .evaluate import evaluate_model
    from .models import load_weights
    from .pipeline import build_tasks, load_base, retention_suite
    from .scores import score_intervals

    config = load_config(args.config, args.set)
    tasks = build_tasks(config)
    model, tokenizer = load_base(config)
    label = "base"
    if args.model:
        load_weights(model, args.model)
        label = Path(args.model).name
    evaluation = evaluate_model(model, tokenizer, label, list(tasks.values()), **retention_suite(config),
                                max_new_tokens=config.eval.max_new_tokens, batch_size=config.eval.batch_size)
    _print_table(score_intervals(evaluation))


def cmd_compare(args: argparse.Namespace) -> None:
    import pandas as pd

    from .runs import RunDir
    from .scores import compare, paired_comparisons, read_items

    table = compare(args.runs)
    if args.vs:
        table = pd.concat([paired_comparisons(read_items(RunDir.open(run)), args.vs).assign(
            run=Path(run).name) for run in args.runs], ignore_index=True)
    if args.format == "json":
        print(table.to_json(orient="records", indent=1))
    elif args.format == "csv":
        print(table.to_csv(index=False), end="")
    elif args.vs:
        _print_table(table.assign(flag=table.excludes_zero.map({True: "*", False: ""})).drop(columns="excludes_zero"))
        print(f"difference = model − {args.vs} (normalised average on 0–10), 95 % paired interval; "
              "* = the interval excludes 0")
    else:
        _print_comparison(args.runs)


def cmd_findings(args: argparse.Namespace) -> None:
    from .findings import findings, findings_table, to_markdown

    found = findings(args.run)
    if args.figures:
        from .atomic import atomic_write_bytes
        from .findings import findings_figures
        from .report import figure_file

        out = Path(args.figures)
        out.mkdir(parents=True, exist_ok=True)
        for stem, fig in findings_figures(args.run).items():
            name, data, _ = figure_file(fig, stem)
            atomic_write_bytes(out / name, data)
            print(f"wrote {out / name}", file=sys.stderr)
    if args.format == "markdown":
        print(to_markdown(found), end="")
    else:
        table = findings_table(found)
        print(table.to_json(orient="records", indent=1) if args.format == "json" else table.to_csv(index=False), end="")


def cmd_pack(args: argparse.Namespace) -> None:
    from .pipeline import pack_run

    out = pack_run(args.run, args.out, max_p=args.max_p, seed_regions=not args.primary_regions_only)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{args.run} packed into {out} ({size / 2**20:.1f} MiB, without weights)")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(p=args.p, tau=args.tau, steps=args.steps)


def _cli_message(exc: CpiftError) -> str:
    """The error's message, with the command line's remedy where the library names a keyword."""
    from .checkpoint import PickleRefusedError
    from .pipeline import ConfigChangedError
    from .runs import RunExistsError

    if isinstance(exc, PickleRefusedError):
        remedy = "convert it to safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)"
    elif isinstance(exc, ConfigChangedError):
        remedy = "resume with the run's own config (no other file, no --set changes), or choose another --out" + (
            "; --add-methods adds the new methods to this run" if exc.methods_added else "")
    elif isinstance(exc, RunExistsError):
        remedy = "pass --resume to continue that run, or choose another --out"
    elif isinstance(exc, OutputExistsError):
        remedy = "choose another --out"
    else:
        return str(exc)
    return f"{exc.problem}; {remedy}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cpift`` command. It imports nothing heavy (the method registry
    pulls in torch), so ``--help`` answers at once; the config checks a method's name."""
    parser = argparse.ArgumentParser(prog="cpift", description="Parameter-isolation fine-tuning for LLMs.")
    parser.add_argument("--version", action="version", version=f"cpift {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    def config_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("config", help="TOML config (see configs/)")
        sub.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. --set cpift.tau=0.2 (repeatable)")

    def model_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--base", required=True, help="base model: the embedded 'smollm2-135m', a directory or hub id")
        sub.add_argument("--task", action="append", default=[], metavar="NAME=PATH",
                         help="a task's fine-tuned model (repeat for each task)")
        sub.add_argument("--allow-pickle", action="store_true", help="load .bin/.pt checkpoints (pickle) with "
                         "torch.load(weights_only=True); refused otherwise, as pickle can run code")

    sub = command("run", cmd_run, "run every method of a config into a run directory")
    config_args(sub)
    sub.add_argument("--out", required=True, help="run directory")
    sub.add_argument("--seeds", metavar="S,S,...", help="run every method once per seed, e.g. --seeds 0,1,2 "
                     "(the config's run.seeds)")
    sub.add_argument("--resume", action="store_true", help="continue a stopped run from its last checkpoint "
                     "(with the config it was created with)")
    sub.add_argument("--add-methods", action="store_true", help="resume a run with a config whose run.methods "
                     "adds methods to the run's; the manifest records the change")

    sub = command("probe", cmd_probe, "probe fine-tune the config's base on one task")
    config_args(sub)
    sub.add_argument("--task", required=True)
    sub.add_argument("--out", required=True, help="directory for the probe's weights")

    sub = command("regions", cmd_regions, "core regions of task models against a base")
    model_args(sub)
    sub.add_argument("--p", type=float, default=1.0, help="core size in percent of the parameters (default 1)")
    sub.add_argument("--scope", choices=("global", "tensor"), default="global")
    sub.add_argument("--include", action="append", default=[], metavar="PATTERN")
    sub.add_argument("--exclude", action="append", default=[], metavar="PATTERN")
    sub.add_argument("--magnitudes", nargs="?", type=float, const=True, default=False, metavar="Q",
                     help="also save |Δ| so a loaded copy can change p: every |Δ|, or with Q only the top Q%% "
                          "(float16; p ≤ Q)")
    sub.add_argument("--compress", action="store_true", help="deflate the saved masks (and top magnitudes)")
    sub.add_argument("--out", required=True)

    sub = command("group", cmd_group, "group the tasks of saved core regions at τ")
    sub.add_argument("regions", help="a directory written by `cpift regions`")
    sub.add_argument("--tau", type=float, default=0.1)
    sub.add_argument("--order", default="random", help="stage order: given, random, least_overlap_first")
    sub.add_argument("--seed", type=int, default=0)

    sub = command("fuse", cmd_fuse, "fuse task models: core transplant + SLERP")
    model_args(sub)
    sub.add_argument("--regions", required=True)
    sub.add_argument("--omega", type=float, default=0.5)
    sub.add_argument("--overlap", default="max_delta", help="max_delta, last or mean")
    sub.add_argument("--fold", default="mean", help="mean or sequential")
    sub.add_argument("--out", required=True)

    sub = command("train", cmd_train, "run one method of a config")
    config_args(sub)
    sub.add_argument("--method", required=True, metavar="METHOD",
                     help="a registered method, as named in a config's run.methods (an unknown name lists them)")
    sub.add_argument("--out", required=True)
    sub.add_argument("--resume", action="store_true")

    sub = command("eval", cmd_eval, "score a model on the config's tasks and retention suite")
    config_args(sub)
    sub.add_argument("--model", help="saved weights (directory or .safetensors); default: the config's base")

    sub = command("compare", cmd_compare, "methods × tasks table of one or more run directories, every "
                  "score with its 95 %% interval, with retention and forgetting (mean forget ratio, collapse rate)")
    sub.add_argument("runs", nargs="+")
    sub.add_argument("--vs", metavar="METHOD", help="each model's paired difference to METHOD's model (e.g. "
                     "multitask, base) per task and on the normalised average: interval and p-value")
    sub.add_argument("--format", choices=("table", "json", "csv"), default="table",
                     help="json or csv: the numbers, one record per row, for other tools")

    sub = command("findings", cmd_findings, "the study's findings from a run: each claim of the papers, the run's "
                  "measurement with its 95 %% interval and n, and a verdict (README's Findings table)")
    sub.add_argument("run")
    sub.add_argument("--format", choices=("markdown", "json", "csv"), default="markdown")
    sub.add_argument("--figures", metavar="DIR", help="also write the figures that matter most (τ sweep, "
                     "forgetting study, overlap beside chance) to DIR, as PNG where a browser can render them")

    sub = command("pack", cmd_pack, "copy a run directory without model weights and training checkpoints "
                  "(to share it, or ship it in sample_runs/)")
    sub.add_argument("run")
    sub.add_argument("--out", required=True)
    sub.add_argument("--max-p", type=float, metavar="Q", help="keep the |Δ| magnitudes only down to the top Q %% "
                     "(the app's p slider then reaches Q): smaller")
    sub.add_argument("--primary-regions-only", action="store_true", help="leave out the further seeds' core "
                     "regions, keeping their test–retest overlap with the primary seed's (reliability.json)")

    sub = command("demo", cmd_demo, "tour the core library on the embedded SmolLM2-135M model")
    sub.add_argument("--p", type=float, default=1.0, help="core-region size in percent (default 1)")
    sub.add_argument("--tau", type=float, default=0.1, help="Jaccard threshold for grouping (default 0.1)")
    sub.add_argument("--steps", type=int, default=3, help="AdamW steps per probe fine-tune (default 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cpift`` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except CpiftError as exc:
        print(f"cpift: error: {_cli_message(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's refusal (a full disk, a permission): one line, naming the file
        where = f": {exc.filename}" if exc.filename else ""
        print(f"cpift: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cpift: stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    # SIGTERM (cpift.launch.stop_run, the app's Stop button) stops like Ctrl-C: the run records "stopped".
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
