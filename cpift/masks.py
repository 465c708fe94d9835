"""Bit-packed masks over all of a model's parameters.

A :class:`Layout` lays a model's tensors end to end in one flat index space. Each tensor starts at
a multiple of 64 elements, so that a mask over the whole model is one ``uint64`` vector (one bit per
element) in which every tensor owns whole words. Whole-model operations then run as vectorised
numpy over packed words — a 134.5M-parameter mask is 16.8 MB — and any one tensor's mask is a
slice, unpacked to a ``torch.BoolTensor`` only when asked for.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save as save_arrays

from .atomic import atomic_write_bytes
from .errors import FormatError, MismatchError, ParameterError

WORD_BITS = 64
_NPZ_METADATA = "__metadata__"  # the JSON metadata entry of a deflated packed-mask file


@dataclass(frozen=True)
class Layout:
    """Tensor names and shapes laid end to end, each tensor aligned to a 64-element boundary."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    numels: np.ndarray = field(init=False, repr=False, compare=False)
    starts: np.ndarray = field(init=False, repr=False, compare=False)
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.shapes):
            raise ParameterError("a layout needs one shape per name")
        numels = np.array([prod(s) for s in self.shapes], dtype=np.int64)
        padded = -(-numels // WORD_BITS) * WORD_BITS
        starts = np.concatenate([[0], np.cumsum(padded)]).astype(np.int64)
        object.__setattr__(self, "numels", numels)
        object.__setattr__(self, "starts", starts)
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(self.names)})

    @property
    def numel(self) -> int:
        """D, the number of real elements (padding excluded)."""
        return int(self.numels.sum())

    @property
    def padded_size(self) -> int:
        """Length of the flat index space, padding included (a multiple of 64)."""
        return int(self.starts[-1])

    @property
    def n_words(self) -> int:
        """Number of ``uint64`` words in a packed mask."""
        return self.padded_size // WORD_BITS

    def index(self, name: str) -> int:
        """Position of tensor ``name`` in the layout."""
        try:
            return self._index[name]
        except KeyError:
            raise MismatchError(f"no tensor named {name!r} in this layout") from None

    def span(self, name: str) -> slice:
        """The flat element range of tensor ``name`` (padding excluded)."""
        i = self.index(name)
        return slice(int(self.starts[i]), int(self.starts[i] + self.numels[i]))

    def word_span(self, name: str) -> slice:
        """The packed-word range of tensor ``name``."""
        i = self.index(name)
        return slice(int(self.starts[i]) // WORD_BITS, int(self.starts[i + 1]) // WORD_BITS)

    def padding_spans(self) -> list[slice]:
        """The flat ranges of padding between tensors (empty ones left out)."""
        ends = self.starts[:-1] + self.numels
        return [slice(int(a), int(b)) for a, b in zip(ends, self.starts[1:]) if b > a]

    def to_json(self) -> dict:
        """A JSON-able description (names and shapes)."""
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, data: Mapping) -> Layout:
        """Inverse of :meth:`to_json`."""
        return cls(tuple(data["names"]), tuple(tuple(int(d) for d in s) for s in data["shapes"]))


def pack(flat: np.ndarray) -> np.ndarray:
    """Pack a flat boolean vector whose length is a multiple of 64 into ``uint64`` words."""
    return np.packbits(flat, bitorder="little").view(np.uint64)


def unpack(words: np.ndarray, layout: Layout, name: str) -> torch.Tensor:
    """The boolean mask of tensor ``name``, in its shape, from a packed whole-model mask."""
    i = layout.index(name)
    chunk = words[layout.word_span(name)].view(np.uint8)
    bits = np.unpackbits(chunk, count=int(layout.numels[i]), bitorder="little").view(bool)
    return torch.from_numpy(bits.reshape(layout.shapes[i]))


def unpack_all(words: np.ndarray, layout: Layout) -> dict[str, torch.Tensor]:
    """Every tensor's boolean mask, keyed by name."""
    return {name: unpack(words, layout, name) for name in layout.names}


