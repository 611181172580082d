"""The HTTP search server: a FastAPI app over a `Retriever`, with a micro-batcher in front of the encoder."""

from leafkd.server.app import create_app
from leafkd.server.limits import Limits
from leafkd.server.run import serve

__all__ = ["Limits", "create_app", "serve"]
