"""Core regions (CPI-FT stage 1): each task's top-p% parameters by update magnitude.

For every task, |θ_task − θ_base| is computed tensor by tensor into one flat float32 vector (the
only whole-model buffer per task), the exact k-th largest magnitude is found
(:func:`cpift.selection.top_k`), and the core is stored as a bit-packed mask. The magnitudes are kept
so that :meth:`CoreRegions.with_p` answers a new p without reading the checkpoints again.

Choices the paper leaves open (documented here and in the README):

- k = floor(p·D/100) exactly, D = number of elements of the considered tensors (by default every
  floating-point tensor, tied weights once). Ties at the threshold go to the lowest flat index
  (tensors in storage order, elements in row-major order).
- ``scope="tensor"`` takes floor(p·n/100) elements inside each tensor of n elements instead.
- ``include`` / ``exclude`` are shell-style patterns (``fnmatch``) on tensor names, e.g.
  ``exclude=["*embed_tokens*"]`` to leave the embeddings out of the analysis.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm

from .atomic import atomic_dir
from .checkpoint import Checkpoint, ModelLike, aligned_names, all_finite, open_checkpoint
from .errors import CheckpointError, FormatError, ParameterError
from .manifest import manifest_header, read_manifest
from .masks import Layout, popcount, tensor_counts, unpack, unpack_all
from .overlap import group_jaccard, group_sizes, jaccard_matrix
from .selection import k_for_percent, top_k

SCOPES = ("global", "tensor")
FORMAT = "cpift.core_regions"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MASKS_FILE = "masks.safetensors"
MAGNITUDES_FILE = "magnitudes.safetensors"


class CoreRegions:
    """Each task's core region over one model layout, stored as bit-packed masks.

    Build it with :func:`core_regions` or :meth:`load`. Masks are exact: every task's core has
    ``k`` elements (per tensor with ``scope="tensor"``).
    """

    def __init__(
        self,
        layout: Layout,
        p: float,
        scope: str,
        masks: Mapping[str, np.ndarray],
        thresholds: Mapping[str, np.ndarray],
        magnitudes: Mapping[str, np.ndarray] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
    ) -> None:
        self.layout = layout
        self.p = float(p)
        self.scope = scope
        self._masks = dict(masks)
        self._thresholds = dict(thresholds)
        self._magnitudes = dict(magnitudes) if magnitudes is not None else None
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None

    # -- what a task's core is -------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        """Task names, in input order."""
        return list(self._masks)

    def _check_task(self, task: str) -> None:
        if task not in self._masks:
            raise ParameterError(f"unknown task {task!r}; the regions hold {', '.join(self.tasks)}")

    def mask(self, task: str) -> dict[str, torch.Tensor]:
        """The task's core as boolean tensors keyed by parameter name, in the parameters' shapes."""
        self._check_task(task)
        return unpack_all(self._masks[task], self.layout)

    def tensor_mask(self, task: str, name: str) -> torch.Tensor:
        """The task's core inside one tensor."""
        self._check_task(task)
        return unpack(self._masks[task], self.layout, name)

    def packed(self, task: str) -> np.ndarray:
        """The task's core as a packed ``uint64`` mask over :attr:`layout` (read-only view)."""
        self._check_task(task)
        view = self._masks[task].view()
        view.flags.writeable = False
        return view

    def size(self, task: str) -> int:
        """Number of elements in the task's core."""
        self._check_task(task)
        return popcount(self._masks[task])

    def threshold(self, task: str, tensor: str | None = None) -> float:
        """The smallest |Δ| inside the core (the k-th largest magnitude).

        With ``scope="tensor"`` every tensor has its own threshold: name it with ``tensor``.
        """
        self._check_task(task)
        values = self._thresholds[task]
        if self.scope == "global":
            return float(values[0])
        if tensor is None:
            raise ParameterError("with scope='tensor' each tensor has its own threshold: pass tensor=NAME")
        return float(values[self.layout.index(tensor)])

    def tensor_sizes(self, task: str) -> pd.Series:
        """Core elements per tensor, indexed by tensor name."""
        self._check_task(task)
        return pd.Series(tensor_counts(self._masks[task], self.layout), index=list(self.layout.names))

    def sizes(self, by: str = "layer") -> pd.DataFrame:
        """Core elements per group and task: columns ``group, task, size, numel, share``."""
        return group_sizes(self._masks, self.layout, by)

    # -- overlap ---------------------------------------------------------------------------

    def jaccard(self) -> pd.DataFrame:
        """Task × task Jaccard similarity of the cores (diagonal 1)."""
        return jaccard_matrix(self._masks)

    def layer_jaccard(self, by: str = "layer") -> pd.DataFrame:
        """Per-group Jaccard of every task pair: columns ``group, task_a, task_b, jaccard``.

        ``by="layer"``: transformer block index (other tensors as ``embed``, ``head``, ``other``);
        ``by="module"``: projection type (``self_attn.q_proj``, ``mlp.down_proj``, …);
        ``by="tensor"``: each tensor. Also gives the ``intersection`` and ``union`` counts.
        """
        return group_jaccard(self._masks, self.layout, by)

    # -- changing p ------------------------------------------------------------------------

    @property
    def has_magnitudes(self) -> bool:
        """Whether the |Δ| magnitudes are held, so that :meth:`with_p` can answer."""
        return self._magnitudes is not None

    def magnitudes(self, task: str) -> np.ndarray:
        """The task's flat |Δ| vector over :attr:`layout` (padding holds -inf; read-only view)."""
        self._check_task(task)
        if self._magnitudes is None:
            raise ParameterError("these regions were saved without magnitudes")
        view = self._magnitudes[task].view()
        view.flags.writeable = False
        return view

    def with_p(self, p: float) -> CoreRegions:
        """The same tasks' cores at another p, from the kept magnitudes (no checkpoint is read)."""
        if self._magnitudes is None:
            raise ParameterError(
                "with_p needs the |Δ| magnitudes, which these regions do not hold "
                "(they were saved with magnitudes=False); recompute them with core_regions"
            )
        masks, thresholds = _select(self._magnitudes, self.layout, p, self.scope)
        return CoreRegions(self.layout, p, self.scope, masks, thresholds, self._magnitudes, self.include, self.exclude)

    # -- persistence -----------------------------------------------------------------------

    def save(self, directory: str | Path, *, magnitudes: bool = False, overwrite: bool = False) -> Path:
        """Write the regions to ``directory`` atomically (a temporary directory, then a rename).

        Masks are bit-packed in ``masks.safetensors`` (one ``uint8`` tensor per task; p, scope and
        the layout in its metadata) beside a JSON ``manifest.json``. With ``magnitudes=True`` the
        |Δ| vectors are saved too (4 bytes per parameter and task), so that a loaded copy can
        answer :meth:`with_p`.
        """
        directory = Path(directory)
        manifest = {
            **manifest_header(FORMAT, FORMAT_VERSION),
            "p": self.p,
            "scope": self.scope,
            "tasks": self.tasks,
            "include": self.include,
            "exclude": self.exclude,
            "numel": self.layout.numel,
            "sizes": {t: self.size(t) for t in self.tasks},
            "thresholds": {t: self._thresholds[t].tolist() for t in self.tasks},
            "magnitudes": MAGNITUDES_FILE if magnitudes and self.has_magnitudes else None,
            "layout": self.layout.to_json(),
        }
        metadata = {"format": FORMAT, "version": str(FORMAT_VERSION), "p": repr(self.p), "scope": self.scope,
                    "layout": json.dumps(self.layout.to_json())}
        with atomic_dir(directory, overwrite=overwrite) as tmp:
            save_file({t: w.view(np.uint8) for t, w in self._masks.items()}, tmp / MASKS_FILE, metadata=metadata)
            if manifest["magnitudes"]:
                save_file(self._magnitudes, tmp / MAGNITUDES_FILE, metadata={"format": FORMAT})
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> CoreRegions:
        """Read regions written by :meth:`save`; a damaged or foreign directory gives a :class:`FormatError`."""
        directory = Path(directory)
        manifest = read_manifest(directory / MANIFEST, FORMAT, FORMAT_VERSION, "core-regions")
        layout = Layout.from_json(manifest["layout"])
        masks = _load_arrays(directory / MASKS_FILE, manifest["tasks"])
        for task in manifest["tasks"]:
            words = masks[task]
            if words.size != layout.n_words * 8:
                raise FormatError(f"{directory / MASKS_FILE}: mask of task {task!r} has the wrong length")
            masks[task] = words.view(np.uint64)
            if popcount(masks[task]) != manifest["sizes"][task]:
                raise FormatError(f"{directory / MASKS_FILE}: mask of task {task!r} does not match the manifest")
        magnitudes = None
        if manifest.get("magnitudes"):
            magnitudes = _load_arrays(directory / manifest["magnitudes"], manifest["tasks"])
        thresholds = {t: np.asarray(v, dtype=np.float64) for t, v in manifest["thresholds"].items()}
        return cls(layout, manifest["p"], manifest["scope"], masks, thresholds, magnitudes,
                   manifest.get("include"), manifest.get("exclude"))

    def __repr__(self) -> str:
        return f"CoreRegions(tasks={self.tasks}, p={self.p}, scope={self.scope!r}, numel={self.layout.numel})"


