"""Core regions (CPI-FT stage 1): each task's top-p% parameters by update magnitude.

For every task, |θ_task − θ_base| is computed tensor by tensor into one flat float32 vector (the
only whole-model buffer per task), the exact k-th largest magnitude is found
(:func:`cpift.selection.top_k`), and the core is stored as a bit-packed mask. The magnitudes are kept
so that :meth:`CoreRegions.with_p` answers a new p without reading the checkpoints again.

Saved regions come in two sizes. ``save(dir, magnitudes=True)`` keeps every |Δ| (4 bytes per
parameter and task: ``with_p`` answers any p exactly). ``save(dir, magnitudes=q, compress=True)``
keeps only the top q % as float16 and deflates masks and magnitudes: about 4 MB per task at q = 1
for a 135M model instead of 17 MB of mask and 540 MB of magnitudes, enough for run directories
that are shared or shipped. ``with_p`` then answers every p ≤ q (:attr:`CoreRegions.max_p`);
float16 keeps 11 significant bits, so masks at p < q may differ from the float32 ones only among
elements within 0.05 % of the threshold. A log-scale histogram of every task's |Δ| is saved
either way (:meth:`CoreRegions.histogram`).

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
from dataclasses import dataclass
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
from .masks import (WORD_BITS, Layout, from_positions, load_packed, popcount, positions, save_packed, tensor_counts,
                    unpack, unpack_all)
from .overlap import group_jaccard, group_sizes, jaccard_matrix, overlap_significance
from .selection import check_scope, k_for_percent, top_k, top_k_streamed, top_percent

FORMAT = "cpift.core_regions"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MASKS_FILE = "masks.safetensors"
COMPRESSED_MASKS_FILE = "masks.npz"
MAGNITUDES_FILE = "magnitudes.safetensors"
TOP_MAGNITUDES_FILE = "top_magnitudes.npz"


@dataclass(frozen=True)
class TopMagnitudes:
    """The largest |Δ| of one task only: flat layout ``indices`` (ascending) and their ``values``.

    Enough to select any core of at most ``len(indices)`` elements; the rest are known to be smaller.
    """

    indices: np.ndarray
    values: np.ndarray


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
        magnitudes: Mapping[str, np.ndarray | TopMagnitudes] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        *,
        max_p: float | None = None,
        histograms: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        self.layout = layout
        self.p = float(p)
        self.scope = scope
        self._masks = dict(masks)
        self._thresholds = dict(thresholds)
        self._magnitudes = dict(magnitudes) if magnitudes is not None else None
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None
        self._dense = self._magnitudes is not None and all(isinstance(m, np.ndarray) for m in self._magnitudes.values())
        if self._magnitudes is not None and not self._dense and max_p is None:
            raise ParameterError("regions holding the top magnitudes only need max_p, the q they were kept at")
        self.max_p: float | None = None if self._magnitudes is None else 100.0 if self._dense else float(max_p)
        """The largest p :meth:`with_p` answers: 100 with every |Δ| kept, q with the top q %, else None."""
        self._histograms = dict(histograms or {})

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

    def overlap_significance(self, by: str | None = None) -> pd.DataFrame:
        """Every task pair's Jaccard beside chance — the expected Jaccard of random cores of the
        same sizes, the lift over it and the hypergeometric p-value — over the whole model or
        per group (:func:`cpift.overlap.overlap_significance`)."""
        return overlap_significance(self._masks, self.layout, by)

    # -- changing p ------------------------------------------------------------------------

    @property
    def has_magnitudes(self) -> bool:
        """Whether |Δ| magnitudes are held, so that :meth:`with_p` can answer (up to :attr:`max_p`)."""
        return self._magnitudes is not None

    def magnitudes(self, task: str) -> np.ndarray:
        """The task's flat |Δ| vector over :attr:`layout` (padding holds -inf; read-only view)."""
        self._check_task(task)
        flat = self._magnitudes.get(task) if self._magnitudes is not None else None
        if not isinstance(flat, np.ndarray):
            raise ParameterError("these regions do not hold every |Δ| (saved without magnitudes or with the top q % only)")
        view = flat.view()
        view.flags.writeable = False
        return view

    def histogram(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """The distribution of the task's |Δ| over every element, on a log scale.

        Returns ``(edges, counts)``: ``counts[i]`` elements have ``edges[i] ≤ |Δ| < edges[i+1]``.
        ``edges[0]`` is 0 and ``edges[1:]`` step by a quarter octave (2^(1/4)), so the first bin
        holds the unchanged elements (and any below ``edges[1]``). Computed once from the
        magnitudes and saved with the regions, so compact saves keep it.
        """
        self._check_task(task)
        if task not in self._histograms:
            self._histograms[task] = log_histogram(self.magnitudes(task))
        return self._histograms[task]

    def with_p(self, p: float) -> CoreRegions:
        """The same tasks' cores at another p, from the kept magnitudes (no checkpoint is read).

        Answers any p up to :attr:`max_p`: every p when all |Δ| are held, p ≤ q when only the top
        q % were saved.
        """
        if self.max_p is None:
            raise ParameterError(
                "with_p needs the |Δ| magnitudes, which these regions do not hold "
                "(they were saved with magnitudes=False); recompute them with core_regions"
            )
        k_for_percent(p, 1)
        if p > self.max_p:
            raise ParameterError(f"p must be ≤ {self.max_p:g}: these regions keep only the top {self.max_p:g} % of |Δ|")
        masks, thresholds = _select(self._magnitudes, self.layout, p, self.scope)
        return CoreRegions(self.layout, p, self.scope, masks, thresholds, self._magnitudes, self.include, self.exclude,
                           max_p=self.max_p, histograms=self._histograms)

    def top_magnitudes(self, q: float) -> dict[str, TopMagnitudes]:
        """Every task's largest |Δ|: the elements of its core at p = q, with their magnitudes."""
        if q > (self.max_p or 0):
            raise ParameterError(f"q must be ≤ {self.max_p or 0:g}, the largest p these regions' magnitudes answer")
        masks = self.with_p(q)._masks if q != self.p else self._masks
        out = {}
        for task, words in masks.items():
            kept = self._magnitudes[task]
            indices = positions(words)
            if isinstance(kept, TopMagnitudes):
                values = kept.values[np.searchsorted(kept.indices, indices)]
            else:
                values = kept[indices]
            out[task] = TopMagnitudes(indices, values)
        return out

    # -- persistence -----------------------------------------------------------------------

    def save(
        self, directory: str | Path, *, magnitudes: bool | float = False, compress: bool = False,
        overwrite: bool = False,
    ) -> Path:
        """Write the regions to ``directory`` atomically (a temporary directory, then a rename).

        Masks are bit-packed in ``masks.safetensors`` (one ``uint8`` tensor per task; p, scope and
        the layout in its metadata) beside a JSON ``manifest.json`` that also holds each task's
        |Δ| histogram when magnitudes are known. ``compress=True`` deflates the masks into
        ``masks.npz`` instead. ``magnitudes=True`` saves every |Δ| (4 bytes per parameter and
        task), so that a loaded copy answers :meth:`with_p` for any p; ``magnitudes=q`` (a
        percentage) saves the top q % only, as float16 in ``top_magnitudes.npz``, so that it
        answers p ≤ q.
        """
        directory = Path(directory)
        keep_all = magnitudes is True
        keep_top = not isinstance(magnitudes, bool)
        if (keep_all or keep_top) and not self.has_magnitudes:
            raise ParameterError("these regions hold no magnitudes to save")
        if keep_all and not self._dense:
            raise ParameterError(f"these regions keep the top {self.max_p:g} % of |Δ| only: save magnitudes=q, q ≤ {self.max_p:g}")
        top = self.top_magnitudes(float(magnitudes)) if keep_top else None
        histograms = {t: self.histogram(t) for t in self.tasks} if self.has_magnitudes else self._histograms
        masks_file = COMPRESSED_MASKS_FILE if compress else MASKS_FILE
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
            "masks": masks_file,
            "magnitudes": MAGNITUDES_FILE if keep_all else TOP_MAGNITUDES_FILE if keep_top else None,
            "max_p": 100.0 if keep_all else float(magnitudes) if keep_top else None,
            "histograms": {t: {"edges": e.tolist(), "counts": c.tolist()} for t, (e, c) in histograms.items()},
            "layout": self.layout.to_json(),
        }
        metadata = {"format": FORMAT, "version": str(FORMAT_VERSION), "p": repr(self.p), "scope": self.scope}
        with atomic_dir(directory, overwrite=overwrite) as tmp:
            save_packed(tmp / masks_file, self._masks, self.layout, metadata)
            if keep_all:
                save_file(self._magnitudes, tmp / MAGNITUDES_FILE, metadata={"format": FORMAT})
            if top is not None:
                np.savez_compressed(tmp / TOP_MAGNITUDES_FILE, **_encode_top(top, self.layout))
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> CoreRegions:
        """Read regions written by :meth:`save`; a damaged or foreign directory gives a :class:`FormatError`."""
        directory = Path(directory)
        manifest = read_manifest(directory / MANIFEST, FORMAT, FORMAT_VERSION, "core-regions")
        layout = Layout.from_json(manifest["layout"])
        path = directory / manifest["masks"]
        mask_layout, masks, _ = load_packed(path)
        if mask_layout != layout:
            raise FormatError(f"{path}: the masks' layout differs from the manifest's")
        for task in manifest["tasks"]:
            if task not in masks:
                raise FormatError(f"{path}: no mask for task {task!r}")
            if popcount(masks[task]) != manifest["sizes"][task]:
                raise FormatError(f"{path}: mask of task {task!r} does not match the manifest")
        masks = {task: masks[task] for task in manifest["tasks"]}  # the manifest keeps the task order
        magnitudes = None
        if manifest["magnitudes"] == MAGNITUDES_FILE:
            magnitudes = _load_arrays(directory / MAGNITUDES_FILE, manifest["tasks"])
        elif manifest["magnitudes"] == TOP_MAGNITUDES_FILE:
            magnitudes = _decode_top(directory / TOP_MAGNITUDES_FILE, manifest["tasks"], layout)
        thresholds = {t: np.asarray(v, dtype=np.float64) for t, v in manifest["thresholds"].items()}
        histograms = {t: (np.asarray(h["edges"]), np.asarray(h["counts"], dtype=np.int64))
                      for t, h in manifest["histograms"].items()}
        return cls(layout, manifest["p"], manifest["scope"], masks, thresholds, magnitudes,
                   manifest.get("include"), manifest.get("exclude"),
                   max_p=manifest["max_p"], histograms=histograms)

    def __repr__(self) -> str:
        return f"CoreRegions(tasks={self.tasks}, p={self.p}, scope={self.scope!r}, numel={self.layout.numel})"


