"""plan_load: every decision a load makes, taken on given device facts, so the CUDA branches
run here without a GPU. Then the plan against a real load of the tiny Llama on this CPU."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import BitsAndBytesConfig

from tursi.engine.catalog import Catalog, CatalogEntry
from tursi.engine.loading import DeviceFacts, LoadOptions, load_model, plan_load
from tursi.engine.loading.plan import four_bit_kept_in_float
from tursi.engine.progress import LOADING_WEIGHTS, LoadProgress
from tursi.errors import UnsupportedQuantization

ENTRY = CatalogEntry("m", "local", "/models/m")
CPU = DeviceFacts(cuda=False)
CPU_BF16 = DeviceFacts(cuda=False, cpu_bf16=True)
GPU = DeviceFacts(cuda=True, cuda_bf16=True)
OLD_GPU = DeviceFacts(cuda=True, cuda_bf16=False)  # no bf16: fp16 is its "auto"


def quantized(bits, mode, dtype=None):
    return LoadOptions(True, bits, mode, dtype)


@pytest.mark.parametrize(
    "device, expected",
    [(CPU, "float32"), (CPU_BF16, "bfloat16"), (GPU, "bfloat16"), (OLD_GPU, "float16")],
)
def test_auto_dtype_is_the_fast_float_of_the_device(device, expected):
    plan = plan_load(ENTRY, LoadOptions(), device)
    assert (plan.dtype, plan.compute_dtype, plan.quantizer) == (expected, expected, None)


def test_the_catalog_dtype_holds_unless_the_load_names_one():
    entry = CatalogEntry("m", "local", "/models/m", dtype="float16")
    assert plan_load(entry, LoadOptions(), CPU_BF16).dtype == "float16"
    assert plan_load(entry, LoadOptions(dtype="float32"), CPU_BF16).dtype == "float32"


def test_a_float_load_on_the_cpu_stays_there_and_gets_the_packed_matmuls():
    plan = plan_load(ENTRY, LoadOptions(), CPU, max_gpu_memory="10GiB")
    assert (plan.device_map, plan.max_memory) == (None, None)  # transformers' default: the CPU
    assert plan.optimize_for_cpu and not plan.quantized_on_cpu
    assert plan.progress_steps(converting=False, quantized_cached=False) == [LOADING_WEIGHTS]
    assert plan.progress_steps(converting=True, quantized_cached=False) == [
        "converting",
        LOADING_WEIGHTS,
    ]


@pytest.mark.parametrize(
    "options", [LoadOptions(), quantized(8, "dynamic"), quantized(4, "dynamic")]
)
def test_cuda_loads_use_accelerates_device_map_and_the_gpu_memory_cap(options):
    plan = plan_load(ENTRY, options, GPU, max_gpu_memory="10GiB")
    assert plan.device_map == "auto"
    assert plan.max_memory == {0: "10GiB", "cpu": "1000GiB"}
    assert not plan.optimize_for_cpu
    assert plan_load(ENTRY, options, GPU).max_memory is None  # no cap: accelerate decides


@pytest.mark.parametrize(
    "bits, mode, steps",
    [
        (8, "dynamic", ["calibrating", "quantizing"]),
        (8, "static", ["calibrating", "quantizing"]),
        (4, "dynamic", ["calibrating", "quantizing"]),
    ],
)
@pytest.mark.parametrize("device", [CPU, CPU_BF16])
def test_quantized_on_the_cpu_is_tursis_over_a_float32_load(device, bits, mode, steps):
    plan = plan_load(ENTRY, quantized(bits, mode, "bfloat16"), device)
    assert (plan.quantizer, plan.dtype, plan.device_map) == ("tursi", "float32", "cpu")
    assert (plan.bits, plan.static) == (bits, mode == "static")
    assert not plan.optimize_for_cpu
    assert plan.progress_steps(converting=False, quantized_cached=False) == (
        [LOADING_WEIGHTS] + steps
    )
    assert plan.progress_steps(converting=False, quantized_cached=True) == [LOADING_WEIGHTS]
    assert plan.progress_steps(converting=True, quantized_cached=False) == (
        ["converting", LOADING_WEIGHTS] + steps
    )


def test_4_bit_keeps_the_measured_layers_in_float():
    assert four_bit_kept_in_float(5) == [
        "lm_head",
        "model.layers.1.",
        "model.layers.0.mlp.down_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.4.mlp.down_proj",
    ]


def test_8_bit_on_cuda_is_llm_int8_in_float16():
    plan = plan_load(ENTRY, quantized(8, "dynamic"), GPU)
    assert (plan.quantizer, plan.dtype, plan.compute_dtype) == (
        "bitsandbytes",
        "float16",
        "bfloat16",
    )
    assert plan.bitsandbytes_arguments(30) == {"load_in_8bit": True}
    assert plan.progress_steps(converting=False, quantized_cached=False) == [LOADING_WEIGHTS]


@pytest.mark.parametrize("device, dtype", [(GPU, "bfloat16"), (OLD_GPU, "float16")])
def test_4_bit_on_cuda_is_nf4_computing_in_the_gpus_float(device, dtype):
    plan = plan_load(ENTRY, quantized(4, "dynamic"), device)
    assert (plan.quantizer, plan.dtype) == ("bitsandbytes", dtype)
    assert plan.bitsandbytes_arguments(2)["bnb_4bit_compute_dtype"] == dtype


@pytest.mark.parametrize("bitsandbytes", ["present", "absent"])
@pytest.mark.parametrize("bits", [8, 4])
def test_the_cuda_plan_needs_no_bitsandbytes_and_transformers_takes_its_config(
    monkeypatch, bitsandbytes, bits
):
    """The plan only describes the quantization: it is the same whether bitsandbytes imports
    or not (a load without it fails inside transformers, with transformers' message, as
    before the plan existed), and transformers accepts the description as it stands."""
    expected = plan_load(ENTRY, quantized(bits, "dynamic"), GPU)
    if bitsandbytes == "absent":
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails
    plan = plan_load(ENTRY, quantized(bits, "dynamic"), GPU)
    assert plan == expected
    config = BitsAndBytesConfig(**plan.bitsandbytes_arguments(4))
    if bits == 8:
        assert config.load_in_8bit and not config.load_in_4bit
    else:
        assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
        assert config.bnb_4bit_compute_dtype == torch.bfloat16
        assert config.llm_int8_skip_modules == four_bit_kept_in_float(4)


@pytest.mark.parametrize(
    "device, options, message",
    [
        (
            CPU,
            quantized(4, "static"),
            "Quantization bits=4 mode=static is not supported on CPU; "
            "supported: 8-bit dynamic, 8-bit static, 4-bit dynamic",
        ),
        (
            GPU,
            quantized(8, "static"),
            "Quantization bits=8 mode=static is not supported on CUDA; "
            "supported: 8-bit dynamic, 4-bit dynamic",
        ),
        (
            GPU,
            quantized(4, "static"),
            "Quantization bits=4 mode=static is not supported on CUDA; "
            "supported: 8-bit dynamic, 4-bit dynamic",
        ),
    ],
)
def test_a_pair_the_device_cannot_run_is_refused(device, options, message):
    with pytest.raises(UnsupportedQuantization) as refused:
        plan_load(ENTRY, options, device)
    assert refused.value.message == message
    assert refused.value.details["device"] == ("cuda" if device.cuda else "cpu")


@pytest.mark.parametrize("allow_downloads", [False, True])
@pytest.mark.parametrize("trust", [False, True])
def test_files_come_from_the_cache_and_run_code_only_as_the_catalog_says(allow_downloads, trust):
    entry = CatalogEntry("m", "hub", "org/m", trust_remote_code=trust)
    plan = plan_load(entry, LoadOptions(), CPU, allow_downloads=allow_downloads)
    assert plan.files == {"local_files_only": not allow_downloads, "trust_remote_code": trust}


class RecordingProgress(LoadProgress):
    def __init__(self):
        super().__init__()
        self.begun = []

    def begin(self, step):
        super().begin(step)
        self.begun.append(step)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU int8 load")
def test_a_real_cpu_int8_load_follows_its_plan(tiny_models_dir, tmp_path):
    """Static 8-bit on the tiny Llama: calibrate and quantize the first time, then only read
    the cached int8 weights; the model reports the plan's dtype."""
    entry = Catalog.load(str(tiny_models_dir / "models.json")).get("tiny")
    options = quantized(8, "static").resolved(entry)
    plan = plan_load(entry, options, DeviceFacts.probe())
    for cached in (False, True):
        progress = RecordingProgress()
        loaded = load_model(entry, options, str(tmp_path), progress=progress)
        expected = plan.progress_steps(converting=False, quantized_cached=cached)
        assert progress.steps == progress.begun == expected
        assert loaded.dtype == plan.dtype == "float32"
