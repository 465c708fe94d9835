"""Importance scores and the sparse masks they select: GaLLoP, SAFT, PaFi and EPI's online importance.

Sparse fine-tuning trains a small set of the model's own elements. Which ones is decided by a
score per element and an exact top-k (:func:`cpift.selection.top_percent`, ties to the lowest flat
index, exactly floor(density·D/100) elements):

- ``gallop`` — |g| / (|θ| + ε), ε = 1e-8 (GaLLoP: large gradient on a small weight);
- ``saft`` — |g| (SAFT: the largest gradients);
- ``pafi`` — −|θ| (PaFi: the smallest weights; the gradient is not needed);
- any callable ``(param, grad) -> scores`` of the parameter's shape.

g is the mean gradient of the training loss over a subset of the data
(:func:`cpift.train.estimate_gradients`). Scores go into one flat float32 vector over a
:class:`~cpift.masks.Layout` of the tensors (in the order given; padding ``-inf``), so a whole-model
selection is one vectorised pass.

EPI (evolving parameter isolation) needs an importance that follows training:
:class:`ImportanceTracker` keeps an exponential moving average of squared gradients per element,
I ← β·I + (1 − β)·g², and on each :meth:`ImportanceTracker.refresh` makes the global top p% of the
*normalised* importance the protected set. Normalisation (option ``normalise``, the paper says only
"within each layer"): each element's EMA is divided by the mean EMA of its group — ``"tensor"``
(each weight matrix, i.e. each ``nn.Linear``; the default), ``"layer"`` (each transformer block,
as :func:`cpift.overlap.layer_of` names them) or ``"none"``. Dividing by the group mean puts
tensors whose gradients differ by orders of magnitude (embeddings, norms, projections) on one
scale, so the global top p% is not taken by one tensor; a group whose importance is all zero
scores zero. The EMA is not bias-corrected: the correction is one factor for every element and
cannot change the selection. Each refresh records its Jaccard similarity with the previous and the
first protected set, and how many elements joined and left — the importance-drift curve.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .checkpoint import all_finite
from .errors import MismatchError, ParameterError
from .masks import Layout, popcount, unpack_all
from .overlap import group_labels, jaccard
from .selection import check_scope, k_for_percent, top_percent

__all__ = ["EPSILON", "NORMALISATIONS", "SCORES", "ImportanceTracker", "sparse_mask", "sparse_scores"]

EPSILON = 1e-8
"""GaLLoP's ε in |g| / (|θ| + ε)."""

ScoreFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

SCORES: dict[str, ScoreFn] = {
    "gallop": lambda param, grad: grad.abs() / (param.abs() + EPSILON),
    "saft": lambda param, grad: grad.abs(),
    "pafi": lambda param, grad: -param.abs(),
}
"""Score name → ``(param, grad) -> score`` on float32 tensors (larger is selected first)."""

NEEDS_GRADIENT = frozenset({"gallop", "saft"})
"""The built-in scores that read the gradient (``pafi`` does not)."""

NORMALISATIONS = ("tensor", "layer", "none")
"""Groups within which EPI's importance is normalised by its mean (see the module docstring)."""


def _score_fn(score: str | ScoreFn) -> ScoreFn:
    if callable(score):
        return score
    if score not in SCORES:
        raise ParameterError(f"score must be one of {', '.join(SCORES)} or a callable (param, grad) -> scores; "
                             f"got {score!r}")
    return SCORES[score]


