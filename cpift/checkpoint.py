"""Lazy, read-only access to a model's tensors, whatever form the model comes in.

A model can be given as a Hugging Face model directory or hub id (``model.safetensors``, or shards
listed in ``model.safetensors.index.json``), a single ``.safetensors`` file, an in-memory
``torch.nn.Module``, or a mapping name → tensor. :func:`open_checkpoint` turns each of these into a
:class:`Checkpoint` that lists tensor names, shapes and dtypes without reading data, and reads one
tensor at a time on request: on disk through ``safetensors.safe_open``, with one shard open at a time,
so that memory stays bounded by the largest tensor and two 7B-class checkpoints can be walked side
by side on a small machine.

Tied weights (``lm_head.weight`` sharing storage with ``model.embed_tokens.weight``) are listed once,
under the first name, because they are one set of parameters. Pickle checkpoints (``.bin``, ``.pt``)
can run arbitrary code when loaded; they are refused unless the caller opts in with
``allow_pickle=True``, and are then loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import safe_open

from .errors import CheckpointError, MismatchError
from .sources import is_embedded_name, looks_like_path, materialise_embedded_model

ModelLike = Union[str, os.PathLike, torch.nn.Module, Mapping[str, torch.Tensor], "Checkpoint"]
"""Anything cpift accepts as a model: a path or hub id, a module, a name → tensor mapping."""

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")

# safetensors' dtype codes, so that shapes and dtypes can be listed from headers alone.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_TIED_OUTPUT_NAMES = ("lm_head.weight",)
WEIGHT_PATTERNS = ("*.safetensors", "*.json")
"""Files fetched from the hub to read a model's weights."""


class Checkpoint(ABC):
    """A model's tensors by name, read lazily.

    ``names()`` lists each distinct tensor once (tied weights under their first name), in the
    order they are stored; ``shape`` and ``dtype`` answer without reading data; ``get`` reads one
    tensor and returns it on the CPU in its stored dtype.
    """

    label: str
    _names: dict[str, None]  # insertion-ordered, and a set for `in`

    def _set_names(self, names: Iterable[str]) -> None:
        self._names = dict.fromkeys(names)

    def names(self) -> list[str]:
        """Names of the distinct tensors, in storage order."""
        return list(self._names)

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` (no data is read)."""

    @abstractmethod
    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of tensor ``name`` (no data is read)."""

    @abstractmethod
    def _read(self, name: str) -> torch.Tensor:
        """Read tensor ``name``; ``name`` is known to exist."""

    def get(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` as a CPU tensor in its stored dtype."""
        if name not in self:
            raise MismatchError(f"{self.label}: no tensor named {name!r}")
        return self._read(name)

    def numel(self, name: str) -> int:
        """Number of elements of tensor ``name``."""
        return math.prod(self.shape(name))

    def floating_names(self) -> list[str]:
        """Names of the floating-point tensors (the ones cpift analyses), in storage order."""
        return [n for n in self.names() if self.dtype(n).is_floating_point]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def close(self) -> None:
        """Release open file handles (reading again reopens them)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r}, {len(self)} tensors)"


class TensorDictCheckpoint(Checkpoint):
    """A checkpoint over tensors already in memory (a mapping or a module's parameters)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str) -> None:
        self.label = label
        self._tensors: dict[str, torch.Tensor] = {}
        seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{label}: value of {name!r} is a {type(tensor).__name__}, not a tensor")
            # Tied weights share storage: keep the first name, as named_parameters() does.
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
            if tensor.numel() and key in seen:
                continue
            seen.add(key)
            self._tensors[name] = tensor.detach()
        self._set_names(self._tensors)

    @classmethod
    def from_module(cls, module: torch.nn.Module, label: str) -> TensorDictCheckpoint:
        """The module's parameters (tied parameters once); buffers are not model weights here."""
        return cls(dict(module.named_parameters()), label)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def _read(self, name: str) -> torch.Tensor:
        return self._tensors[name].cpu()


