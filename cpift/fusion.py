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
are copied from the base. Tensors are processed one at a time, so :func:`fusion_report` needs
memory for one tensor per task only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from .checkpoint import ModelLike, aligned_names, open_checkpoint
from .errors import MismatchError, ParameterError
from .regions import CoreRegions

OVERLAP_RULES = ("max_delta", "last", "mean")
FOLDS = ("mean", "sequential")


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical linear interpolation of two tensors, as mergekit does it.

    In float32: the flattened tensors' normalised copies give cos θ₀; if |cos θ₀| > ``dot_threshold``
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


def _slerp_flat(a: torch.Tensor, b: torch.Tensor, t: float, cos: float, dot_threshold: float = 0.9995) -> torch.Tensor:
    """SLERP of two flat float32 tensors whose cosine is already known (see :func:`slerp`)."""
    if t == 0:  # exact endpoints, whatever rounding the formula would do
        return a
    if t == 1:
        return b
    if abs(cos) > dot_threshold:
        return torch.lerp(a, b, t)
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return (a * (math.sin((1 - t) * theta) / sin_theta)).add_(b, alpha=math.sin(t * theta) / sin_theta)


def _cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> float:
    """cos of the angle between two flat float32 tensors (mergekit: a zero-norm side is not scaled).

    Equal tensors give exactly 1 (float32 rounding would otherwise report a small angle).
    """
    if torch.equal(a, b):
        return 1.0 if a.norm().item() > eps else 0.0
    na, nb = a.norm().item(), b.norm().item()
    dot = torch.dot(a, b).item() / ((na if na > eps else 1.0) * (nb if nb > eps else 1.0))
    return max(-1.0, min(1.0, dot))


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
) -> Iterator[_FusedTensor]:
    """Fuse tensor by tensor, yielding each fused tensor with its report row."""
    _check_unit("omega", omega)
    if overlap not in OVERLAP_RULES:
        raise ParameterError(f"overlap must be one of {', '.join(OVERLAP_RULES)}; got {overlap!r}")
    if fold not in FOLDS:
        raise ParameterError(f"fold must be one of {', '.join(FOLDS)}; got {fold!r}")
    if list(tuned) != regions.tasks:
        raise MismatchError(f"the task models {list(tuned)} are not the regions' tasks {regions.tasks}")
    base_ckpt = open_checkpoint(base, allow_pickle=allow_pickle, label="base")
    task_ckpts = {t: open_checkpoint(m, allow_pickle=allow_pickle, label=f"task {t!r}") for t, m in tuned.items()}
    names = aligned_names(base_ckpt, task_ckpts, base_ckpt.names())
    for name, shape in zip(regions.layout.names, regions.layout.shapes):
        if name not in base_ckpt or base_ckpt.shape(name) != shape:
            found = list(base_ckpt.shape(name)) if name in base_ckpt else "no such tensor"
            raise MismatchError(f"the regions' tensor {name!r} of shape {list(shape)} does not fit the base ({found})")
    tasks = regions.tasks
    in_layout = set(regions.layout.names)
    for name in tqdm(names, desc="fuse", unit="tensor", disable=None if progress is None else not progress):
        base_tensor = base_ckpt.get(name)
        row: dict = {"tensor": name, "numel": base_tensor.numel(), "contested": 0}
        if not base_tensor.dtype.is_floating_point:
            yield _FusedTensor(name, base_tensor, row)
            continue
        b = base_tensor.float().reshape(-1)
        values = [task_ckpts[t].get(name).float().reshape(-1) for t in tasks]
        cosines = [_cosine(b, v) for v in values]
        for task, cos in zip(tasks, cosines):
            row[f"angle:{task}"] = math.degrees(math.acos(cos))
        if omega == 0:  # every SLERP is the base; skip the averaging's rounding
            fused = b
        elif fold == "mean":
            fused = torch.zeros_like(b)
            for v, cos in zip(values, cosines):
                fused += _slerp_flat(b, v, omega, cos)
            fused /= len(values)
        else:
            fused = b
            for v in values:
                fused = _slerp_flat(fused, v, omega, _cosine(fused, v))
        if name in in_layout:
            masks = [regions.tensor_mask(t, name).reshape(-1) for t in tasks]
            fused, owned, row["contested"] = _transplant(fused, b, values, masks, overlap)
            row.update({f"from:{task}": n for task, n in zip(tasks, owned)})
        yield _FusedTensor(name, fused.reshape(base_tensor.shape).to(base_tensor.dtype), row)
    for ckpt in (base_ckpt, *task_ckpts.values()):
        ckpt.close()


