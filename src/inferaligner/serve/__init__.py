"""`inferaligner serve`: an OpenAI-compatible server with per-request gating and continuous batching."""

from inferaligner.serve.app import create_app
from inferaligner.serve.continuous import ContinuousEngine, make_engine
from inferaligner.serve.engine import BatchEngine, Engine
from inferaligner.serve.openmp import release_openmp_threads
from inferaligner.serve.settings import SCHEDULERS, ServeSettings

__all__ = [
    "SCHEDULERS",
    "BatchEngine",
    "ContinuousEngine",
    "Engine",
    "ServeSettings",
    "create_app",
    "make_engine",
    "release_openmp_threads",
]