def pack_tensors(masks: Mapping[str, torch.Tensor], layout: Layout, what: str = "mask") -> np.ndarray:
    """Pack per-tensor boolean masks into a whole-model mask; absent tensors are all False.

    Raises :class:`MismatchError` for an unknown tensor or a shape that differs from the layout,
    and :class:`ParameterError` for a non-boolean mask, naming ``what`` and the tensor.
    """
    flat = np.zeros(layout.padded_size, dtype=bool)
    for name, mask in masks.items():
        if name not in layout._index:
            raise MismatchError(f"{what}: unknown tensor {name!r}")
        i = layout.index(name)
        if tuple(mask.shape) != layout.shapes[i]:
            raise MismatchError(
                f"{what}: tensor {name!r} has shape {list(mask.shape)}, the model has {list(layout.shapes[i])}"
            )
        if mask.dtype != torch.bool:
            raise ParameterError(f"{what}: tensor {name!r} has dtype {mask.dtype}, expected torch.bool")
        flat[layout.span(name)] = mask.detach().cpu().reshape(-1).numpy()
    return pack(flat)


def positions(words: np.ndarray) -> np.ndarray:
    """Flat indices of the set bits of a packed mask, ascending (``int64``)."""
    # Only the words holding a set bit are unpacked: sparse masks skip most of the vector.
    occupied = np.flatnonzero(words)
    rows, bits = np.nonzero(np.unpackbits(words[occupied].view(np.uint8), bitorder="little").reshape(-1, WORD_BITS))
    return occupied[rows] * WORD_BITS + bits


def from_positions(indices: np.ndarray, n_words: int) -> np.ndarray:
    """The packed mask of ``n_words`` words whose set bits are the flat ``indices``."""
    words = np.zeros(n_words, dtype=np.uint64)
    indices = np.asarray(indices, dtype=np.uint64)
    np.bitwise_or.at(words, indices >> np.uint64(6), np.left_shift(np.uint64(1), indices & np.uint64(63)))
    return words


def popcount(words: np.ndarray) -> int:
    """Number of set bits in a packed mask."""
    return int(np.bitwise_count(words).sum(dtype=np.int64))


def tensor_counts(words: np.ndarray, layout: Layout) -> np.ndarray:
    """Set bits per tensor of a packed mask (``int64``, layout order), in one vectorised pass."""
    cumulative = np.concatenate([[0], np.cumsum(np.bitwise_count(words), dtype=np.int64)])
    bounds = layout.starts // WORD_BITS
    return cumulative[bounds[1:]] - cumulative[bounds[:-1]]


def save_packed(path: str | os.PathLike[str], masks: Mapping[str, np.ndarray], layout: Layout,
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write packed masks over ``layout`` to one file, atomically; returns the path.

    A ``.safetensors`` path stores each mask as a raw ``uint8`` tensor (memory-mappable, instant to
    read); a ``.npz`` path deflates them — a 1 % mask of a 135M model shrinks from 17 MB to about
    2 MB — for artifacts that are kept many times or shipped. The layout (names and shapes) and
    ``metadata`` go in the file, so :func:`load_packed` needs nothing else.
    """
    for key, words in masks.items():
        if words.dtype != np.uint64 or words.size != layout.n_words:
            raise MismatchError(f"mask {key!r}: expected {layout.n_words} uint64 words, got {words.size} {words.dtype}")
    header = {**(metadata or {}), "layout": json.dumps(layout.to_json())}
    arrays = {key: words.view(np.uint8) for key, words in masks.items()}
    if Path(path).suffix == ".npz":
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays, **{_NPZ_METADATA: np.array(json.dumps(header))})
        return atomic_write_bytes(path, buffer.getvalue())
    return atomic_write_bytes(path, save_arrays(arrays, metadata=header))


def load_packed(path: str | os.PathLike[str]) -> tuple[Layout, dict[str, np.ndarray], dict[str, str]]:
    """Read a file written by :func:`save_packed`: its layout, masks (key → words) and metadata.

    Raises :class:`FormatError` for a missing, truncated or foreign file, or a mask of the wrong length.
    """
    try:
        if Path(path).suffix == ".npz":
            with np.load(path) as archive:
                metadata = json.loads(str(archive[_NPZ_METADATA]))
                arrays = {key: archive[key] for key in archive.files if key != _NPZ_METADATA}
        else:
            with safe_open(os.fspath(path), framework="np") as handle:
                metadata = dict(handle.metadata() or {})
                arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        layout = Layout.from_json(json.loads(metadata.pop("layout")))
    except Exception as exc:  # safetensors and zipfile raise their own error types; a missing key or bad JSON too
        raise FormatError(f"{path}: not a readable packed-mask file ({type(exc).__name__}: {exc})") from exc
    for key, array in arrays.items():
        if array.dtype != np.uint8 or array.size != layout.n_words * 8:
            raise FormatError(f"{path}: mask {key!r} has the wrong length for its layout")
    return layout, {key: array.view(np.uint64) for key, array in arrays.items()}, metadata