def sparse_scores(
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor] | None,
    score: str | ScoreFn = "gallop",
) -> tuple[Layout, np.ndarray]:
    """Every element's score as one flat float32 vector over a :class:`Layout` of ``params``.

    Args:
        params: tensor name → parameter values (any device and floating dtype; read as float32).
        grads: tensor name → gradient of the same shape, for exactly the names of ``params``;
            may be ``None`` for ``score="pafi"``, which does not read it.
        score: ``"gallop"``, ``"saft"``, ``"pafi"`` or a callable ``(param, grad) -> scores``
            given float32 CPU tensors (``grad`` is None when ``grads`` is) and returning finite
            scores of the parameter's shape.

    Returns:
        ``(layout, scores)``: tensors in the order of ``params``; padding holds ``-inf``.

    Raises:
        ParameterError: an unknown score, no tensor, no gradients for a score that needs them,
            NaN or Inf in a parameter, gradient or score (naming the tensor).
        MismatchError: ``grads`` names other tensors than ``params``, or a shape differs.
    """
    fn = _score_fn(score)
    if not params:
        raise ParameterError("sparse scores need at least one parameter tensor")
    if grads is None and not callable(score) and score in NEEDS_GRADIENT:
        raise ParameterError(f"score {score!r} needs the gradients; grads is None")
    if grads is not None and set(grads) != set(params):
        missing = sorted(set(params) - set(grads))
        extra = sorted(set(grads) - set(params))
        what = f"no gradient for {missing[0]!r}" if missing else f"a gradient for unknown tensor {extra[0]!r}"
        raise MismatchError(f"grads and params must name the same tensors: {what}")
    layout = Layout(tuple(params), tuple(tuple(p.shape) for p in params.values()))
    flat = np.full(layout.padded_size, -np.inf, dtype=np.float32)
    for name, param in params.items():
        value = param.detach().float().cpu()
        if not all_finite(value):
            raise ParameterError(f"parameter {name!r} holds NaN or Inf")
        grad = None
        if grads is not None:
            grad = grads[name].detach().float().cpu()
            if grad.shape != value.shape:
                raise MismatchError(f"gradient of {name!r} has shape {list(grad.shape)}, "
                                    f"the parameter has {list(value.shape)}")
            if not all_finite(grad):
                raise ParameterError(f"gradient of {name!r} holds NaN or Inf")
        scores = torch.as_tensor(fn(value, grad))
        if scores.shape != value.shape:
            raise MismatchError(f"score of {name!r} has shape {list(scores.shape)}, "
                                f"the parameter has {list(value.shape)}")
        scores = scores.float()
        if not all_finite(scores):
            raise ParameterError(f"score of {name!r} holds NaN or Inf")
        flat[layout.span(name)] = scores.reshape(-1).numpy()
    return layout, flat


def sparse_mask(
    params: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor] | None,
    density: float,
    score: str | ScoreFn = "gallop",
    scope: str = "global",
) -> dict[str, torch.Tensor]:
    """The elements to train: the top ``density`` percent of ``score``, as boolean masks.

    Exactly floor(density·D/100) elements are selected (D = total elements of ``params``; with
    ``scope="tensor"`` floor(density·n/100) in each tensor of n elements); ties go to the lowest
    flat index (tensors in the order of ``params``, elements row-major). See :func:`sparse_scores`
    for ``params``, ``grads`` and ``score``.

    Returns:
        Tensor name → ``torch.bool`` mask of the parameter's shape (on the CPU), True = trained.

    Raises:
        ParameterError: density outside (0, 100], an unknown score or scope, non-finite values.
        MismatchError: ``params`` and ``grads`` differ in names or shapes.
    """
    k_for_percent(density, 1, "density")
    check_scope(scope)
    layout, flat = sparse_scores(params, grads, score)
    words, _ = top_percent(flat, layout, density, scope)
    return unpack_all(words, layout)


