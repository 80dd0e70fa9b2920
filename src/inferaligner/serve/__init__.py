"""`inferaligner serve`: an OpenAI-compatible server with per-request gating and continuous batching."""

from inferaligner.serve.app import ServerConfig, create_app
from inferaligner.serve.continuous import SCHEDULERS, ContinuousEngine, make_engine
from inferaligner.serve.engine import BatchEngine, Engine

__all__ = ["SCHEDULERS", "BatchEngine", "ContinuousEngine", "Engine", "ServerConfig", "create_app", "make_engine"]
