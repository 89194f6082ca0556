"""The CPU decode step's decoder layers in C++ (kernels.cpp) and the integer matmuls of
quantized loads (quantized.cpp), built once per machine.

`make install` runs `python -m tursi.engine.native`, which compiles the sources against the
installed torch with `torch.utils.cpp_extension` (a C++ compiler, ninja and Python's headers)
into build/<key>/ beside this file; the key hashes the sources, the flags and torch's version,
so a stale build is never loaded. The server never compiles: `load()` imports what was built,
or returns None when nothing was (tursi.engine.decode then runs the same steps as torch ops,
and tursi.engine.quantize its torch reference of the integer math).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

NAME = "tursi_native"
HERE = Path(__file__).parent
SOURCES = [HERE / "kernels.cpp", HERE / "quantized.cpp"]
HEADERS = [HERE / "quantized.h"]
# No -march=native: a build may be used on another machine than the one that made it
# (quantized.cpp picks its AVX-512 VNNI kernels at run time). No contraction of a * b + c into
# one fused multiply-add: torch's ops round the product first. OpenMP: at::parallel_for runs
# on torch's own threads (the same libgomp.so.1, already loaded by torch).
FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]


def build_dir() -> Path:
    key = hashlib.sha256(
        b"".join(path.read_bytes() for path in SOURCES + HEADERS)
        + " ".join(FLAGS).encode()
        + torch.__version__.encode()
    ).hexdigest()[:16]
    return HERE / "build" / key


def build(verbose: bool = False) -> Path:
    """Compile the sources (skipped when the build is up to date); returns the library's path."""
    from torch.utils.cpp_extension import load as compile_and_load

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    compile_and_load(
        NAME,
        [str(path) for path in SOURCES],
        extra_cflags=FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        verbose=verbose,
    )
    return folder / f"{NAME}.so"


@functools.cache
def load() -> ModuleType | None:
    """The built kernels, or None (logged once) when they were not built or do not load."""
    path = build_dir() / f"{NAME}.so"
    if not path.is_file():
        log.info("native decode kernels not built (python -m tursi.engine.native); using torch ops")
        return None
    try:
        spec = importlib.util.spec_from_file_location(NAME, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        log.warning("native decode kernels at %s do not load (%s); using torch ops", path, exc)
        return None
    return module
