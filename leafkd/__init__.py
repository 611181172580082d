"""leafkd: distil small text-embedding students into a large teacher's space and serve asymmetric retrieval.

The public API, importable from here (loaded on first use, so `import leafkd` stays light)::

    from leafkd import distill, DistillConfig                        # the main job: corpus -> served student
    from leafkd import capture, VectorStore, build_student, TrainConfig, train, build_index, load_index
    from leafkd import Retriever, run_evaluation, LeafkdError
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import leafkd.capture  # noqa: F401  (the stage subpackage, light; see `capture` below)
from leafkd.errors import LeafkdError
from leafkd.lazy import lazy_names

# Never reach the Hugging Face hub: every model is a local folder (see leafkd.models).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.2.0"

# The public API: name -> the module that defines it, imported on first use (torch and sentence-transformers load
# only then).
_PUBLIC = {
    "distill": "leafkd.pipeline.distill",
    "DistillConfig": "leafkd.pipeline.config",
    "load_distill_config": "leafkd.pipeline.config",
    "VectorStore": "leafkd.capture.store",
    "build_student": "leafkd.student.build",
    "TrainConfig": "leafkd.training.config",
    "load_config": "leafkd.training.config",
    "train": "leafkd.training.trainer",
    "build_index": "leafkd.retrieval.build",
    "load_index": "leafkd.retrieval.index",
    "Retriever": "leafkd.retrieval.retriever",
    "run_evaluation": "leafkd.evaluation.runner",
}

if TYPE_CHECKING:
    from leafkd.capture.store import VectorStore
    from leafkd.data.sources import Corpus
    from leafkd.evaluation.runner import run_evaluation
    from leafkd.pipeline.config import DistillConfig, load_distill_config
    from leafkd.pipeline.distill import distill
    from leafkd.retrieval.build import build_index
    from leafkd.retrieval.index import load_index
    from leafkd.retrieval.retriever import Retriever
    from leafkd.student.build import build_student
    from leafkd.training.config import TrainConfig, load_config
    from leafkd.training.trainer import train


def capture(teacher: str | Path, corpus: Corpus, out: str | Path, **options: Any) -> VectorStore:
    """Embed `corpus` with the teacher into a vector store at `out`, resuming one that is there
    (leafkd.capture.teacher.capture, whose keyword options it takes).

    A function here rather than a lazy name: the subpackage `leafkd.capture` shares the name, and Python binds a
    subpackage to its parent's attribute when it is first imported. It is imported above, before this definition,
    so `from leafkd import capture` is this function whatever was imported first. The subpackage's own names are
    reached with `from leafkd.capture import VectorStore` (``import leafkd.capture as m`` would give this function).
    """
    from leafkd.capture.teacher import capture as capture_corpus

    return capture_corpus(teacher, corpus, out, **options)


__getattr__ = lazy_names(__name__, globals(), _PUBLIC)


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


__all__ = ["DistillConfig", "LeafkdError", "Retriever", "TrainConfig", "VectorStore", "__version__", "build_index",
           "build_student", "capture", "distill", "load_config", "load_distill_config", "load_index", "run_evaluation",
           "train"]
