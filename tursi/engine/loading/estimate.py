"""What a load will cost before it runs, for the manager: the memory its weights will take
(read from the files' headers, nothing loaded) and how long it will take."""

from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

from ..catalog import CatalogEntry
from .plan import DeviceFacts, LoadError, LoadOptions, dtype_name
from .weights import source_files

# Bytes per parameter of a quantized load, measured on the embedded model (docs/quantization.md:
# 8-bit 0.31x and 4-bit 0.21x of float32's 4 bytes; CUDA's NF4 keeps some layers in float),
# rounded up.
QUANTIZED_BYTES_PER_PARAMETER = 1.5
SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own limit
# Measured on the 2-core dev box: dequantizing the embedded GGUF runs at about 5 MB/s of file.
GGUF_CONVERT_BYTES_PER_SECOND = 5e6


# --- how much memory it will take ---------------------------------------------------------


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

    from ..cpu_kernels import packing_supported

    device = DeviceFacts.probe()
    dtype = getattr(torch, dtype_name(options.dtype or entry.dtype, device))
    if not device.cuda and packing_supported(dtype):  # optimize_for_cpu packs a tied head apart
        parameters += tied_head_parameters(files)
    return parameters * dtype.itemsize


def estimate_kv_bytes(
    entry: CatalogEntry, options: LoadOptions, home: str, max_batch: int
) -> int | None:
    """The most KV cache the model can use (what tursi.engine.worker.kv_budget will measure
    after the load): max_batch rows at its whole context, and one prompt's prefill beside
    them, at one token's keys and values over every layer, in the compute dtype. From the
    config next to the weights; None when there is none yet (a GGUF before conversion)."""
    try:
        files, _ = source_files(entry, home)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(files[0].parent, local_files_only=True)
        text = config.get_text_config()
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        context = text.max_position_embeddings
        layers = text.num_hidden_layers
    except Exception:  # not local yet, or no config: the caller uses TURSI_KV_CACHE
        return None
    if options.quantize:
        itemsize = 4  # quantized CPU models compute, and keep their KV, in float32
    else:
        import torch

        dtype = getattr(torch, dtype_name(options.dtype or entry.dtype, DeviceFacts.probe()))
        itemsize = dtype.itemsize
    token_bytes = layers * 2 * kv_heads * head_dim * itemsize
    return (max_batch * (context + 1) + context) * token_bytes


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
