"""Core regions and fusion on 7B-class checkpoints in bounded memory: wall time and peak RSS.

Run from the repository root on a quiet machine with disk for three checkpoints (7B: ~41 GB)::

    .venv/bin/python analysis/bench_scale.py --shape 7b      # LLaMA-2-7B shapes, bfloat16
    .venv/bin/python analysis/bench_scale.py --shape 1.5b    # Qwen2-1.5B-like shapes
    .venv/bin/python analysis/bench_scale.py --shape 135m    # SmolLM2-135M shapes (a minute)

It writes a synthetic pair — a random base and a task that moves every element a little and a
few percent of them more — shard by shard as sharded safetensors (never holding a model), then
times each in a fresh process and reads its peak resident memory (``ru_maxrss``, which counts the touched
pages of memory-mapped checkpoints) and its peak anonymous memory (sampled every 20 ms: what the
operation allocates):

- reading both checkpoints once, tensor by tensor (the floor any whole-model operation pays);
- ``core_regions(base, {t: task}, p=1, keep_magnitudes=False)``, one task and two (the second
  task is the same file under another name: the cost is the same as a second model's);
- the overlap of the two tasks' cores, loaded from the saved regions: their Jaccard, per layer
  and beside chance (``overlap_significance``);
- ``fuse(base, {a, b}, regions, out=DIR)``, the fused model written tensor by tensor;
- the app's Core regions page (through streamlit's AppTest) computing one task's core from the
  two paths typed into its form, as a researcher would.

The files are deleted at the end. The table is printed as markdown with the machine's facts.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    # name: (hidden, intermediate, layers, vocab, tied embeddings)
    "135m": (576, 1536, 30, 49152, True),
    "1.5b": (1536, 8960, 28, 151936, True),
    "7b": (4096, 11008, 32, 32000, False),
}
SHARD_BYTES = 2 * 2**30


def tensor_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    """A LLaMA-style model's tensor names and shapes."""
    hidden, inter, layers, vocab, tied = SHAPES[shape]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
                    p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                    p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                    p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                    p + "post_attention_layernorm.weight": (hidden,)})
    out["model.norm.weight"] = (hidden,)
    if not tied:
        out["lm_head.weight"] = (vocab, hidden)
    return out


def write_pair(shape: str, root: Path) -> tuple[Path, Path]:
    """The synthetic base and task, sharded safetensors in bfloat16, written shard by shard."""
    base_dir, task_dir = root / "base", root / "task"
    for d in (base_dir, task_dir):
        d.mkdir(parents=True)
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, dims in tensor_shapes(shape).items():
        nbytes = 2 * int(torch.Size(dims).numel())
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = dims
        size += nbytes
    generator = torch.Generator().manual_seed(0)
    index: dict[str, str] = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        base, task = {}, {}
        for name, dims in shard.items():
            weight = torch.randn(dims, generator=generator) * 0.02
            move = torch.randn(dims, generator=generator) * 1e-4
            move += (torch.rand(dims, generator=generator) < 0.03) * torch.randn(dims, generator=generator) * 1e-2
            base[name], task[name] = weight.bfloat16(), (weight + move).bfloat16()
            index[name] = file
        save_file(base, str(base_dir / file))
        save_file(task, str(task_dir / file))
        del base, task
    for d in (base_dir, task_dir):
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return base_dir, task_dir


def _read_once(base: str, task: str) -> None:
    from cpift.checkpoint import open_checkpoint

    for path in (base, task):
        ckpt = open_checkpoint(path)
        for name in ckpt.names():
            ckpt.get(name).clone()  # a lazy (memory-mapped) tensor is read only when touched
        ckpt.close()


def _regions(base: str, task: str, n_tasks: int) -> None:
    from cpift.regions import core_regions

    regions = core_regions(base, {f"t{i}": task for i in range(n_tasks)}, p=1.0, keep_magnitudes=False,
                           progress=False)
    regions.save(Path(base).parent / f"regions-{n_tasks}", compress=True, overwrite=True)


def _overlap(base: str) -> None:
    from cpift.regions import CoreRegions

    regions = CoreRegions.load(Path(base).parent / "regions-2")
    regions.jaccard()
    regions.layer_jaccard("layer")
    regions.overlap_significance("layer")


def _fuse(base: str, task: str) -> None:
    from cpift.fusion import fuse
    from cpift.regions import CoreRegions

    regions = CoreRegions.load(Path(base).parent / "regions-2")
    fuse(base, {"t0": task, "t1": task}, regions, omega=0.5, out=Path(base).parent / "fused", progress=False)


def _app_page(base: str, task: str) -> None:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "main.py"), default_timeout=3600)
    at.query_params.update({"page": "regions"})
    at.run()
    at.text_input[0].set_value(base)
    at.text_area[0].set_value(f"t0 = {task}")
    at.button[0].click().run()
    if at.error or at.exception or at.dataframe[0].value["task"].tolist() != ["t0"]:
        raise SystemExit(f"the Core regions page failed: {[e.value for e in at.error]} {list(at.exception)}")


def _child(target, args, queue) -> None:
    import psutil

    process, peak_anonymous, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:  # RSS less file-backed pages, every 20 ms: what the process itself holds
        while not done.wait(0.02):
            info = process.memory_info()
            peak_anonymous[0] = max(peak_anonymous[0], info.rss - info.shared)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    target(*args)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, peak_anonymous[0] / 2**30))


def measure(target, *args) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (GiB) and sampled peak anonymous memory (GiB) of ``target(*args)``
    in a fresh process. RSS counts the pages of memory-mapped checkpoints that were touched (page
    cache the kernel reclaims at will); the anonymous part is what the operation allocates."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(target, args, queue))
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode:
        raise SystemExit(f"{target.__name__} failed with exit code {process.exitcode}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=tuple(SHAPES), default="7b")
    parser.add_argument("--dir", default=None, help="where to write the synthetic checkpoints (default: a temp dir)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cpift-scale-", dir=args.dir))
    try:
        started = time.perf_counter()
        base, task = write_pair(args.shape, root)
        written = time.perf_counter() - started
        params = sum(int(torch.Size(d).numel()) for d in tensor_shapes(args.shape).values())
        rows = [("read both checkpoints once", *measure(_read_once, str(base), str(task))),
                ("core_regions, p = 1 %, one task", *measure(_regions, str(base), str(task), 1)),
                ("core_regions, p = 1 %, two tasks", *measure(_regions, str(base), str(task), 2)),
                ("overlap of the two cores (saved regions): Jaccard, per layer, beside chance",
                 *measure(_overlap, str(base))),
                ("fuse two tasks, written tensor by tensor (out=)", *measure(_fuse, str(base), str(task))),
                ("the app's Core regions page, one task", *measure(_app_page, str(base), str(task)))]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.shape} shapes: {params / 1e9:.2f}B parameters, bfloat16, {2 * params / 2**30:.1f} GiB per "
          f"checkpoint (written in {written:.0f} s); {platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, load average {os.getloadavg()[0]:.2f}\n")
    print("| operation | wall (s) | peak RSS (GiB) | of it allocated, not mapped files (GiB) |\n|---|---|---|---|")
    for name, seconds, rss, anonymous in rows:
        print(f"| {name} | {seconds:.1f} | {rss:.2f} | {anonymous:.2f} |")


if __name__ == "__main__":
    main()
