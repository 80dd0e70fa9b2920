"""`inferaligner serve`: an OpenAI-compatible server with per-request gating and continuous batching."""

from inferaligner.serve.app import ServerConfig, create_app
from inferaligner.serve.continuous import SCHEDULERS, ContinuousEngine, make_engine
from inferaligner.serve.engine import BatchEngine, Engine
from inferaligner.serve.openmp import release_openmp_threads

__all__ = [
    "SCHEDULERS",
    "BatchEngine",
    "ContinuousEngine",
    "Engine",
    "ServerConfig",
    "create_app",
    "make_engine",
    "release_openmp_threads",
]
