"""The HTTP search server: a FastAPI app over a `Retriever`, with a micro-batcher in front of the encoder."""

from leafkd.extras import require

require(["fastapi", "uvicorn", "prometheus_client"], "server", "leafkd.server")

from leafkd.server.app import create_app  # noqa: E402
from leafkd.server.limits import Limits  # noqa: E402
from leafkd.server.run import serve  # noqa: E402

__all__ = ["Limits", "create_app", "serve"]
