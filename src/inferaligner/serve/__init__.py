"""`inferaligner serve`: an OpenAI-compatible server with per-request gating and dynamic batching."""

from inferaligner.serve.app import ServerConfig, create_app
from inferaligner.serve.engine import Engine

__all__ = ["Engine", "ServerConfig", "create_app"]
