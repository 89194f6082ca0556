"""Turning a catalog entry into a ready model.

- weights: where the files are (a local folder, the Hub cache, the embedded GGUF converted
  once to safetensors under a file lock) and the cached CPU quantized weights;
- estimate: the memory and time a load will take, for the manager, before it runs;
- plan: what a load will do on this device (dtype, device map, quantizer, progress steps),
  a pure function of the entry, the options and the device's facts;
- load: carrying a plan out, and measuring the loaded model.
"""

from .estimate import estimate_kv_bytes, estimate_load_seconds, estimate_memory_bytes
from .load import LoadedModel, load_model, model_bytes, num_layers
from .plan import DeviceFacts, LoadError, LoadOptions, LoadPlan, plan_load
from .weights import locate, quantized_dir

__all__ = [
    "DeviceFacts",
    "LoadError",
    "LoadOptions",
    "LoadPlan",
    "LoadedModel",
    "estimate_load_seconds",
    "estimate_kv_bytes",
    "estimate_memory_bytes",
    "load_model",
    "locate",
    "model_bytes",
    "num_layers",
    "plan_load",
    "quantized_dir",
]