class ShardedCheckpoint(Checkpoint):
    """Tensors stored in one or more files, read lazily with at most one file open at a time."""

    def __init__(self, shards: list[Path], label: str, tied: bool) -> None:
        self.label = label
        self._shard_of: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for shard in shards:
            for name, meta in self._read_meta(shard).items():
                self._meta[name] = meta
                self._shard_of[name] = shard
        if tied:
            for name in _TIED_OUTPUT_NAMES:
                self._meta.pop(name, None)
        self._set_names(self._meta)
        self._open_path: Path | None = None
        self._open_handle: Any = None

    @abstractmethod
    def _read_meta(self, shard: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Names, shapes and dtypes stored in ``shard``."""

    @abstractmethod
    def _open(self, shard: Path) -> Any:
        """Open ``shard`` for reading tensors."""

    @abstractmethod
    def _read_from(self, handle: Any, name: str) -> torch.Tensor:
        """Read ``name`` from an open shard."""

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][1]

    def _read(self, name: str) -> torch.Tensor:
        shard = self._shard_of[name]
        if shard != self._open_path:
            self.close()
            self._open_handle = self._open(shard)
            self._open_path = shard
        try:
            return self._read_from(self._open_handle, name)
        except Exception as exc:  # a truncated or corrupt file fails here, deep in the reader
            raise CheckpointError(f"{self.label}: cannot read tensor {name!r} from {shard}: {exc}") from exc

    def close(self) -> None:
        self._open_handle = None
        self._open_path = None


class SafetensorsCheckpoint(ShardedCheckpoint):
    """One ``.safetensors`` file or a sharded set of them."""

    def _read_meta(self, shard: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        meta = {}
        for name, info in _safetensors_header(shard).items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{shard}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            meta[name] = (tuple(info["shape"]), dtype)
        return meta

    def _open(self, shard: Path) -> Any:
        try:
            return safe_open(str(shard), framework="pt", device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{self.label}: cannot open {shard}: {exc}") from exc

    def _read_from(self, handle: Any, name: str) -> torch.Tensor:
        return handle.get_tensor(name)


class PickleCheckpoint(ShardedCheckpoint):
    """``.bin`` / ``.pt`` files, loaded with ``torch.load(weights_only=True)`` one shard at a time."""

    def _read_meta(self, shard: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        state = self._open(shard)
        return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}

    def _open(self, shard: Path) -> Any:
        try:
            state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CheckpointError(f"{self.label}: cannot load {shard} (weights_only=True): {exc}") from exc
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{self.label}: {shard} does not hold a mapping of tensor names to tensors")
        return state

    def _read_from(self, handle: Any, name: str) -> torch.Tensor:
        return handle[name]


def _safetensors_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header, checking its form and that the file holds the data it lists."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file is shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ValueError(f"header of {n} bytes does not fit in a {size}-byte file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if not (isinstance(info, dict) and isinstance(info.get("shape"), list)
                    and all(isinstance(d, int) and d >= 0 for d in info["shape"])):
                raise ValueError(f"entry {name!r} has no valid shape")
            end = max(end, int(info["data_offsets"][1]))
        if 8 + n + end > size:
            raise ValueError(f"truncated: data ends at byte {8 + n + end}, file has {size}")
        return header
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"corrupt safetensors file {path}: {exc}") from exc


def _tie_flag(directory: Path) -> bool:
    """Whether ``config.json`` beside the weights says the input and output embeddings are tied."""
    config = directory / "config.json"
    if not config.is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("tie_word_embeddings", False))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {config}: {exc}") from exc


def _index_shards(index_path: Path) -> list[Path]:
    """The shard files a ``*.index.json`` lists, in order, each checked to exist."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"corrupt shard index {index_path}: {exc}") from exc
    shards = [index_path.parent / file for file in files]
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{index_path} lists shard {shard.name}, which is missing")
    return shards


def _open_path(path: Path, label: str, allow_pickle: bool) -> Checkpoint:
    directory = path if path.is_dir() else path.parent
    tied = _tie_flag(directory)
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsCheckpoint([path], label, tied)
        if path.suffix in PICKLE_SUFFIXES:
            _require_pickle_opt_in(path, allow_pickle)
            return PickleCheckpoint([path], label, tied)
        raise CheckpointError(f"{path}: not a checkpoint file (expected .safetensors, or .bin/.pt when pickle is allowed)")
    if (path / SAFETENSORS_INDEX).is_file():
        return SafetensorsCheckpoint(_index_shards(path / SAFETENSORS_INDEX), label, tied)
    if (path / SAFETENSORS_FILE).is_file():
        return SafetensorsCheckpoint([path / SAFETENSORS_FILE], label, tied)
    if (path / PICKLE_INDEX).is_file():
        _require_pickle_opt_in(path / PICKLE_INDEX, allow_pickle)
        return PickleCheckpoint(_index_shards(path / PICKLE_INDEX), label, tied)
    if (path / PICKLE_FILE).is_file():
        _require_pickle_opt_in(path / PICKLE_FILE, allow_pickle)
        return PickleCheckpoint([path / PICKLE_FILE], label, tied)
    raise CheckpointError(
        f"{path}: no model weights found (looked for {SAFETENSORS_INDEX}, {SAFETENSORS_FILE}, "
        f"{PICKLE_INDEX}, {PICKLE_FILE})"
    )


class PickleRefusedError(CheckpointError):
    """A pickle checkpoint was given without opting in to loading it (see ``allow_pickle``)."""

    def __init__(self, path: Path) -> None:
        self.problem = f"{path} is a pickle checkpoint, which can run arbitrary code when loaded"
        self.remedy = "convert it to safetensors, or pass allow_pickle=True to load it with torch.load(weights_only=True)"
        super().__init__(f"{self.problem}; {self.remedy}")


def _require_pickle_opt_in(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise PickleRefusedError(path)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick check whether the Hugging Face Hub can be reached at all.

    Without it a download from an unreachable hub retries for about a minute before failing.
    ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` mean no; with an HTTP(S) proxy configured the
    answer is assumed yes (the proxy, not a direct connection, decides).
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return False
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model_path(name_or_path: str | os.PathLike, patterns: Sequence[str] = WEIGHT_PATTERNS) -> Path:
    """The local path for a path, the embedded model's short name, or a hub id.

    Which of these a text is follows :mod:`cpift.sources`. A hub id is looked up in the local
    Hugging Face cache first, then downloaded (only the files matching ``patterns``) when the hub
    can be reached.

    Raises:
        CheckpointError: a path that does not exist, or a hub id that is neither cached nor reachable.
    """
    text = os.fspath(name_or_path)
    if is_embedded_name(text):
        return materialise_embedded_model()
    path = Path(text).expanduser()
    if path.exists():
        return path
    if not isinstance(name_or_path, str) or looks_like_path(text):
        raise CheckpointError(f"model path {path} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=list(patterns), local_files_only=True))
    except Exception:
        if not _hub_reachable():
            raise CheckpointError(
                f"{text!r} is not a local path, not in the local Hugging Face cache, and the hub is "
                "unreachable from here: pass a local model directory"
            ) from None
    try:
        return Path(snapshot_download(text, allow_patterns=list(patterns)))
    except Exception as exc:
        raise CheckpointError(f"could not download {text!r} from the Hugging Face Hub: {exc}") from exc


def open_checkpoint(model: ModelLike, *, allow_pickle: bool = False, label: str | None = None) -> Checkpoint:
    """Open any accepted model form as a lazy :class:`Checkpoint`.

    Args:
        model: a path (directory, ``.safetensors`` file, or with ``allow_pickle`` a ``.bin``/``.pt``
            file), the embedded model's short name, a Hugging Face hub id, a ``torch.nn.Module``, a
            mapping name → tensor, or an already open :class:`Checkpoint` (returned as is).
        allow_pickle: opt in to pickle checkpoints, loaded with ``torch.load(weights_only=True)``.
        label: how errors name this model (default: its path or type).

    Raises:
        CheckpointError: the path is missing, holds no weights, is corrupt, or is pickle without opt-in.
    """
    if isinstance(model, Checkpoint):
        return model
    if isinstance(model, torch.nn.Module):
        return TensorDictCheckpoint.from_module(model, label or type(model).__name__)
    if isinstance(model, Mapping):
        checkpoint = TensorDictCheckpoint(model, label or "tensor mapping")
    elif isinstance(model, (str, os.PathLike)):
        path = resolve_model_path(model)
        checkpoint = _open_path(path, label or os.fspath(model), allow_pickle)
    else:
        raise CheckpointError(f"cannot read a model from a {type(model).__name__}")
    if not len(checkpoint):
        raise CheckpointError(f"{checkpoint.label}: the checkpoint holds no tensors")
    return checkpoint


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of a floating-point tensor is finite.

    A plain sum is finite when every element is and allocates nothing; only when it is not (a NaN,
    an Inf, or an overflow of huge values) is the exact element-wise check run.
    """
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def aligned_names(
    base: Checkpoint, others: Mapping[str, Checkpoint], names: list[str] | None = None
) -> list[str]:
    """Check that every checkpoint in ``others`` has the base's tensors with the same shapes.

    Returns ``names`` (default: the base's floating-point tensors). Raises :class:`MismatchError`
    naming the task and tensor at the first difference.
    """
    names = base.floating_names() if names is None else names
    for task, other in others.items():
        missing = [n for n in names if n not in other]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise MismatchError(f"task {task!r}: tensor {missing[0]!r}{more} of the base is missing")
        for name in names:
            if other.shape(name) != base.shape(name):
                raise MismatchError(
                    f"task {task!r}: tensor {name!r} has shape {list(other.shape(name))}, "
                    f"the base has {list(base.shape(name))}"
                )
    return names
