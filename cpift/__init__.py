"""cpift — parameter-isolation fine-tuning for large language models.

The public API, importable from ``cpift`` directly::

    import cpift
    regions = cpift.core_regions(base, {"math": math_model, "code": code_model}, p=1)
    groups = cpift.group_tasks(regions.jaccard(), tau=0.1)
    fused = cpift.fuse(base, {"math": math_model, "code": code_model}, regions, omega=0.5)

Names are resolved on first use, so ``import cpift`` stays quick and pulls in transformers only
when a model is loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .errors import CheckpointError, CpiftError, FormatError, MismatchError, ParameterError

_EXPORTS = {
    "checkpoint": ("Checkpoint", "ModelLike", "open_checkpoint"),
    "regions": ("CoreRegions", "core_regions", "update_magnitudes"),
    "overlap": ("jaccard_matrix", "group_jaccard", "layer_of", "module_of"),
    "grouping": ("Grouping", "STAGE_ORDERS", "dendrogram_data", "group_tasks", "groupings_by_tau",
                 "linkage_matrix", "similarity_graph", "stage_order"),
    "fusion": ("FusedState", "fuse", "slerp", "transplant_report"),
    "freezing": ("MaskedOptimizer",),
    "selection": ("top_k",),
    "sparse": ("ImportanceTracker", "SCORES", "sparse_mask", "sparse_scores"),
    "train": ("estimate_gradients",),
    "scores": ("COLLAPSE_THRESHOLD", "forgetting", "compare", "paired_comparisons", "summarize"),
    "stats": ("paired_difference", "proportion_ci", "score_interval"),
    "models": ("EMBEDDED_MODEL", "load_model", "save_model", "tiny_llama"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["__version__", "CpiftError", "CheckpointError", "FormatError", "MismatchError", "ParameterError",
           *_MODULE_OF]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'cpift' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
