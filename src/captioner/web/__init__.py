"""The web service behind ``captioner serve``: FastAPI app factory, micro-batcher, static page."""

from captioner.web.app import ServeSettings, create_app
from captioner.web.batching import CaptionerLike, MicroBatcher, QueueFullError

__all__ = ["CaptionerLike", "MicroBatcher", "QueueFullError", "ServeSettings", "create_app"]
