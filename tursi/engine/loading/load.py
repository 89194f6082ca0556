"""The load itself: carry out a LoadPlan (weights and tokenizer read, quantized, optimized)
and measure the loaded model (bytes, context length, end-of-sequence ids)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...threads import native_lock
from ..catalog import CatalogEntry
from ..progress import LOADING_WEIGHTS, LoadProgress, reporting
from .plan import DeviceFacts, LoadError, LoadOptions, LoadPlan, plan_load
from .weights import load_quantized, locate, quantized_dir, save_quantized, source_files

# transformers' loading is not thread-safe: two from_pretrained calls at once left the tied
# output head (lm_head) uninitialized in 26 of 30 concurrent loads of two tiny Llamas
# (transformers 5.23), which then served NaN logits. Loading also changes process-wide torch
# state while it runs (the default dtype; accelerate's init_empty_weights). So the loads of
# one process run one at a time; a second one waits, still "loading".
_LOADING = native_lock()


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    dtype: str
    device: str
    memory_bytes: int
    context_length: int
    eos_ids: frozenset[int]


def load_model(
    entry: CatalogEntry,
    options: LoadOptions,
    home: str,
    max_gpu_memory: str | None = None,
    allow_downloads: bool = False,
    progress: LoadProgress | None = None,
) -> LoadedModel:
    """Load weights and tokenizer as plan_load decides for this machine. `progress` follows
    the steps as they run. Loads in one process take turns (_LOADING)."""
    plan = plan_load(entry, options, DeviceFacts.probe(), max_gpu_memory, allow_downloads)
    progress = progress or LoadProgress()
    with _LOADING, reporting(progress):
        return _load_model(entry, options, home, plan, allow_downloads, progress)


def _load_model(
    entry: CatalogEntry,
    options: LoadOptions,
    home: str,
    plan: LoadPlan,
    allow_downloads: bool,
    progress: LoadProgress,
) -> LoadedModel:
    converting = source_files(entry, home)[1]
    if converting:  # a fresh conversion never has cached quantized weights
        progress.plan(plan.progress_steps(converting=True, quantized_cached=False))
        progress.begin("converting")
    source = locate(entry, home, allow_downloads)
    cached = quantized_dir(entry, options, home, source) if plan.quantized_on_cpu else None
    have_cache = cached is not None and (cached / "model.safetensors").is_file()
    if not converting:
        progress.plan(plan.progress_steps(converting=False, quantized_cached=have_cache))
    progress.begin(LOADING_WEIGHTS)
    model, tokenizer = _read(entry.name, source, plan, cached if have_cache else None)
    model.eval()
    if cached is not None and not have_cache:  # the full-precision pass ran: quantize, cache
        _quantize(model, tokenizer, plan, cached, progress)
    if plan.optimize_for_cpu:
        from ..cpu_kernels import optimize_for_cpu

        optimize_for_cpu(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        dtype=plan.dtype,
        device=str(model.get_input_embeddings().weight.device),
        memory_bytes=model_bytes(model),
        context_length=context_length(model, tokenizer),
        eos_ids=eos_ids(model, tokenizer),
    )


def _read(name: str, source: str, plan: LoadPlan, cache: Path | None) -> tuple[Any, Any]:
    """Model and tokenizer from `source` (the model from the quantized `cache` when given); a
    failure other than running out of memory becomes a LoadError that names the model and the
    files."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": getattr(torch, plan.dtype), **plan.files}
    if plan.device_map is not None:
        kwargs["device_map"] = plan.device_map
    if plan.max_memory is not None:
        kwargs["max_memory"] = plan.max_memory
    try:
        if plan.quantizer == "bitsandbytes":
            from transformers import AutoConfig, BitsAndBytesConfig

            config = AutoConfig.from_pretrained(source, **plan.files)
            arguments = plan.bitsandbytes_arguments(num_layers(config))
            kwargs["quantization_config"] = BitsAndBytesConfig(**arguments)
        tokenizer = AutoTokenizer.from_pretrained(source, **plan.files)
        if cache is not None:
            return load_quantized(source, cache, plan.bits, plan.static, plan.files), tokenizer
        return AutoModelForCausalLM.from_pretrained(source, **kwargs), tokenizer
    except (MemoryError, torch.OutOfMemoryError):
        raise  # the manager says "out of memory" and what to do
    except Exception as exc:  # missing or damaged files, a config transformers cannot read
        raise LoadError(
            f"Could not load '{name}': {_kind_of_failure(exc)} ({type(exc).__name__}); "
            "the server log has the details",
            f"Could not load '{name}' from {source}: {type(exc).__name__}: {exc}",
        ) from None


def _kind_of_failure(exc: Exception) -> str:
    """What went wrong inside transformers, in Tursi's words: its messages name the server's
    files (absolute paths), so clients get the kind of failure and the log the message."""
    if "trust_remote_code" in str(exc):
        return (
            "the checkpoint ships its own Python code, which runs only when its catalog "
            "entry sets trust_remote_code"
        )
    if isinstance(exc, OSError):
        return "a file it needs is missing or cannot be read"
    return "its files are damaged or not a model transformers can read"


def _quantize(
    model: Any, tokenizer: Any, plan: LoadPlan, cache: Path, progress: LoadProgress
) -> None:
    """Tursi's quantization (tursi.engine.quantize, static scales from
    tursi.engine.calibration) of the float32 model, then save it to `cache`."""
    from ..calibration import calibrate
    from ..quantize import quantize_model

    progress.begin("calibrating")
    peaks = calibrate(model, tokenizer, plan.bits, plan.static, context_length(model, tokenizer))
    progress.begin("quantizing")
    quantize_model(model, plan.bits, peaks)
    save_quantized(model, cache)


def num_layers(config: Any) -> int:
    """Decoder layers, from a transformers config (Llama-style or GPT-2 names)."""
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("cannot tell the model's number of layers from its config")


def model_bytes(model: Any) -> int:
    """Bytes held by parameters and buffers (packed sizes for quantized weights)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def context_length(model: Any, tokenizer: Any) -> int:
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(min(tokenizer.model_max_length, 1 << 20))


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    generation = getattr(model, "generation_config", None)
    for value in (getattr(generation, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)