class ImportanceTracker:
    """EPI's online importance over named tensors and the protected set it selects.

    Args:
        shapes: tensor name → shape (or a tensor), in the order that defines the flat layout.
        p: protected share in percent, 0 < p ≤ 100 (exactly floor(p·D/100) elements).
        beta: EMA factor in [0, 1): I ← β·I + (1 − β)·g².
        normalise: ``"tensor"``, ``"layer"`` or ``"none"`` (see the module docstring).
        scope: ``"global"`` top p% of the model, or ``"tensor"``: top p% of each tensor.

    Use: :meth:`update` after each backward pass, :meth:`refresh` every R steps; :meth:`frozen`
    gives the protected set as masks for :class:`~cpift.freezing.MaskedOptimizer`;
    :meth:`state_dict` / :meth:`load_state_dict` make it resumable.
    """

    def __init__(self, shapes: Mapping[str, Any], p: float, beta: float = 0.9, normalise: str = "tensor",
                 scope: str = "global") -> None:
        k_for_percent(p, 1)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ParameterError(f"beta must be in [0, 1), got {beta!r}")
        if normalise not in NORMALISATIONS:
            raise ParameterError(f"normalise must be one of {', '.join(NORMALISATIONS)}; got {normalise!r}")
        check_scope(scope)
        if not shapes:
            raise ParameterError("an importance tracker needs at least one tensor")
        self.layout = Layout(tuple(shapes), tuple(tuple(getattr(s, "shape", s)) for s in shapes.values()))
        self.p, self.beta, self.normalise, self.scope = float(p), float(beta), normalise, scope
        self.k = k_for_percent(p, self.layout.numel)
        self.updates = 0
        self.protected: np.ndarray | None = None
        self.first: np.ndarray | None = None
        self.history: list[dict[str, Any]] = []
        self._ema: dict[str, torch.Tensor] = {}
        labels = group_labels(self.layout, "tensor" if normalise == "none" else normalise)
        _, self._group = np.unique(labels, return_inverse=True)

    def update(self, grads: Mapping[str, torch.Tensor | None]) -> None:
        """Fold one step's gradients in: I ← β·I + (1 − β)·g² (a missing or None gradient counts as 0).

        The EMA lives on each gradient's device, in float32.
        """
        for name, shape in zip(self.layout.names, self.layout.shapes):
            grad = grads.get(name)
            ema = self._ema.get(name)
            if grad is not None and tuple(grad.shape) != shape:
                raise MismatchError(f"gradient of {name!r} has shape {list(grad.shape)}, expected {list(shape)}")
            if ema is None:
                device = grad.device if grad is not None else "cpu"
                ema = self._ema[name] = torch.zeros(shape, dtype=torch.float32, device=device)
            elif grad is not None and ema.device != grad.device:  # restored on the CPU, training elsewhere
                ema = self._ema[name] = ema.to(grad.device)
            ema.mul_(self.beta)
            if grad is not None:
                g = grad.detach().float()
                ema.addcmul_(g, g, value=1 - self.beta)
        self.updates += 1

    def importance(self) -> np.ndarray:
        """The normalised importance as a flat float32 vector over :attr:`layout` (padding ``-inf``)."""
        flat = np.full(self.layout.padded_size, -np.inf, dtype=np.float32)
        sums = np.zeros(len(self.layout.names))
        for i, name in enumerate(self.layout.names):
            ema = self._ema.get(name)
            values = ema.detach().cpu().reshape(-1).numpy() if ema is not None else 0.0
            flat[self.layout.span(name)] = values
            sums[i] = float(ema.double().sum()) if ema is not None else 0.0
        if self.normalise == "none":
            return flat
        totals = np.bincount(self._group, weights=sums)
        counts = np.bincount(self._group, weights=self.layout.numels)
        means = (totals / counts)[self._group]
        for i, name in enumerate(self.layout.names):
            span = flat[self.layout.span(name)]
            if means[i] > 0:
                span /= np.float32(means[i])
        return flat

    def refresh(self, step: int, **info: Any) -> dict[str, Any]:
        """Make the top p% of the current importance the protected set; returns the record kept in
        :attr:`history`: ``step``, ``size``, ``jaccard_previous`` (None the first time),
        ``jaccard_first``, ``joined``, ``released`` and the given ``info``."""
        words, _ = top_percent(self.importance(), self.layout, self.p, self.scope)
        previous = self.protected
        record: dict[str, Any] = {
            "step": int(step),
            "size": popcount(words),
            "jaccard_previous": None if previous is None else jaccard(previous, words),
            "jaccard_first": 1.0 if self.first is None else jaccard(self.first, words),
            "joined": popcount(words if previous is None else words & ~previous),
            "released": 0 if previous is None else popcount(previous & ~words),
            **info,
        }
        self.protected = words
        if self.first is None:
            self.first = words
        self.history.append(record)
        return record

    def frozen(self) -> dict[str, torch.Tensor] | None:
        """The protected set as ``{name: torch.bool mask}``, or None before the first refresh."""
        return None if self.protected is None else unpack_all(self.protected, self.layout)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (loadable with ``torch.load(weights_only=True)``)."""
        as_tensor = (lambda w: None if w is None else torch.from_numpy(w.view(np.uint8).copy()))
        return {
            "ema": {name: t.detach().cpu() for name, t in self._ema.items()},
            "updates": self.updates,
            "protected": as_tensor(self.protected),
            "first": as_tensor(self.first),
            "history": [dict(record) for record in self.history],
            "settings": {"p": self.p, "beta": self.beta, "normalise": self.normalise, "scope": self.scope,
                         "layout": self.layout.to_json()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises :class:`MismatchError` if it came from other settings."""
        mine = self.state_dict()["settings"]
        if state.get("settings") != mine:
            raise MismatchError("the importance state was saved with other settings or tensors than this tracker's")
        as_words = (lambda t: None if t is None else t.numpy().copy().view(np.uint64))
        device = {name: t.device for name, t in self._ema.items()}
        self._ema = {name: t.to(device.get(name, "cpu")) for name, t in state["ema"].items()}
        self.updates = int(state["updates"])
        self.protected = as_words(state["protected"])
        self.first = as_words(state["first"])
        self.history = [dict(record) for record in state["history"]]
