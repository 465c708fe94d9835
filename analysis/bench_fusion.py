"""Benchmark of cpift's fusion (stage 3) beside mergekit's SLERP, on the embedded SmolLM2-135M.

Run from the repository root::

    .venv/bin/python analysis/bench_fusion.py                     # 1 task model, 3 rounds
    .venv/bin/python analysis/bench_fusion.py --tasks 2 --repeat 5
    .venv/bin/python analysis/bench_fusion.py --compare /tmp/cpift-old --check   # beside another cpift

mergekit is not a dependency of cpift: install it apart, without touching the project's
environment, and point ``--mergekit`` at it (default ``/tmp/mergekit-lib``); without it the
mergekit row is left out. For example (PyPI only; cpift's environment already holds the rest)::

    .venv/bin/python -m pip install --no-deps --target /tmp/mergekit-lib mergekit immutables

Setup (in a temporary directory, removed at the end; nothing is written in the repository): the
base is the embedded SmolLM2-135M-Instruct (``cpift.models.embedded_model_dir()``: fp32
safetensors, 134.5M parameters, 0.54 GB); each task model is the base plus seeded noise
N(0, (``--noise`` · the tensor's std)²) on every floating tensor, saved as ``model.safetensors``
beside copies of the base's config and tokenizer files. The core regions are
``cpift.regions.core_regions(base, tasks, p=1)``, saved and loaded as the pipeline does
(``CoreRegions.save(..., magnitudes=1, compress=True)``, then ``CoreRegions.load``).

Rows (wall and CPU time = the timed work only, not the imports):

* ``read``: every tensor of the base and task checkpoints read once through
  ``cpift.checkpoint.open_checkpoint`` (each summed, so that its data is really read), the readers
  left open as a plain loop leaves them: the floor of any pass over the models.
* ``read/close``: the same, closing the readers after each tensor (which unmaps the files).
* ``fuse+save``: ``fuse(base, tasks, regions, 0.5, "max_delta")`` (default ``keep_tensors``: the
  fused state is returned), then ``cpift.models.save_weights`` of it: what ``cpift fuse`` does.
  (The pipeline keeps the same state and loads it into a model that it saves.)
* ``fuse(out=)``: ``fuse(..., out=DIR)``, which writes the fused model tensor by tensor (the same
  file), where ``fuse`` has that option.
* ``… [DIR]`` (with ``--compare DIR``): the two rows above with cpift imported from ``DIR``, e.g.
  a copy of the previous version, in the same rounds.
* ``slerp+save``: cpift's ``slerp`` of the base and the first task, per tensor (t = 0.5), no
  regions, collected in a state dict (the readers closed after each tensor) and saved with
  ``save_weights``: the SLERP alone.
* ``mergekit``: ``mergekit.merge.run_merge`` with ``merge_method: slerp``, the base and the first
  task, t = 0.5, dtype float32, on the CPU: ``MergeOptions(device="cpu", lazy_unpickle=True)``,
  the rest default (``low_cpu_memory`` off, which changes nothing on a CPU; ``out_shard_size``
  5B, one shard), in this interpreter with ``PYTHONPATH`` = ``--mergekit``.

Memory: every row runs in its own fresh Python process (``subprocess``, i.e. fork + exec; forking
without exec after torch has used OpenMP hangs), and its peak RSS is its own: the child's ``VmHWM``
(``/proc/self/status``) at its end. (``ru_maxrss`` would not do: Linux carries it over ``execve``
from the forked copy of this parent, which holds a model by then.) It includes the interpreter and
the imports (torch; transformers too for mergekit: the "RSS before the work" column), and the file
pages mapped by safetensors' mmap readers that are resident, which is how a model read lazily
shows up in RSS. GB = 10^9 bytes.

Each round runs every row once, in the order above; the table gives the median over the rounds of
the wall and CPU times, the largest peak RSS, and each row's speed-up over mergekit (mergekit's
wall time / the row's), both as the ratio of the medians and as the median of the per-round ratios:
one round's rows run back to back, so a load that comes and goes on a shared machine hits both
sides alike. The load average at the start and the end is printed: on a busy machine torch's
OpenMP threads wait for each other and wall times swing several-fold (CPU time less so).
``--check`` compares cpift's SLERP with mergekit's output tensor by tensor, and the fused weight
files of the fuse rows byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MERGEKIT_DEFAULT = "/tmp/mergekit-lib"
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja")
OMEGA = 0.5


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _status_gb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"no {field} in /proc/self/status")


def _rss_gb() -> float:
    return _status_gb("VmRSS")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_gb() -> float:
    """This process's peak RSS: ``VmHWM``, the high-water mark of its own address space.

    (``ru_maxrss`` would not do: Linux carries it over ``execve`` from the forked copy of the
    parent, so a child of this script, large by then, would report the parent's size.)
    """
    return _status_gb("VmHWM")


# ---------------------------------------------------------------------------------------------
# Setup (parent)
# ---------------------------------------------------------------------------------------------

def build(work: Path, n_tasks: int, noise: float) -> dict:
    """Task checkpoints and core regions under ``work``; returns the paths."""
    import torch
    from safetensors.torch import save_file

    from cpift.checkpoint import open_checkpoint
    from cpift.models import embedded_model_dir
    from cpift.regions import core_regions

    base = embedded_model_dir()
    tasks = {}
    for i in range(n_tasks):
        name = f"task{i + 1}"
        directory = work / name
        directory.mkdir()
        for side in SIDE_FILES:
            if (base / side).is_file():
                shutil.copy2(base / side, directory / side)
        ckpt = open_checkpoint(base, label="base")
        generator = torch.Generator().manual_seed(1000 + i)
        state = {}
        for tensor_name in ckpt.names():
            tensor = ckpt.get(tensor_name)
            if tensor.dtype.is_floating_point:
                x = tensor.float()
                std = float(x.std()) if x.numel() > 1 else float(x.abs().sum())
                tensor = (x + torch.randn(x.shape, generator=generator) * (noise * (std or 1.0))).to(tensor.dtype)
            state[tensor_name] = tensor.contiguous().clone()
        ckpt.close()
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        del state
        tasks[name] = str(directory)
        log(f"built {name} at {directory}")
    regions = core_regions(str(base), tasks, p=1, progress=False)
    regions.save(work / "regions", magnitudes=1, compress=True)
    log(f"core regions at p = 1: {regions}")
    return {"base": str(base), "tasks": tasks, "regions": str(work / "regions")}


# ---------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------

def child(op: str, setup: dict, out: str) -> dict:
    """Run one operation in this (fresh) process; returns wall and CPU time, RSS before and peak."""
    base, tasks = setup["base"], setup["tasks"]
    first = next(iter(tasks))
    extra: dict = {}
    if op == "mergekit":
        from importlib.metadata import version

        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        extra["version"] = version("mergekit")
        config = MergeConfiguration.model_validate({
            "merge_method": "slerp", "base_model": base, "dtype": "float32",
            "models": [{"model": base}, {"model": tasks[first]}],
            "parameters": {"t": OMEGA},
        })
        options = MergeOptions(device="cpu", lazy_unpickle=True, quiet=True)
        rss0, cpu0 = _rss_gb(), _cpu_s()
        start = time.perf_counter()
        run_merge(config, out, options)
        wall = time.perf_counter() - start
    else:
        import torch

        import cpift
        from cpift.checkpoint import open_checkpoint
        from cpift.fusion import fuse, slerp
        from cpift.models import save_weights
        from cpift.regions import CoreRegions

        torch.set_grad_enabled(False)
        extra["cpift"] = str(Path(cpift.__file__).parent.parent)
        regions = CoreRegions.load(setup["regions"]) if op.startswith("fuse") else None
        rss0, cpu0 = _rss_gb(), _cpu_s()
        start = time.perf_counter()
        if op in ("read", "read/close"):
            ckpts = [open_checkpoint(base, label="base"),
                     *(open_checkpoint(path, label=name) for name, path in tasks.items())]
            total = 0.0
            for name in ckpts[0].names():
                for ckpt in ckpts:
                    total += float(ckpt.get(name).sum())
                if op == "read/close":
                    for ckpt in ckpts:
                        ckpt.close()
            for ckpt in ckpts:
                ckpt.close()
            extra["sum"] = total
        elif op == "fuse+save":
            state = fuse(base, tasks, regions, OMEGA, "max_delta", progress=False)
            extra["fuse_s"] = time.perf_counter() - start
            save_weights(state, out)
        elif op == "fuse(out=)":
            fuse(base, tasks, regions, OMEGA, "max_delta", progress=False, out=out)
        elif op == "slerp+save":
            base_ckpt, task_ckpt = open_checkpoint(base, label="base"), open_checkpoint(tasks[first], label=first)
            state = {}
            for name in base_ckpt.names():
                b = base_ckpt.get(name)
                state[name] = slerp(b, task_ckpt.get(name), OMEGA) if b.dtype.is_floating_point else b
                base_ckpt.close()  # release the mmap of what was read (the kept tensors are copies)
                task_ckpt.close()
            extra["fuse_s"] = time.perf_counter() - start
            save_weights(state, out)
        else:
            raise SystemExit(f"unknown operation {op!r}")
        wall = time.perf_counter() - start
    cpu = _cpu_s() - cpu0
    peak = _peak_gb()
    return {"op": op, "wall": wall, "cpu": cpu, "rss0": rss0, "peak": peak, **extra}


def _has_out(cpift_dir: Path) -> bool:
    """Whether the fuse of the cpift in ``cpift_dir`` has the ``out=`` option (asked in a child)."""
    code = "import inspect, cpift.fusion as f; print('out' in inspect.signature(f.fuse).parameters)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cpift_dir,
                          env=dict(os.environ, PYTHONPATH=str(cpift_dir)))
    return proc.stdout.strip() == "True"


def run_child(op: str, setup_file: Path, out: Path, mergekit: str | None, cpift_dir: Path) -> dict:
    env = dict(os.environ, TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [mergekit if op == "mergekit" else None, str(cpift_dir)]))
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, __file__, "--child", op, "--setup", str(setup_file), "--out", str(out)],
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{op} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Comparison of outputs
# ---------------------------------------------------------------------------------------------

def compare(a: Path, b: Path) -> tuple[float, float]:
    """Largest |a − b| over all tensors, and largest |a − b| / max|a| per tensor."""
    from cpift.checkpoint import open_checkpoint

    x, y = open_checkpoint(a, label="a"), open_checkpoint(b, label="b")
    worst = worst_rel = 0.0
    for name in x.names():
        if name not in y:
            continue
        u, v = x.get(name).double(), y.get(name).double()
        diff = float((u - v).abs().max()) if u.numel() else 0.0
        worst = max(worst, diff)
        worst_rel = max(worst_rel, diff / max(float(u.abs().max()) if u.numel() else 0.0, 1e-30))
        x.close(), y.close()
    return worst, worst_rel


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1, help="task models (default 1)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--noise", type=float, default=1e-3, help="noise std relative to each tensor's std")
    parser.add_argument("--mergekit", default=MERGEKIT_DEFAULT,
                        help=f"directory holding mergekit (PYTHONPATH of its child; default {MERGEKIT_DEFAULT}); "
                             "'' to skip mergekit")
    parser.add_argument("--ops", default=None, help="comma-separated operations to run (default all)")
    parser.add_argument("--cpift", default=str(REPO),
                        help="directory to import cpift from (default: this repository), e.g. a copy of an "
                             "earlier version to compare with")
    parser.add_argument("--compare", default=None,
                        help="also run the fuse rows with cpift imported from this directory (e.g. a copy of the "
                             "previous version), in the same rounds")
    parser.add_argument("--check", action="store_true",
                        help="compare the cpift SLERP and mergekit outputs, and the fuse rows' weight files")
    parser.add_argument("--json", default=None, help="also write the raw results to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--setup", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        setup = json.loads(Path(args.setup).read_text())
        print(json.dumps(child(args.child, setup, args.out)), flush=True)
        return

    cpift_dir = Path(args.cpift).resolve()
    rows = [(op, op, cpift_dir) for op in ("read", "read/close", "fuse+save", "fuse(out=)", "slerp+save")]
    if args.compare:
        other = Path(args.compare).resolve()
        rows[3:3] = [(f"{op} [{other.name}]", op, other) for op in ("fuse+save", "fuse(out=)")]
    rows = [row for row in rows if row[1] != "fuse(out=)" or _has_out(row[2])]
    mergekit = args.mergekit or None
    if mergekit:
        probe = subprocess.run([sys.executable, "-c", "import mergekit.merge"], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=mergekit))
        if probe.returncode:
            log(f"mergekit cannot be imported from {mergekit}; its row is left out:\n{probe.stderr[-1500:]}")
            mergekit = None
        else:
            rows.append(("mergekit", "mergekit", cpift_dir))
    if args.ops:
        rows = [row for row in rows if row[1] in args.ops.split(",")]
    ops = [label for label, _, _ in rows]

    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="cpift-bench-fusion-"))
    outputs = {label: work / ("out-" + "".join(c if c.isalnum() or c in "+-" else "_" for c in label)) for label in ops}
    try:
        sys.path.insert(0, str(cpift_dir))
        setup = build(work, args.tasks, args.noise)
        setup_file = work / "setup.json"
        setup_file.write_text(json.dumps(setup))
        results: dict[str, list[dict]] = {op: [] for op in ops}
        for round_ in range(args.repeat):
            for label, op, directory in rows:
                result = run_child(op, setup_file, outputs[label], mergekit, directory)
                results[label].append(result)
                log(f"round {round_ + 1} {label}: {result}")
        if args.check:
            if "slerp+save" in ops and "mergekit" in ops:
                worst, worst_rel = compare(outputs["slerp+save"], outputs["mergekit"])
                log(f"cpift slerp vs mergekit: max |diff| {worst:.3g}, "
                    f"max relative to the tensor's max |value| {worst_rel:.3g}")
            fused = [label for label, op, _ in rows if op in ("fuse+save", "fuse(out=)")]
            for label in fused[1:]:
                same = (outputs[fused[0]] / "model.safetensors").read_bytes() == \
                    (outputs[label] / "model.safetensors").read_bytes()
                log(f"fused weights file of {label!r} {'==' if same else '!='} that of {fused[0]!r} (bytes)")
        load_end = os.getloadavg()
        print(f"model: SmolLM2-135M-Instruct (embedded, fp32), {args.tasks} task model(s), noise {args.noise:g}·std, "
              f"p = 1, ω = t = {OMEGA}; {os.cpu_count()} CPUs, torch threads default; "
              f"load average {load_start[0]:.2f} → {load_end[0]:.2f}; {args.repeat} rounds")
        if "mergekit" in results and results["mergekit"]:
            version = results["mergekit"][0].get("version")
            print(f"mergekit {version} from {mergekit}")
        print()
        print("| operation | wall s (median) | CPU s (median) | peak RSS GB (max) | RSS before the work GB | "
              "speed-up over mergekit (medians) | speed-up (per round, median) | peak RSS / mergekit's |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        mk = [r["wall"] for r in results.get("mergekit", [])]
        mk_peak = max((r["peak"] for r in results.get("mergekit", [])), default=None)
        for op in ops:
            rows = results[op]
            walls = [r["wall"] for r in rows]
            wall = statistics.median(walls)
            peak = max(r["peak"] for r in rows)
            ratio = ratio_rounds = memory = "—"
            if mk and op != "mergekit":
                ratio = f"{statistics.median(mk) / wall:.2f}×"
                ratio_rounds = f"{statistics.median(m / w for w, m in zip(walls, mk)):.2f}×"
                memory = f"{peak / mk_peak:.2f}"
            fuse_s = [r["fuse_s"] for r in rows if "fuse_s" in r]
            label = op + (f" (before saving: {statistics.median(fuse_s):.2f} s)" if fuse_s else "")
            print(f"| {label} | {wall:.2f} | {statistics.median(r['cpu'] for r in rows):.2f} | {peak:.2f} | "
                  f"{statistics.median(r['rss0'] for r in rows):.2f} | {ratio} | {ratio_rounds} | {memory} |")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