def _load_arrays(path: Path, tasks: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        arrays = load_file(path)
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise FormatError(f"{path}: truncated or corrupt ({exc})") from exc
    missing = [t for t in tasks if t not in arrays]
    if missing:
        raise FormatError(f"{path}: no data for task {missing[0]!r}")
    return {t: arrays[t] for t in tasks}


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns or ())


def select_names(checkpoint: Checkpoint, include: Sequence[str] | None, exclude: Sequence[str] | None) -> list[str]:
    """The floating-point tensors of ``checkpoint`` kept by the include / exclude patterns."""
    names = [
        n for n in checkpoint.floating_names()
        if (include is None or _matches(n, include)) and not _matches(n, exclude)
    ]
    if not names:
        raise ParameterError(f"include={include!r} / exclude={exclude!r} leave no tensor of {checkpoint.label}")
    return names


def _select(
    magnitudes: Mapping[str, np.ndarray], layout: Layout, p: float, scope: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Packed masks and thresholds of every task at p (tasks in parallel threads: numpy releases the GIL)."""
    k_for_percent(p, layout.numel)  # validates p before any work

    def one(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if scope == "global":
            selection = top_k(flat, k_for_percent(p, layout.numel))
            return selection.words, np.array([selection.threshold])
        words = np.empty(layout.n_words, dtype=np.uint64)
        thresholds = np.empty(len(layout.names))
        for i, name in enumerate(layout.names):
            span = layout.word_span(name)
            selection = top_k(flat[span.start * 64 : span.stop * 64], k_for_percent(p, int(layout.numels[i])))
            words[span] = selection.words
            thresholds[i] = selection.threshold
        return words, thresholds

    tasks = list(magnitudes)
    with ThreadPoolExecutor(max_workers=min(len(tasks), 4)) as pool:
        results = list(pool.map(one, (magnitudes[t] for t in tasks)))
    return {t: r[0] for t, r in zip(tasks, results)}, {t: r[1] for t, r in zip(tasks, results)}


def update_magnitudes(
    base: ModelLike,
    tuned: Mapping[str, ModelLike],
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    allow_pickle: bool = False,
    progress: bool | None = None,
) -> tuple[Layout, dict[str, np.ndarray]]:
    """|θ_task − θ_base| of every task as one flat float32 vector over a shared :class:`Layout`.

    Tensors are read one at a time, the base's once for all tasks. Padding holds -inf so that it is
    never selected. Raises :class:`MismatchError` when a task's tensors differ from the base's
    and :class:`CheckpointError` naming the model and tensor on NaN or Inf.
    """
    if not tuned:
        raise ParameterError("core regions need at least one task model")
    base_ckpt = open_checkpoint(base, allow_pickle=allow_pickle, label="base")
    task_ckpts = {t: open_checkpoint(m, allow_pickle=allow_pickle, label=f"task {t!r}") for t, m in tuned.items()}
    names = aligned_names(base_ckpt, task_ckpts, select_names(base_ckpt, include, exclude))
    layout = Layout(tuple(names), tuple(base_ckpt.shape(n) for n in names))
    magnitudes = {t: np.empty(layout.padded_size, dtype=np.float32) for t in task_ckpts}
    for flat in magnitudes.values():
        for pad in layout.padding_spans():
            flat[pad] = -np.inf
    for name in tqdm(names, desc="|Δθ|", unit="tensor", disable=None if progress is None else not progress):
        base_tensor = base_ckpt.get(name).float()
        for task, ckpt in task_ckpts.items():
            out = torch.from_numpy(magnitudes[task][layout.span(name)]).view(base_tensor.shape)
            torch.sub(ckpt.get(name).float(), base_tensor, out=out).abs_()
            if not all_finite(out):
                culprit = "base" if not all_finite(base_tensor) else f"task {task!r}"
                raise CheckpointError(f"{culprit}: tensor {name!r} holds NaN or Inf")
    for ckpt in (base_ckpt, *task_ckpts.values()):
        ckpt.close()
    return layout, magnitudes


def core_regions(
    base: ModelLike,
    tuned: Mapping[str, ModelLike],
    p: float,
    scope: str = "global",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    allow_pickle: bool = False,
    keep_magnitudes: bool = True,
    progress: bool | None = None,
) -> CoreRegions:
    """Each task's core region: the top p% of parameters by |θ_task − θ_base|.

    Args:
        base: the model the tasks were fine-tuned from (any form :func:`cpift.open_checkpoint` takes).
        tuned: task name → fine-tuned model, in the order that defines :attr:`CoreRegions.tasks`.
        p: percentage of parameters in each core, 0 < p ≤ 100 (paper default 1).
        scope: ``"global"`` (top p% of the whole model) or ``"tensor"`` (top p% of each tensor).
        include, exclude: shell-style patterns on tensor names that select the tensors analysed.
        allow_pickle: accept ``.bin`` / ``.pt`` checkpoints (loaded with ``weights_only=True``).
        keep_magnitudes: keep every task's |Δ| vector (4 bytes per parameter and task) so that
            :meth:`CoreRegions.with_p` can answer. With False, tasks are done one at a time and
            peak memory is one fp32 copy of the parameters whatever the number of tasks.
        progress: show a progress bar (default: when writing to a terminal).

    Raises:
        ParameterError: p or scope out of range, no task, or patterns that leave no tensor.
        MismatchError: a task's tensor names or shapes differ from the base's.
        CheckpointError: a missing, corrupt or non-finite checkpoint.
    """
    k_for_percent(p, 1)
    if scope not in SCOPES:
        raise ParameterError(f"scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    options = {"include": include, "exclude": exclude, "allow_pickle": allow_pickle, "progress": progress}
    if keep_magnitudes:
        layout, magnitudes = update_magnitudes(base, tuned, **options)
        masks, thresholds = _select(magnitudes, layout, p, scope)
        return CoreRegions(layout, p, scope, masks, thresholds, magnitudes, include, exclude)
    if not tuned:
        raise ParameterError("core regions need at least one task model")
    masks, thresholds = {}, {}
    for task, model in tuned.items():
        layout, magnitude = update_magnitudes(base, {task: model}, **options)
        one_mask, one_threshold = _select(magnitude, layout, p, scope)
        masks.update(one_mask)
        thresholds.update(one_threshold)
        del magnitude
    return CoreRegions(layout, p, scope, masks, thresholds, None, include, exclude)

