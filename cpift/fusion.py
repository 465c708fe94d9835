"""Fusion of task models (CPI-FT stage 3): core transplant plus SLERP elsewhere.

For every tensor of the base model:

1. Non-core elements: SLERP between the base tensor and each task tensor with factor ω, per tensor
   (the paper writes it per element, which is degenerate for scalars; per tensor is what merge
   tools do). Several tasks are folded by one of two documented rules: ``fold="mean"`` (default)
   averages the per-task SLERPs, which is order-free and reduces to the paper's formula for one
   task; ``fold="sequential"`` merges one task at a time into the running result.
2. Core elements: each element in a task's core takes that task's value. An element in several
   cores (contested) is resolved by ``overlap``: ``"max_delta"`` (the task with the largest |Δ|
   there; ties to the earlier task), ``"last"`` (the later task in input order — the paper's
   transplant order), or ``"mean"`` (the mean of the contending tasks' values).

Tensors outside the regions' layout (excluded by patterns) get step 1 only; non-floating tensors
are copied from the base.

Memory: tensors are processed one at a time, and the checkpoints' readers are closed every
:data:`_RELEASE_BYTES` read, which unmaps what safetensors had mapped (a reader left open keeps
every page it served resident: a whole model by the end). A core's positions are found from the
bit-packed masks of the tensor alone, never as whole-model boolean masks. So beyond the result,
fusing holds about one tensor per model plus one fused tensor: the report alone
(``fuse(..., keep_tensors=False).report``) or a fusion streamed to disk (``fuse(..., out=DIR)``,
written tensor by tensor) needs no more, and ``keep_tensors=True`` adds the fused model itself.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save as _safetensors_bytes
from tqdm.auto import tqdm

from .atomic import atomic_dir
from .checkpoint import SAFETENSORS_FILE, Checkpoint, ModelLike, aligned_names, open_checkpoint
from .errors import MismatchError, ParameterError
from .masks import WORD_BITS, positions
from .overlap import _grouping
from .regions import CoreRegions

OVERLAP_RULES = ("max_delta", "last", "mean")
FOLDS = ("mean", "sequential")
#: Elements converted to float64 at a time when :func:`_cosine` accumulates: 512 KiB per tensor, which
#: stays in cache and was the fastest size measured (about 0.03 s for 28M elements).
_CHUNK = 1 << 16
#: Bytes a checkpoint reader serves before :func:`_fuse_tensors` closes it. Closing unmaps the file
#: (safetensors reads through mmap, and every page read stays resident while the file is mapped);
#: reopening costs about 0.2 ms, so a budget rather than a close after every tensor.
_RELEASE_BYTES = 64 << 20


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical linear interpolation of two tensors, as mergekit does it.

    cos θ₀ is the flattened tensors' cosine, accumulated in float64; if |cos θ₀| > ``dot_threshold``
    the tensors are nearly colinear and linear interpolation is used; otherwise
    ``sin((1−t)θ₀)/sin θ₀ · v0 + sin(tθ₀)/sin θ₀ · v1`` on the un-normalised tensors. t = 0 gives
    v0 and t = 1 gives v1. The result has v0's dtype and shape.
    """
    if v0.shape != v1.shape:
        raise MismatchError(f"slerp: shapes differ, {list(v0.shape)} and {list(v1.shape)}")
    _check_unit("t", t)
    a = v0.detach().float().reshape(-1)
    b = v1.detach().float().reshape(-1)
    return _slerp_flat(a, b, t, _cosine(a, b), dot_threshold).reshape(v0.shape).to(v0.dtype)


def _slerp_flat(
    a: torch.Tensor, b: torch.Tensor, t: float, cos: float, dot_threshold: float = 0.9995, *, in_place: bool = False
) -> torch.Tensor:
    """SLERP of two flat float32 tensors whose cosine is already known (see :func:`slerp`).

    ``in_place=True`` writes the result into ``a`` (the same values: the same operations, in place)
    except at the endpoints t = 0 and t = 1, which return ``a`` or ``b`` themselves.
    """
    if t == 0:  # exact endpoints, whatever rounding the formula would do
        return a
    if t == 1:
        return b
    if abs(cos) > dot_threshold:
        return a.lerp_(b, t) if in_place else torch.lerp(a, b, t)
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    scale = math.sin((1 - t) * theta) / sin_theta
    return (a.mul_(scale) if in_place else a * scale).add_(b, alpha=math.sin(t * theta) / sin_theta)


