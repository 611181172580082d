"""Retrieval over a teacher-built index with queries embedded by a student (asymmetric), the teacher, or a student
over its own index.

The point of asymmetric retrieval: documents are embedded once by the large teacher, and each query costs only a
small student forward pass plus a FAISS search. That only works if the student was trained into *this* teacher's
space, so a student whose ``leafkd.json`` names another teacher is refused (unless explicitly overridden, for
black-box teachers whose fingerprint cannot be checked).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leafkd.choices import Choice
from leafkd.errors import LeafkdError
from leafkd.retrieval.backend import Backend, Hit, SearchIndex
from leafkd.retrieval.filters import Filter
from leafkd.retrieval.index import load_index
from leafkd.retrieval.manifest import DEFAULT_INDEXES_DIR
from leafkd.retrieval.query_encoder import QueryEncoder
from leafkd.student.info import read_student_info

logger = logging.getLogger(__name__)


class Mode(Choice):
    """Which model embeds the queries, and which index it may search."""

    ASYMMETRIC = "asymmetric"  # a student over its teacher's index
    TEACHER = "teacher"  # the teacher over the index it built
    STUDENT = "student"  # a student over an index it built itself


def load_encoder(path: str | Path, prompt: str | None, device: str | None, dtype, query_backend: str = "torch",
                 threads: int = 1):
    """The query encoder of the model at `path`: torch (`QueryEncoder`) or its ONNX export (`OnnxQueryEncoder`,
    CPU, `threads` onnxruntime threads)."""
    from leafkd.models import resolve_model
    from leafkd.retrieval.onnx_encoder import OnnxQueryEncoder, QueryBackend
    from leafkd.student.static import load_student

    p = resolve_model(path)
    if QueryBackend.parse(query_backend, "query_backend") is QueryBackend.ONNX:
        return OnnxQueryEncoder(p, prompt=prompt, threads=threads, name=str(p))
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return QueryEncoder(load_student(p, device=dev), prompt=prompt, device=dev, dtype=dtype, name=str(p))


def refuse_mismatch(problem: str, allow_mismatch: bool, advice: str) -> None:
    """A fingerprint mismatch is an error, or a warning when the check was overridden."""
    if not allow_mismatch:
        raise LeafkdError(problem + advice)
    logger.warning("warning: %s; continuing because the fingerprint check was overridden", problem)


def check_student(student: str | Path, index: SearchIndex, allow_mismatch: bool = False) -> dict:
    """Refuse a student that was not trained into the index's teacher space; returns its leafkd.json."""
    info = read_student_info(student)
    fp = info.get("teacher_fingerprint")
    want = index.teacher_fingerprint
    if index.accepts_fingerprint(fp):
        return info
    if not info:
        problem = f"{student} is not a leafkd student (no leafkd.json), so its teacher cannot be checked"
    elif not fp:
        problem = f"{student}/leafkd.json has no teacher_fingerprint"
    else:
        problem = (f"the student {student} was trained for teacher {info.get('teacher')!r} (fingerprint {fp[:12]}), "
                   f"but the index was built by {index.manifest.get('teacher')!r} (fingerprint {want[:12]})")
    refuse_mismatch(problem, allow_mismatch, "; its queries would land in another vector space "
                    "(use --allow-fingerprint-mismatch only for a black-box teacher you know is the same)")
    return info


def check_model_built_index(model_path: str | Path, index: SearchIndex, allow_mismatch: bool = False) -> None:
    """Refuse to query an index with a model that is not the one that embedded its documents."""
    from leafkd.models import fingerprint, resolve_model

    fp = fingerprint(resolve_model(model_path))
    if fp == index.teacher_fingerprint:
        return
    problem = (f"{model_path} (fingerprint {fp[:12]}) is not the model that built the index "
               f"({index.manifest.get('teacher')!r}, fingerprint {index.teacher_fingerprint[:12]})")
    refuse_mismatch(problem, allow_mismatch, " (use --allow-fingerprint-mismatch to override)")


def open_index(index: str | Path | SearchIndex, *, backend: str | Backend = Backend.FAISS,
               indexes_dir: str | Path = DEFAULT_INDEXES_DIR, uri: str | None = None, token: str | None = None,
               verify: bool = True, gpu: bool | None = None, fp16: bool | None = None, shards: int = 1) -> SearchIndex:
    """An index to search: a loaded one as it is, a FAISS index folder or name, or (``backend="milvus"``) the
    Milvus collection ``index`` at ``uri`` (a Milvus Lite file, or ``http://host:19530`` with ``token``)."""
    if not isinstance(index, (str, Path)):
        return index
    if Backend.parse(backend, "backend") is Backend.MILVUS:
        from leafkd.retrieval.milvus import MilvusIndex

        if uri is None:
            raise LeafkdError("the milvus backend needs a uri (a Milvus Lite .db path, or http://host:19530)")
        return MilvusIndex.open(uri, str(index), token=token)
    return load_index(index, indexes_dir, verify=verify, gpu=gpu, fp16=fp16, shards=shards)