def _load_arrays(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of a safetensors or ``.npz`` file; a damaged file gives a FormatError."""
    try:
        if path.suffix == ".npz":
            with np.load(path) as archive:
                arrays = {k: archive[k] for k in keys if k in archive}
        else:
            arrays = load_file(path)
    except Exception as exc:  # safetensors and zipfile raise their own error types for damaged files
        raise FormatError(f"{path}: truncated or corrupt ({exc})") from exc
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise FormatError(f"{path}: no data for {missing[0]!r}")
    return {k: arrays[k] for k in keys}


def _encode_top(top: Mapping[str, TopMagnitudes], layout: Layout) -> dict[str, np.ndarray]:
    """Arrays for ``top_magnitudes.npz``: per task the indices as a packed mask, values as float16.

    Values are divided by the task's largest |Δ| first, so float16 keeps its full precision
    whatever the scale of the updates.
    """
    arrays = {}
    for task, kept in top.items():
        scale = np.float32(kept.values.max()) if kept.values.size and kept.values.max() > 0 else np.float32(1)
        arrays[f"{task}/indices"] = from_positions(kept.indices, layout.n_words).view(np.uint8)
        arrays[f"{task}/values"] = (kept.values / scale).astype(np.float16)
        arrays[f"{task}/scale"] = np.array(scale)
    return arrays


def _decode_top(path: Path, tasks: Sequence[str], layout: Layout) -> dict[str, TopMagnitudes]:
    keys = [f"{t}/{part}" for t in tasks for part in ("indices", "values", "scale")]
    arrays = _load_arrays(path, keys)
    out = {}
    for task in tasks:
        words = arrays[f"{task}/indices"]
        if words.size != layout.n_words * 8:
            raise FormatError(f"{path}: magnitudes of task {task!r} have the wrong length")
        indices = positions(words.view(np.uint64))
        values = arrays[f"{task}/values"].astype(np.float32) * arrays[f"{task}/scale"]
        if values.size != indices.size:
            raise FormatError(f"{path}: magnitudes of task {task!r} do not match their indices")
        out[task] = TopMagnitudes(indices, values)
    return out


def log_histogram(magnitudes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Counts of ``magnitudes`` (float32, ≥ 0; -inf padding ignored) in quarter-octave bins from 0.

    The bin of a float32 is read from its bit pattern (exponent and two leading mantissa bits), so
    one ``bincount`` over the integers does the whole model without a logarithm. Returns ``(edges,
    counts)`` with ``edges[0] = 0`` (see :meth:`CoreRegions.histogram`); empty bins at both ends
    are dropped.
    """
    bits = magnitudes.view(np.int32)
    counts = np.zeros(1024, dtype=np.int64)
    for start in range(0, bits.size, 1 << 24):
        chunk = bits[start : start + (1 << 24)]
        counts += np.bincount(chunk[chunk >= 0] >> 21, minlength=1024)[:1024]
    # Bin b covers [2^(b//4 - 127) · (1 + (b%4)/4), the next one); b < 4 holds zero and subnormals.
    bins = np.arange(1025)  # one more than the bins: the upper edge of the last
    lower = np.ldexp(1 + (bins % 4) / 4, bins // 4 - 127)
    lower[:4] = 0.0
    zero = int(counts[:4].sum())
    occupied = np.flatnonzero(counts[4:]) + 4
    if occupied.size == 0:
        return np.array([0.0, np.ldexp(1.0, -126)]), np.array([zero])
    first, last = occupied[0], occupied[-1]
    edges = np.concatenate([[0.0], lower[first : last + 2]])
    return edges, np.concatenate([[zero], counts[first : last + 1]])


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
    magnitudes: Mapping[str, np.ndarray | TopMagnitudes], layout: Layout, p: float, scope: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Packed masks and thresholds of every task at p (tasks in parallel threads: numpy releases the GIL)."""
    k_for_percent(p, layout.numel)  # validates p before any work
    tasks = list(magnitudes)

    def one(kept: np.ndarray | TopMagnitudes) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(kept, TopMagnitudes):
            return _select_top(kept, layout, p, scope)
        return top_percent(kept, layout, p, scope)

    with ThreadPoolExecutor(max_workers=min(len(tasks), 4)) as pool:
        results = list(pool.map(lambda t: one(magnitudes[t]), tasks))
    return {t: r[0] for t, r in zip(tasks, results)}, {t: r[1] for t, r in zip(tasks, results)}


def _select_top(kept: TopMagnitudes, layout: Layout, p: float, scope: str) -> tuple[np.ndarray, np.ndarray]:
    """The core at p among the kept largest magnitudes: the same top-k rule on far fewer elements.

    The kept indices are ascending, so the lowest-index tie rule carries over unchanged.
    """
    groups = [(0, layout.numel)] if scope == "global" else [
        (int(np.searchsorted(kept.indices, layout.starts[i])), int(layout.numels[i])) for i in range(len(layout.names))
    ]
    ends = [start for start, _ in groups[1:]] + [kept.indices.size]
    chosen, thresholds = [], []
    for (start, numel), end in zip(groups, ends):
        values = kept.values[start:end]
        padded = np.full(-(-values.size // 64) * 64, -np.inf, dtype=np.float32)
        padded[: values.size] = values
        selection = top_k(padded, k_for_percent(p, numel))
        chosen.append(kept.indices[start:end][positions(selection.words)])
        thresholds.append(selection.threshold)
    return from_positions(np.concatenate(chosen), layout.n_words), np.array(thresholds)


def _open_all(base: ModelLike, tuned: Mapping[str, ModelLike], include: Sequence[str] | None,
              exclude: Sequence[str] | None, allow_pickle: bool) -> tuple[Checkpoint, dict[str, Checkpoint], Layout]:
    """The base's and the tasks' checkpoints, opened lazily, and the layout of the tensors analysed."""
    if not tuned:
        raise ParameterError("core regions need at least one task model")
    base_ckpt = open_checkpoint(base, allow_pickle=allow_pickle, label="base")
    task_ckpts = {t: open_checkpoint(m, allow_pickle=allow_pickle, label=f"task {t!r}") for t, m in tuned.items()}
    names = aligned_names(base_ckpt, task_ckpts, select_names(base_ckpt, include, exclude))
    return base_ckpt, task_ckpts, Layout(tuple(names), tuple(base_ckpt.shape(n) for n in names))


def _delta_into(out: np.ndarray, base_tensor: torch.Tensor, task_ckpt: Checkpoint, name: str, task: str) -> None:
    """|θ_task − θ_base| of one tensor into ``out`` (float32, the tensor's elements); NaN or Inf
    raise :class:`CheckpointError` naming the model and the tensor."""
    view = torch.from_numpy(out).view(base_tensor.shape)
    torch.sub(task_ckpt.get(name).float(), base_tensor, out=view).abs_()
    if not all_finite(view):
        culprit = "base" if not all_finite(base_tensor) else f"task {task!r}"
        raise CheckpointError(f"{culprit}: tensor {name!r} holds NaN or Inf")


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
    base_ckpt, task_ckpts, layout = _open_all(base, tuned, include, exclude, allow_pickle)
    magnitudes = {t: np.empty(layout.padded_size, dtype=np.float32) for t in task_ckpts}
    for flat in magnitudes.values():
        for pad in layout.padding_spans():
            flat[pad] = -np.inf
    for name in tqdm(layout.names, desc="|Δθ|", unit="tensor", disable=None if progress is None else not progress):
        base_tensor = base_ckpt.get(name).float()
        for task, ckpt in task_ckpts.items():
            _delta_into(magnitudes[task][layout.span(name)], base_tensor, ckpt, name, task)
    for ckpt in (base_ckpt, *task_ckpts.values()):
        ckpt.close()
    return layout, magnitudes


def _streamed_core(base_ckpt: Checkpoint, task_ckpt: Checkpoint, task: str, layout: Layout, p: float,
                   scope: str, progress: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """One task's core without holding its |Δ| vector: tensor by tensor, read again for each pass
    of :func:`~cpift.selection.top_k_streamed` (global scope) or once (per-tensor scope)."""
    def chunks():
        for i, name in enumerate(tqdm(layout.names, desc=f"|Δθ| {task}", unit="tensor",
                                      disable=None if progress is None else not progress)):
            start = int(layout.starts[i])
            out = np.full(int(layout.starts[i + 1]) - start, -np.inf, dtype=np.float32)
            _delta_into(out[: int(layout.numels[i])], base_ckpt.get(name).float(), task_ckpt, name, task)
            yield start, out

    if scope == "global":
        selection = top_k_streamed(chunks, layout.padded_size, k_for_percent(p, layout.numel))
        return selection.words, np.array([selection.threshold])
    words = np.empty(layout.n_words, dtype=np.uint64)
    thresholds = np.empty(len(layout.names))
    for i, (start, scores) in enumerate(chunks()):
        selection = top_k(scores, k_for_percent(p, int(layout.numels[i])))
        words[start // WORD_BITS : start // WORD_BITS + selection.words.size] = selection.words
        thresholds[i] = selection.threshold
    return words, thresholds


def magnitudes_fit(base: ModelLike, n_tasks: int, *, allow_pickle: bool = False, share: float = 0.5) -> bool:
    """Whether every task's |Δ| vector (4 bytes per parameter and task, what ``keep_magnitudes``
    holds) fits in ``share`` of the memory available now; else compute cores with
    ``keep_magnitudes=False`` (streamed, p fixed)."""
    import psutil

    ckpt = open_checkpoint(base, allow_pickle=allow_pickle, label="base")
    try:
        numel = sum(ckpt.numel(name) for name in ckpt.names())
    finally:
        ckpt.close()
    return 4 * numel * n_tasks <= share * psutil.virtual_memory().available


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
            :meth:`CoreRegions.with_p` can answer. With False, no |Δ| vector is held: each task's
            exact top p% is found tensor by tensor in two passes over its checkpoints (three in
            rare cases; :func:`~cpift.selection.top_k_streamed`), so memory is the packed masks
            (an eighth of a byte per parameter and task) and a tensor at a time — what lets a
            7B-class pair run on a machine that cannot hold either model.
        progress: show a progress bar (default: when writing to a terminal).

    Raises:
        ParameterError: p or scope out of range, no task, or patterns that leave no tensor.
        MismatchError: a task's tensor names or shapes differ from the base's.
        CheckpointError: a missing, corrupt or non-finite checkpoint.
    """
    k_for_percent(p, 1)
    check_scope(scope)
    options = {"include": include, "exclude": exclude, "allow_pickle": allow_pickle, "progress": progress}
    if keep_magnitudes:
        layout, magnitudes = update_magnitudes(base, tuned, **options)
        masks, thresholds = _select(magnitudes, layout, p, scope)
        return CoreRegions(layout, p, scope, masks, thresholds, magnitudes, include, exclude)
    base_ckpt, task_ckpts, layout = _open_all(base, tuned, include, exclude, allow_pickle)
    k_for_percent(p, layout.numel)  # validates p before any pass
    masks, thresholds = {}, {}
    try:
        for task, ckpt in task_ckpts.items():
            masks[task], thresholds[task] = _streamed_core(base_ckpt, ckpt, task, layout, p, scope, progress)
    finally:
        for ckpt in (base_ckpt, *task_ckpts.values()):
            ckpt.close()
    return CoreRegions(layout, p, scope, masks, thresholds, None, include, exclude)

