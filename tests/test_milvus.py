"""The Milvus backend, run on an embedded Milvus Lite file: it answers the Cranfield queries (student-embedded, through
the Retriever) with the same top-10 as the FAISS Flat index, filters the same documents, takes adds and deletes
through the same library calls, and releases its file for another process when closed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import retrieval_support as S

pytest.importorskip("pymilvus", reason="needs the 'milvus' extra")

from leafkd.data.documents import Document  # noqa: E402
from leafkd.errors import LeafkdError  # noqa: E402
from leafkd.retrieval import Retriever, add_documents, build_index, delete_documents, get_document  # noqa: E402
from leafkd.retrieval.milvus import MilvusIndex, build_milvus_index  # noqa: E402

FILTERS = [{"lang": "de"}, {"year": {"gte": 1970, "lt": 1980}}, {"lang": {"in": ["en", "fr"]}, "year": {"ne": 1961}},
           {"group.even": True}]


def metadata_of(i: int) -> dict | None:
    if i % 9 == 0:
        return None
    return {"year": 1950 + i % 40, "lang": ["en", "de", "fr"][i % 3], "group": {"even": i % 2 == 0}}


@pytest.fixture(scope="module")
def docs():
    return [Document(d.id, d.title, d.text, metadata_of(i)) for i, d in enumerate(S.cranfield_docs())]


@pytest.fixture(scope="module")
def backends(tmp_path_factory, docs):
    """The same documents and teacher vectors in a FAISS Flat index and a Milvus Lite collection."""
    root = tmp_path_factory.mktemp("milvus")
    emb = S.cranfield_embeddings()
    faiss_dir = build_index(root / "cranfield", docs, vectors=emb, teacher=S.teacher_dir(),
                            teacher_fingerprint=S.teacher_fp())
    uri = str(root / "lite.db")
    milvus = build_milvus_index(uri, "cranfield", docs, vectors=emb, teacher=S.teacher_dir(),
                                teacher_fingerprint=S.teacher_fp())
    yield faiss_dir, milvus, uri
    milvus.close()


def same_hits(a, b) -> bool:
    return all(S.same_ranking([h.id for h in x], [h.score for h in x], [h.id for h in y], [h.score for h in y])
               for x, y in zip(a, b))


def test_same_top10_as_faiss_through_the_retriever(backends, docs):
    faiss_dir, milvus, uri = backends
    data = S.cranfield()
    queries = list(data.queries.values())
    on_faiss = Retriever.load(faiss_dir, student=S.student_dir())
    on_milvus = Retriever.load("cranfield", backend="milvus", uri=uri, student=S.student_dir())
    assert on_milvus.index.count == len(docs) and on_milvus.info()["backend"] == "milvus"
    q = on_faiss.embed(queries)
    want = on_faiss.search_vectors(q, 10)
    got = on_milvus.search_vectors(q, 10)
    assert len(got) == len(queries) == 225 and same_hits(got, want)
    assert got[0][0].metadata == want[0][0].metadata and got[0][0].text == want[0][0].text
    for flt in FILTERS:
        assert same_hits(on_milvus.search_vectors(q[:40], 10, flt), on_faiss.search_vectors(q[:40], 10, flt)), flt
    # the same over HTTP: `leafkd serve --backend milvus` serves this Retriever
    import httpx
    from test_server import _Running

    from leafkd.server.app import create_app

    running = _Running(create_app(on_milvus, warmup=False))
    try:
        r = httpx.post(running.url + "/search", json={"queries": queries[:3], "top_k": 10, "filter": FILTERS[1]},
                       timeout=60)
        assert r.status_code == 200, r.text
        want = on_faiss.search(queries[:3], 10, FILTERS[1])
        for got_q, want_q in zip(r.json()["results"], want):
            assert S.same_ranking([h["id"] for h in got_q["hits"]], [h["score"] for h in got_q["hits"]],
                                  [h.id for h in want_q], [h.score for h in want_q])
            assert all(1970 <= h["metadata"]["year"] < 1980 for h in got_q["hits"])
    finally:
        running.stop()
    on_milvus.index.close()
    on_faiss.index.close()


def test_updates_through_the_library(backends, docs):
    faiss_dir, milvus, _uri = backends
    emb = S.cranfield_embeddings()
    new = [Document("n1", "new", "a new report on boundary layers", {"lang": "de", "year": 2001}),
           Document("n2", "", "another one", None)]
    vec = emb[[3, 4]] * 0.9 + emb[[5, 6]] * 0.1
    for index in (faiss_dir, milvus):
        add_documents(index, new, vectors=vec, teacher_fingerprint=S.teacher_fp())
        delete_documents(index, [docs[3].id, docs[10].id])
    assert milvus.count == len(docs) and get_document(milvus, "n1") == new[0]
    assert get_document(milvus, docs[3].id) is None and get_document(faiss_dir, "n1") == new[0]
    from leafkd.retrieval import load_index

    faiss_index = load_index(faiss_dir)
    q = emb[[3, 4, 10, 11]]
    assert same_hits(milvus.hits(q, 10), faiss_index.hits(q, 10))
    assert milvus.hits(q[:1], 1, {"year": 2001})[0][0].id == "n1"
    with pytest.raises(LeafkdError, match="already in the index"):
        add_documents(milvus, new[:1], vectors=vec[:1], teacher_fingerprint=S.teacher_fp())
    with pytest.raises(LeafkdError, match="not the one that built"):
        add_documents(milvus, [Document("n3", "", "x")], vectors=vec[:1], teacher_fingerprint="0" * 64)
    with pytest.raises(LeafkdError, match="not in the index"):
        delete_documents(milvus, ["no-such-id"])
    faiss_index.close()


def test_errors_and_release(tmp_path, backends):
    _faiss_dir, _milvus, uri = backends
    with pytest.raises(LeafkdError, match="no collection 'nope'"):
        MilvusIndex.open(uri, "nope")
    with pytest.raises(LeafkdError, match="collection 'cranfield' exists"):
        build_milvus_index(uri, "cranfield", [Document("a", "", "x")], vectors=np.ones((1, 384)),
                           teacher_fingerprint="f" * 64)
    with pytest.raises(LeafkdError, match="must end in .db"):
        MilvusIndex.open(str(tmp_path / "x.sqlite"), "c")
    with pytest.raises(LeafkdError, match="cannot connect to Milvus"):
        MilvusIndex.open("http://127.0.0.1:9", "c")
    with pytest.raises(LeafkdError, match="the milvus backend needs a uri"):
        Retriever.load("c", backend="milvus", student=S.student_dir())
    # a closed collection frees its file for another process
    path = str(tmp_path / "own.db")
    own = build_milvus_index(path, "small", [Document("a", "", "alpha", {"k": 1})], vectors=np.eye(1, 8),
                             teacher_fingerprint="f" * 64)
    own.close()
    code = ("from leafkd.retrieval.milvus import MilvusIndex\n"
            f"m = MilvusIndex.open({path!r}, 'small')\n"
            "print(m.count, m.get_document('a').metadata)\n"
            "m.close()\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("1 {'k': 1}"), proc.stderr[-2000:]