class Retriever:
    """An index (any `SearchIndex` backend) plus the encoder that embeds its queries."""

    def __init__(self, index: SearchIndex, encoder: QueryEncoder, mode: str | Mode = Mode.ASYMMETRIC) -> None:
        mode = Mode.parse(mode, "mode")
        if encoder.dim and encoder.dim != index.dim:
            raise LeafkdError(f"the query encoder emits {encoder.dim}-d vectors, the index is {index.dim}-d")
        self.index = index
        self.encoder = encoder
        self.mode: Mode = mode

    @classmethod
    def load(cls, index: str | Path | SearchIndex, *, student: str | Path | None = None,
             teacher: str | Path | None = None, mode: str | Mode = Mode.ASYMMETRIC,
             indexes_dir: str | Path = DEFAULT_INDEXES_DIR, device: str | None = None,
             dtype: str | torch.dtype | None = None, gpu: bool | None = None, fp16: bool | None = None, shards: int = 1,
             allow_fingerprint_mismatch: bool = False, query_prompt: str | None = None, verify: bool = True,
             backend: str | Backend = Backend.FAISS, uri: str | None = None, token: str | None = None,
             query_backend: str = "torch", onnx_threads: int = 1) -> Retriever:
        """Load an index and the encoder for ``mode``, checking they share one vector space.

        - ``asymmetric``: queries by ``student``, whose leafkd.json teacher fingerprint must be the index's.
        - ``teacher``: queries by ``teacher`` (default: the teacher recorded in the index), which must have built it.
        - ``student``: queries by ``student`` over an index the student built itself.

        ``index`` is a FAISS index name or folder, a loaded index, or with ``backend="milvus"`` a Milvus collection
        name at ``uri`` (``token``: the cluster's credentials).
        ``query_backend="onnx"`` runs the query model's ONNX export (`leafkd export --onnx`) with ``onnx_threads``.
        """
        mode = Mode.parse(mode, "mode")
        doc_index = open_index(index, backend=backend, indexes_dir=indexes_dir, uri=uri, token=token, verify=verify,
                               gpu=gpu, fp16=fp16, shards=shards)
        allow = allow_fingerprint_mismatch
        if mode is Mode.ASYMMETRIC:
            if student is None:
                raise LeafkdError("mode asymmetric needs a student model (--student)")
            info = check_student(student, doc_index, allow)
            prompt = query_prompt if query_prompt is not None else info.get("query_prompt")
            path = student
        elif mode is Mode.TEACHER:
            recorded = teacher if teacher is not None else doc_index.manifest.get("teacher")
            if recorded is None or not Path(str(recorded)).is_dir():
                raise LeafkdError("mode teacher needs the teacher model folder (--teacher)")
            path = recorded
            check_model_built_index(path, doc_index, allow)
            prompt = query_prompt
            if prompt is None:
                prompt = doc_index.manifest.get("query_prompt")
            if prompt is None and student is not None:
                prompt = read_student_info(student).get("query_prompt")
        else:
            if student is None:
                raise LeafkdError("mode student needs a student model (--student)")
            check_model_built_index(student, doc_index, allow)
            prompt = query_prompt if query_prompt is not None else doc_index.manifest.get("query_prompt")
            path = student
        encoder = load_encoder(path, prompt, device, dtype, query_backend, onnx_threads)
        return cls(doc_index, encoder, mode)

    def warmup(self, freeze_gc: bool = False) -> None:
        """Warm the encoder's shapes (and CUDA graphs) and the index; ``freeze_gc`` moves every object alive now
        out of the garbage collector's scans (for servers: no long GC pauses in the query path)."""
        if not getattr(self.encoder, "warm", True):
            self.encoder.warmup()
        self.search_vectors(self.embed(["warm up"]), min(10, max(self.index.count, 1)))
        if freeze_gc:
            gc.collect()
            gc.freeze()

    # -- queries
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised query vectors (float32 [n, dim])."""
        return self.encoder(list(texts))

    def search_vectors(self, vectors: np.ndarray, top_k: int = 10, filter: Filter | dict | None = None
                       ) -> list[list[Hit]]:
        return self.index.hits(vectors, top_k, filter)

    def search(self, queries: Sequence[str], top_k: int = 10, filter: Filter | dict | None = None) -> list[list[Hit]]:
        """The ``top_k`` documents (id, score, title, text, metadata) of each query, best first, among the documents
        whose metadata passes ``filter`` (e.g. ``{"year": {"gte": 2000}, "lang": "de"}``; see
        `leafkd.retrieval.filters`)."""
        if isinstance(queries, str):
            raise TypeError("search() takes a list of queries; wrap a single query in a list")
        if top_k < 1:
            raise LeafkdError(f"top_k must be at least 1, got {top_k}")
        flt = Filter.parse(filter)  # a bad filter fails before the queries are embedded
        return self.search_vectors(self.embed(queries), top_k, flt)

    def info(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "encoder": self.encoder.name,
            "encoder_device": str(self.encoder.device),
            "encoder_dtype": str(self.encoder.dtype).replace("torch.", ""),
            "encoder_fast_path": bool(getattr(self.encoder, "fast", False)),
            "cuda_graphs": getattr(self.encoder, "cuda_graphs", 0),
            "cuda_graph_error": getattr(self.encoder, "graph_error", None),
            "index": str(self.index.path),
            "index_device": self.index.device,
            "backend": self.index.manifest.get("backend", Backend.FAISS.value),
            "factory": self.index.manifest["factory"],
            "documents": self.index.count,
            "dim": self.index.dim,
            "teacher": self.index.manifest.get("teacher"),
        }


