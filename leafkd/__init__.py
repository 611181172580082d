"""leafkd: distil small text-embedding students into a large teacher's space and serve asymmetric retrieval."""

import os

# Never reach the Hugging Face hub: every model is a local folder (see leafkd.models).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"

from leafkd.errors import LeafkdError  # noqa: E402

__all__ = ["LeafkdError", "__version__"]
