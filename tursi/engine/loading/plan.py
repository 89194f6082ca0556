"""What a load will do, decided before any file is read: the dtype, where the weights go,
which quantizer runs and which progress steps the load shows. `plan_load` is a pure function
of the catalog entry, the options and the device's facts, so its CUDA branches are tested on
a machine without a GPU; tursi.engine.loading.load carries the plan out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import UnsupportedQuantization
from ..catalog import QUANT_BITS, QUANT_MODES, CatalogEntry
from ..progress import LOADING_WEIGHTS


class LoadError(Exception):
    """A model could not be loaded. The message says why and what to do in Tursi's words,
    and is what clients see (GET /models `error`, 409 `load_error`): it names no path of
    the server and quotes no library. `detail`, which only the server log shows, may do
    both (the file, the library's own error)."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail or message


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
        refuse_unsupported(self, cuda_available())

    def describe(self) -> dict[str, Any]:
        return {"quantize": self.quantize, "bits": self.bits, "mode": self.mode}


def supported_quantization(cuda: bool) -> list[dict[str, Any]]:
    """(bits, mode) pairs each device's backend runs; docs/quantization.md says why.
    CUDA: bitsandbytes LLM.int8 / NF4, which handle activations on the fly (dynamic only).
    CPU: our integer kernels, 8-bit (dynamic per-token or static calibrated activations) and
    4-bit (dynamic)."""
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


def refuse_unsupported(options: LoadOptions, cuda: bool) -> None:
    """Raise UnsupportedQuantization (400) for a quantized load the device cannot run."""
    if not options.quantize:
        return
    supported = supported_quantization(cuda)
    if {"bits": options.bits, "mode": options.mode} not in supported:
        device = "CUDA" if cuda else "CPU"
        raise UnsupportedQuantization(
            f"Quantization bits={options.bits} mode={options.mode} is not supported on {device}; "
            "supported: " + ", ".join(f"{q['bits']}-bit {q['mode']}" for q in supported),
            {"device": device.lower(), "supported": supported},
        )


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_has_bf16() -> bool:
    """bf16 matmuls are fast only with AVX-512 BF16 or AMX; elsewhere fp32 is faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class DeviceFacts:
    """What a plan needs to know about the machine; probed once per load, passed in by tests."""

    cuda: bool
    cuda_bf16: bool = False  # the GPU runs bf16
    cpu_bf16: bool = False  # the CPU has AVX-512 BF16 or AMX

    @classmethod
    def probe(cls) -> DeviceFacts:
        import torch

        cuda = cuda_available()
        return cls(cuda, cuda and torch.cuda.is_bf16_supported(), cpu_has_bf16())


def dtype_name(name: str, device: DeviceFacts) -> str:
    """The torch dtype a dtype setting means on this device: "auto" is bf16 where it runs fast
    (docs/quantization.md), else fp16 on CUDA and fp32 on the CPU."""
    if name != "auto":
        return name
    if device.cuda:
        return "bfloat16" if device.cuda_bf16 else "float16"
    return "bfloat16" if device.cpu_bf16 else "float32"


def four_bit_kept_in_float(num_layers: int) -> list[str]:
    """Module names NF4 (CUDA's 4-bit) leaves in the float dtype, chosen by measurement on
    the embedded model when NF4 also ran on the CPU (docs/quantization.md): the output head,
    the second decoder layer and every other MLP down projection took held-out perplexity
    from +29% to +13% over fp32 for 0.34x of fp32's memory. Llama-style names; on other
    architectures only the head matches."""
    kept = ["lm_head", "model.layers.1."]
    kept += [f"model.layers.{i}.mlp.down_proj" for i in range(0, num_layers, 2)]
    return kept


@dataclass(frozen=True)
class LoadPlan:
    """How one load runs. Quantizers: "bitsandbytes" (CUDA) or "tursi" (tursi.engine.quantize
    after a float32 load, 8 or 4 bits on the CPU, cached on disk)."""

    dtype: str  # what from_pretrained loads in, and the dtype the model reports
    compute_dtype: str  # the dtype setting resolved for this device: NF4 computes in it
    device_map: str | None  # None: transformers' default, the CPU
    max_memory: dict[int | str, str] | None
    quantizer: str | None
    bits: int | None
    static: bool  # 8-bit on the CPU with calibrated activation scales
    optimize_for_cpu: bool  # packed and fused matmuls (tursi.engine.cpu_kernels)
    local_files_only: bool
    trust_remote_code: bool  # remote code runs only where the catalog entry says so

    @property
    def quantized_on_cpu(self) -> bool:
        return self.quantizer == "tursi"

    @property
    def files(self) -> dict[str, bool]:
        """The arguments every transformers from_pretrained call of this load takes."""
        return {
            "local_files_only": self.local_files_only,
            "trust_remote_code": self.trust_remote_code,
        }

    def bitsandbytes_arguments(self, num_layers: int) -> dict[str, Any]:
        """BitsAndBytesConfig's arguments: LLM.int8 for 8 bits, NF4 with the measured float
        layers kept for 4 bits (num_layers: the model's decoder layers)."""
        if self.bits == 8:
            return {"load_in_8bit": True}
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": self.compute_dtype,
            "llm_int8_skip_modules": four_bit_kept_in_float(num_layers),
        }

    def progress_steps(self, converting: bool, quantized_cached: bool) -> list[str]:
        """The steps GET /models shows: the GGUF conversion when it has not run yet, reading
        the weights, then calibrating (smoothing, static scales) and quantizing for a CPU
        quantized load that has no cache."""
        steps = (["converting"] if converting else []) + [LOADING_WEIGHTS]
        if self.quantized_on_cpu and not quantized_cached:
            steps += ["calibrating", "quantizing"]
        return steps


def plan_load(
    entry: CatalogEntry,
    options: LoadOptions,
    device: DeviceFacts,
    max_gpu_memory: str | None = None,
    allow_downloads: bool = False,
) -> LoadPlan:
    """CUDA: accelerate's device_map="auto" (with max_memory); CPU: everything on the CPU.
    Quantized loads: bitsandbytes on CUDA; on the CPU a float32 load, then Tursi's 8- or
    4-bit quantization. Float loads on the CPU get the packed CPU matmuls."""
    refuse_unsupported(options, device.cuda)
    compute = dtype_name(options.dtype or entry.dtype, device)
    own = options.quantize and not device.cuda
    quantizer = ("tursi" if own else "bitsandbytes") if options.quantize else None
    dtype = compute
    if own:
        dtype = "float32"
    elif quantizer == "bitsandbytes" and options.bits == 8:  # LLM.int8 on CUDA
        dtype = "float16"
    device_map = "auto" if device.cuda else ("cpu" if options.quantize else None)
    max_memory = {0: max_gpu_memory, "cpu": "1000GiB"} if device.cuda and max_gpu_memory else None
    return LoadPlan(
        dtype=dtype,
        compute_dtype=compute,
        device_map=device_map,
        max_memory=max_memory,
        quantizer=quantizer,
        bits=options.bits if options.quantize else None,
        static=own and options.mode == "static",
        optimize_for_cpu=not device.cuda and not options.quantize,
        local_files_only=not allow_downloads,
        trust_remote_code=entry.trust_remote_code,
    )