def _transplant(
    fused: torch.Tensor, base: torch.Tensor, values: list[torch.Tensor], masks: list[torch.Tensor], overlap: str
) -> tuple[torch.Tensor, list[int], int]:
    """Write each task's core values into ``fused`` (flat float32), resolving contested elements.

    Tasks are visited in order with one running result, so memory stays at a few copies of one
    tensor whatever the number of tasks. Returns the result, how many values each task supplied
    (for ``mean``: the elements it alone owns), and the number of contested elements.
    """
    count = torch.zeros(base.shape, dtype=torch.int32)
    for mask in masks:
        count += mask
    contested = int((count > 1).sum())
    if overlap == "mean":
        total = torch.zeros_like(base)
        for mask, value in zip(masks, values):
            total += torch.where(mask, value, 0.0)
        result = torch.where(count > 0, total / count.clamp(min=1), fused)
        return result, [int((mask & (count == 1)).sum()) for mask in masks], contested
    result = fused.clone()
    best = torch.full(base.shape, -1.0)
    winner = torch.full(base.shape, -1, dtype=torch.int64)
    for i, (mask, value) in enumerate(zip(masks, values)):
        if overlap == "last":  # every later owner overrides
            take = mask
        else:  # max_delta: strictly larger |Δ| overrides, so ties stay with the earlier task
            score = torch.where(mask, (value - base).abs(), -1.0)
            take = score > best
            best = torch.where(take, score, best)
        result = torch.where(take, value, result)
        winner[take] = i
    owned = torch.bincount(winner + 1, minlength=len(values) + 1)[1:]
    return result, owned.tolist(), contested


def fuse(
    base: ModelLike,
    tuned: Mapping[str, ModelLike],
    regions: CoreRegions,
    omega: float = 0.5,
    overlap: str = "max_delta",
    *,
    fold: str = "mean",
    allow_pickle: bool = False,
    progress: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Fuse the task models into one state dict: core transplant plus SLERP (see module docs).

    Args:
        base: the base of the fusion (the pretrained model, or the last fine-tuning stage's).
        tuned: task name → task model, the same tasks in the same order as ``regions``.
        regions: the tasks' core regions.
        omega: SLERP factor ω in [0, 1] for non-core elements (0 keeps the base).
        overlap: rule for elements in several cores: ``max_delta``, ``last`` or ``mean``.
        fold: how several tasks' SLERPs combine: ``mean`` or ``sequential``.

    Returns every tensor of the base (tied weights once), in the base's dtypes.
    """
    return {f.name: f.tensor for f in _fuse_tensors(base, tuned, regions, omega, overlap, fold, allow_pickle, progress)}


def fusion_report(
    base: ModelLike,
    tuned: Mapping[str, ModelLike],
    regions: CoreRegions,
    omega: float = 0.5,
    overlap: str = "max_delta",
    *,
    fold: str = "mean",
    allow_pickle: bool = False,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Per tensor: elements taken from each task's core (``from:TASK``), contested elements, and
    the angle in degrees between the base and each task tensor (``angle:TASK``).

    Same arguments as :func:`fuse`; holds one tensor per model at a time.
    """
    rows = [f.row for f in _fuse_tensors(base, tuned, regions, omega, overlap, fold, allow_pickle, progress)]
    return pd.DataFrame(rows).fillna(0)
