"""Free the calling thread's idle OpenMP threads before the serving engine's worker thread takes over the model.

PyTorch's CPU operators run on GNU OpenMP, which keeps a pool of threads for every thread that ever ran a parallel
region. A server loads its model on one thread and runs it on the engine's worker thread: two pools. Once the
pools' threads outnumber the CPU cores, libgomp stops spinning between parallel regions and parks its threads
instead, so every operator pays a wake-up: on the development machine (2 cores) a decoding step of the embedded
model took 40-50% longer on the worker thread than the same step on the loading thread, and releasing the loading
thread's pool (OpenMP 5.0's `omp_pause_resource_all`) took that back (`docs/DESIGN_NOTES.md`, "Serving threads").
This is GNU OpenMP's behaviour (per-thread pools); a no-op where PyTorch does not run on libgomp (macOS, Windows,
builds on LLVM's or Intel's OpenMP).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

_PAUSE_SOFT = 1  # omp_pause_soft: threads ended, settings kept


def release_openmp_threads() -> bool:
    """End the calling thread's pool of OpenMP threads (a later parallel region starts a new one); `True` if one
    was ended or there was none, `False` where GNU OpenMP is not loaded or cannot pause."""
    load_only = getattr(os, "RTLD_NOLOAD", None)
    if load_only is None:
        return False
    bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    for name in ("libgomp.so.1", *map(str, bundled)):
        try:  # the libgomp PyTorch already loaded, never a second copy
            library = ctypes.CDLL(name, mode=load_only | os.RTLD_LOCAL)
        except OSError:
            continue
        pause = getattr(library, "omp_pause_resource_all", None)
        return pause is not None and pause(_PAUSE_SOFT) == 0
    return False