def _cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> float:
    """cos of the angle between two flat tensors (mergekit: a zero-norm side is not scaled).

    The dot product and the norms are accumulated in float64, :data:`_CHUNK` elements at a time (the
    extra memory is two float64 chunks, whatever the size): float32 sums over an embedding matrix's
    tens of millions of elements are off by up to percents, which gives a wrong angle or a cosine
    above 1 that would silently turn SLERP into linear interpolation. Equal tensors give exactly 1
    (rounding would otherwise report a small angle).
    """
    dot = square_a = square_b = 0.0
    for start in range(0, a.numel(), _CHUNK):
        x = a[start:start + _CHUNK].double()
        y = b[start:start + _CHUNK].double()
        dot += torch.dot(x, y).item()
        square_a += torch.dot(x, x).item()
        square_b += torch.dot(y, y).item()
    na, nb = math.sqrt(square_a), math.sqrt(square_b)
    if torch.equal(a, b):
        return 1.0 if na > eps else 0.0
    cos = dot / ((na if na > eps else 1.0) * (nb if nb > eps else 1.0))
    return max(-1.0, min(1.0, cos))


def _check_unit(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ParameterError(f"{name} must be in [0, 1], got {value!r}")


@dataclass(frozen=True)
class _FusedTensor:
    name: str
    tensor: torch.Tensor
    row: dict


def _fuse_tensors(
    base: ModelLike,
    tuned: Mapping[str, ModelLike],
    regions: CoreRegions,
    omega: float,
    overlap: str,
    fold: str,
    allow_pickle: bool,
    progress: bool | None,
    entries_out: list[tuple[str, tuple[int, ...], torch.dtype]] | None = None,
) -> Iterator[_FusedTensor]:
    """Fuse tensor by tensor, yielding each fused tensor with its report row.

    ``entries_out``, if given, receives the name, shape and dtype of every tensor that will be
    yielded, in order, before the first one is (a streaming writer lays out its file from them).
    """
    _check_unit("omega", omega)
    _check_overlap(overlap)
    if fold not in FOLDS:
        raise ParameterError(f"fold must be one of {', '.join(FOLDS)}; got {fold!r}")
    if list(tuned) != regions.tasks:
        raise MismatchError(f"the task models {list(tuned)} are not the regions' tasks {regions.tasks}")
    base_ckpt = open_checkpoint(base, allow_pickle=allow_pickle, label="base")
    task_ckpts = {t: open_checkpoint(m, allow_pickle=allow_pickle, label=f"task {t!r}") for t, m in tuned.items()}
    ckpts = (base_ckpt, *task_ckpts.values())
    try:
        names = aligned_names(base_ckpt, task_ckpts, base_ckpt.names())
        for name, shape in zip(regions.layout.names, regions.layout.shapes):
            if name not in base_ckpt or base_ckpt.shape(name) != shape:
                found = list(base_ckpt.shape(name)) if name in base_ckpt else "no such tensor"
                raise MismatchError(
                    f"the regions' tensor {name!r} of shape {list(shape)} does not fit the base ({found})")
        if entries_out is not None:
            entries_out.extend((n, base_ckpt.shape(n), base_ckpt.dtype(n)) for n in names)
        tasks = regions.tasks
        in_layout = set(regions.layout.names)
        read = 0  # bytes served by each reader since they were last closed
        for name in tqdm(names, desc="fuse", unit="tensor", disable=None if progress is None else not progress):
            base_tensor = base_ckpt.get(name)
            read += base_tensor.numel() * base_tensor.element_size()
            row: dict = {"tensor": name, "numel": base_tensor.numel(), "contested": 0}
            if not base_tensor.dtype.is_floating_point:
                yield _FusedTensor(name, base_tensor, row)
            else:
                fused = _fuse_one(name, base_tensor, [task_ckpts[t].get(name) for t in tasks], regions,
                                  name in in_layout, omega, overlap, fold, row)
                yield _FusedTensor(name, fused, row)
            if read >= _RELEASE_BYTES:
                _release(ckpts)
                read = 0
    finally:
        _release(ckpts)


def _release(ckpts: Sequence[Checkpoint]) -> None:
    """Close the readers: their mapped pages leave the process once no tensor read from them lives."""
    for ckpt in ckpts:
        ckpt.close()


def _fuse_one(
    name: str,
    base_tensor: torch.Tensor,
    task_tensors: list[torch.Tensor],
    regions: CoreRegions,
    in_layout: bool,
    omega: float,
    overlap: str,
    fold: str,
    row: dict,
) -> torch.Tensor:
    """One floating tensor: SLERP folded over the tasks, then the cores' values (fills ``row``)."""
    tasks = regions.tasks
    b = base_tensor.float().reshape(-1)
    values = [t.float().reshape(-1) for t in task_tensors]
    cosines = [_cosine(b, v) for v in values]
    for task, cos in zip(tasks, cosines):
        row[f"angle:{task}"] = math.degrees(math.acos(cos))
    owned = False  # whether `fused` is a new tensor, not an input's storage (which may be a mapped file)
    if omega == 0:  # every SLERP is the base; skip the averaging's rounding
        fused = b
    elif fold == "mean":
        fused = None
        for v, cos in zip(values, cosines):
            term = _slerp_flat(b, v, omega, cos)
            if fused is None:
                # The sum starts from zeros: 0 + x is x, except that -0.0 becomes +0.0. Adding 0.0 to
                # the first term gives the same bits in one pass, without a zeroed tensor.
                fused = term.add_(0.0) if term is not b and term is not v else term.add(0.0)
            else:
                fused += term
        if len(values) > 1:  # x / 1 is x
            fused /= len(values)
        owned = True
    else:
        fused = b
        for v in values:
            # After the first step `fused` is this tensor's own: later steps overwrite it rather than
            # leave a freed tensor-sized hole per step in the heap, which a kept state would strand.
            owned = all(fused is not x for x in (b, *values))
            fused = _slerp_flat(fused, v, omega, _cosine(fused, v), in_place=owned)
        owned = all(fused is not x for x in (b, *values))
    if in_layout:
        where, owns = _core_positions(regions, name, b.numel())
        if where.numel():
            if not owned:
                fused = fused.clone()
            fused, credit, row["contested"] = _transplant(fused, b, values, where, owns, overlap)
        else:
            credit = [0] * len(tasks)
        row.update({f"from:{task}": n for task, n in zip(tasks, credit)})
    return fused.reshape(base_tensor.shape).to(base_tensor.dtype)


def _core_positions(regions: CoreRegions, name: str, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions in tensor ``name`` inside some task's core (ascending), and who owns each.

    Read from the packed masks' words of this tensor alone (a tensor owns whole words): only the
    words holding a set bit are unpacked, and no boolean mask of the tensor is built.

    Returns ``where`` (int64) and ``owns`` (task × position booleans).
    """
    span = regions.layout.word_span(name)
    words = [regions.packed(task)[span] for task in regions.tasks]
    union = words[0] if len(words) == 1 else np.bitwise_or.reduce(words)
    occupied = np.flatnonzero(union)
    bits = np.unpackbits(union[occupied].view(np.uint8), bitorder="little").view(bool)
    index = torch.nonzero(torch.from_numpy(bits)).squeeze(1)
    where = torch.from_numpy(occupied)[index // WORD_BITS] * WORD_BITS + index % WORD_BITS
    where = where[where < numel]  # padding bits are never set; this only guards the gather
    if len(words) == 1:
        return where, torch.ones((1, where.numel()), dtype=torch.bool)
    word, bit = (where // WORD_BITS).numpy(), (where % WORD_BITS).numpy().astype(np.uint64)
    owns = np.stack([((w[word] >> bit) & np.uint64(1)).astype(bool) for w in words])
    return where, torch.from_numpy(owns)


def _transplant(
    fused: torch.Tensor, base: torch.Tensor, values: list[torch.Tensor], where: torch.Tensor, owns: torch.Tensor,
    overlap: str,
) -> tuple[torch.Tensor, list[int], int]:
    """Write each task's core values into ``fused`` (flat float32, in place), resolving contested elements.

    Only the positions inside some core (``where``, about p% × tasks of the tensor; ``owns`` says
    whose core each is in) are gathered and resolved, so the cost is proportional to the cores, not
    to the tensor. Returns the result, how many values each task supplied (for ``mean``: the
    elements it alone owns), and the number of contested elements.
    """
    vals = torch.stack([value[where] for value in values])
    delta = (vals - base[where]).abs() if overlap == "max_delta" else None
    winner, credit, contested = _resolve(owns, delta, overlap)
    if winner is None:  # mean
        chosen = torch.where(owns, vals, 0.0).sum(0) / owns.sum(0)
    else:
        chosen = vals.gather(0, winner.unsqueeze(0)).squeeze(0)
    fused[where] = chosen
    return fused, credit.sum(1).tolist(), int(contested.sum())


def _resolve(
    owns: torch.Tensor, delta: torch.Tensor | None, overlap: str
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Who supplies each gathered core position under an overlap rule (the one place the rules live).

    Args:
        owns: task × position booleans, every position in at least one core.
        delta: task × position |Δ| (needed by ``max_delta`` only).
        overlap: one of :data:`OVERLAP_RULES`.

    Returns:
        ``winner`` (the task index taking each position; ``None`` for ``mean``, where the
        contending tasks are averaged), ``credit`` (task × position: the positions counted as the
        task's in a report — its won positions, or for ``mean`` those it alone owns) and
        ``contested`` (positions in more than one core).
    """
    count = owns.sum(0)
    contested = count > 1
    if overlap == "mean":
        return None, owns & ~contested, contested
    if overlap == "last":  # the last owner wins
        score = torch.arange(owns.shape[0], dtype=torch.float32).unsqueeze(1).expand(owns.shape)
    else:  # max_delta: argmax takes the first maximum, so ties stay with the earlier task
        score = delta
    # argmax along the contiguous dimension: the same indices, several times faster than across rows
    winner = torch.where(owns, score, -1.0).T.contiguous().argmax(1)
    credit = torch.zeros_like(owns)
    credit[winner, torch.arange(owns.shape[1])] = True
    return winner, credit, contested


def _check_overlap(overlap: str) -> None:
    if overlap not in OVERLAP_RULES:
        raise ParameterError(f"overlap must be one of {', '.join(OVERLAP_RULES)}; got {overlap!r}")


def transplant_report(regions: CoreRegions, overlap: str = "max_delta", by: str = "tensor") -> pd.DataFrame:
    """What the core transplant of :func:`fuse` takes from each task, from the regions alone.

    Which task supplies a core element depends only on the masks and the overlap rule (and, for
    ``max_delta``, on |Δ| at the core positions, which the regions' kept magnitudes hold), not on
    ω or on the model weights. So this gives the ``from:TASK`` and ``contested`` columns of
    ``fuse(...).report`` without reading a checkpoint — a run shipped without weights can still be
    previewed. It assumes the fusion's base is the model the regions were measured against (the
    pipeline's ``fusion_base = "pretrained"``).

    The whole model is resolved at once on the gathered core positions (the union of the cores),
    then counted per tensor and summed per group.

    Args:
        regions: the tasks' core regions (with magnitudes covering the cores for ``max_delta``).
        overlap: one of :data:`OVERLAP_RULES`.
        by: ``"tensor"`` (one row per tensor of the layout, the fusion report's rows),
            ``"layer"`` or ``"module"`` (as :meth:`CoreRegions.sizes`).

    Returns:
        Columns ``group, numel, contested, from:TASK…`` (counts), groups in display order.

    Raises:
        ParameterError: unknown ``overlap`` or ``by``, or ``max_delta`` on regions without magnitudes.
    """
    _check_overlap(overlap)
    order, group_index = _grouping(regions.layout, by)
    tasks = regions.tasks
    if overlap == "max_delta" and regions.max_p is None:
        raise ParameterError("overlap='max_delta' needs the regions' |Δ| magnitudes; these regions hold none")
    where = positions(np.bitwise_or.reduce([regions.packed(t) for t in tasks]))
    word, bit = where // WORD_BITS, (where % WORD_BITS).astype(np.uint64)
    owns = torch.from_numpy(np.stack([(regions.packed(t)[word] >> bit) & np.uint64(1) for t in tasks]).astype(bool))
    delta = None
    if overlap == "max_delta":  # |Δ| is needed at each task's own core positions only
        delta = torch.zeros(owns.shape, dtype=torch.float32)
        for row, kept in zip(delta, regions.top_magnitudes(regions.p).values()):
            row[torch.from_numpy(np.searchsorted(where, kept.indices))] = torch.from_numpy(kept.values)
    _, credit, contested = _resolve(owns, delta, overlap)
    # Each position's tensor, then its group: the layout's tensors start at regions.layout.starts.
    group_of = group_index[np.searchsorted(regions.layout.starts, where, side="right") - 1]
    n_groups = len(order)
    table = {"group": order, "numel": np.bincount(group_index, weights=regions.layout.numels,
                                                   minlength=n_groups).astype(np.int64),
             "contested": np.bincount(group_of[contested.numpy()], minlength=n_groups)}
    for task, row in zip(tasks, credit.numpy()):
        table[f"from:{task}"] = np.bincount(group_of[row], minlength=n_groups)
    return pd.DataFrame(table)


class FusedState(dict):
    """The fused model's tensors by name (a plain ``dict[str, Tensor]``), plus the fusion report.

    ``report`` has one row per tensor: elements taken from each task's core (``from:TASK``),
    contested elements (``contested``), and the angle in degrees between the base and each task
    tensor (``angle:TASK``).
    """

    report: pd.DataFrame


def fuse(
    base: ModelLike,
    tuned: Mapping[str, ModelLike],
    regions: CoreRegions,
    omega: float = 0.5,
    overlap: str = "max_delta",
    *,
    fold: str = "mean",
    keep_tensors: bool | None = None,
    out: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
    progress: bool | None = None,
) -> FusedState:
    """Fuse the task models into one state dict: core transplant plus SLERP (see module docs).

    Args:
        base: the base of the fusion (the pretrained model, or the last fine-tuning stage's).
        tuned: task name → task model, the same tasks in the same order as ``regions``.
        regions: the tasks' core regions.
        omega: SLERP factor ω in [0, 1] for non-core elements (0 keeps the base).
        overlap: rule for elements in several cores: ``max_delta``, ``last`` or ``mean``.
        fold: how several tasks' SLERPs combine: ``mean`` or ``sequential``.
        keep_tensors: whether the result holds the fused tensors. Default: yes, unless ``out`` is
            given. False computes only the report (and ``out``), holding one tensor per model at a
            time (a preview of a large fusion).
        out: a directory to write the fused model to, as ``out/model.safetensors``, tensor by
            tensor as each is fused: the same file as ``cpift.models.save_weights(fuse(...), out)``
            (published atomically, an existing directory replaced), without holding the model.

    Returns every tensor of the base (tied weights once) in the base's dtypes, with ``.report``
    (no tensors when ``keep_tensors`` is False).
    """
    keep = out is None if keep_tensors is None else keep_tensors
    state = FusedState()
    rows = []
    entries: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    fused_tensors = _fuse_tensors(base, tuned, regions, omega, overlap, fold, allow_pickle, progress, entries)

    def collect(fused: _FusedTensor) -> None:
        if keep:
            state[fused.name] = fused.tensor
        rows.append(fused.row)

    if out is None:
        for fused in fused_tensors:
            collect(fused)
    else:
        with atomic_dir(Path(out), overwrite=True) as tmp:
            writer = None
            try:
                for fused in fused_tensors:
                    writer = writer or _SafetensorsWriter(tmp / SAFETENSORS_FILE, entries)
                    writer.write(fused.name, fused.tensor)
                    collect(fused)
                writer = writer or _SafetensorsWriter(tmp / SAFETENSORS_FILE, entries)
            finally:
                if writer is not None:
                    writer.close()
    state.report = pd.DataFrame(rows).fillna(0)
    return state


class _SafetensorsWriter:
    """A safetensors file written one tensor at a time, in any order, once every entry is known.

    The bytes are those of ``safetensors.torch.save_file`` of the same tensors (no metadata): the
    same order of the data (by dtype as safetensors ranks them, then by name), the same compact
    JSON header padded with spaces to 8 bytes. The header is written first, from the names, shapes
    and dtypes; each tensor's data then goes to its offset. (The file is not sized up front: writing
    into a pre-extended, sparse file measured a third slower than appending on ext4.)
    """

    def __init__(self, path: Path, entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        codes = _safetensors_dtypes({dtype for _, _, dtype in entries})
        rank = {dtype: i for i, dtype in enumerate(codes)}
        header: dict[str, dict] = {}
        self._slots: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, shape, dtype in sorted(entries, key=lambda e: (rank[e[2]], e[0])):
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._slots[name] = (offset, tuple(shape), dtype)
            offset += size
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        self._data_start = 8 + len(text)
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._file.write(len(text).to_bytes(8, "little") + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, shape, dtype = self._slots[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise MismatchError(
                f"tensor {name!r} is {list(tensor.shape)} {tensor.dtype}, its slot {list(shape)} {dtype}")
        if tensor.numel():
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._file.seek(self._data_start + offset)
            self._file.write(memoryview(data))

    def close(self) -> None:
        self._file.close()


def _safetensors_dtypes(dtypes: set[torch.dtype]) -> dict[torch.dtype, str]:
    """safetensors' code of each dtype, in the order in which safetensors lays out their data.

    Asked of safetensors itself (the order and the codes are its own, and may change between its
    versions): an empty tensor of each dtype, serialised, lists them in that order.
    """
    ordered = sorted(dtypes, key=str)
    blob = _safetensors_bytes({str(i): torch.empty(0, dtype=d) for i, d in enumerate(ordered)})
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    return {ordered[int(key)]: info["dtype"] for key, info in header.items() if key != "__metadata__"}
