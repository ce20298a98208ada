"""tproxy: a streaming-aware caching reverse proxy for LLM and inference APIs."""

__version__ = "0.1.0"

__all__ = ["__version__"]
