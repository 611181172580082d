"""Live updates over real HTTP on loopback: POST/DELETE /documents, GET /documents/{id}, /search filters with
metadata in the hits, the 4xx answers, persistence on disk, and a snapshot of the updated index."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest
import retrieval_support as S
from test_server import _Running

from leafkd.cli import main
from leafkd.retrieval import load_index, snapshot_index
from leafkd.retrieval.build import embed_documents
from leafkd.retrieval.retriever import Retriever
from leafkd.server.app import create_app
from leafkd.server.limits import Limits
from leafkd.server.teacher import DocumentEncoder

KEY = "doc-key-456"
H = {"X-API-Key": KEY}
LIMITS = Limits(max_documents=8, max_document_chars=2000, max_body_bytes=64 * 1024)
NEW = [{"id": f"new-{i}", "title": f"Note {i}", "text": text, "metadata": {"batch": 1, "year": 2000 + i, "lang": lang}}
       for i, (text, lang) in enumerate([("boundary layer separation on a swept wing at supersonic speed", "en"),
                                         ("heat transfer to a blunt body in hypersonic flow", "de"),
                                         ("buckling of thin cylindrical shells under axial load", "en")])]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    dest = tmp_path_factory.mktemp("live") / "cranfield"
    shutil.copytree(S.cranfield_index(), dest)
    return dest


@pytest.fixture(scope="module")
def retriever(folder):
    r = Retriever.load(folder, student=S.student_dir())
    yield r
    r.index.close()


@pytest.fixture(scope="module")
def teacher(retriever):
    return DocumentEncoder.load(retriever.index, S.teacher_dir(), device="cpu")


@pytest.fixture(scope="module")
def client(retriever, teacher):
    running = _Running(create_app(retriever, api_key=KEY, limits=LIMITS, teacher=teacher))
    with httpx.Client(base_url=running.url, timeout=60) as c:
        yield c
    running.stop()


def one_line_error(r: httpx.Response, status: int, text: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert text in body["error"] and "\n" not in body["error"], body
    return body


def test_add_get_search_with_filter_and_delete(client, retriever, folder):
    before = retriever.index.count
    r = client.post("/documents", json={"documents": NEW}, headers=H)
    assert r.status_code == 201, r.text
    assert r.json() == {"added": 3, "ids": ["new-0", "new-1", "new-2"], "documents": before + 3}
    got = client.get("/documents/new-1", headers=H).json()
    assert got == {"id": "new-1", "title": "Note 1", "text": NEW[1]["text"], "metadata": NEW[1]["metadata"]}

    # the teacher embedded them: the document's own vector is its nearest neighbour among all documents
    vec = embed_documents(S.teacher_model(), [load_index(folder).document("new-0")])
    assert retriever.index.hits(vec, 1)[0][0].id == "new-0"
    # filters run inside the search: only documents with that metadata come back, best first, with their metadata
    query = "supersonic flow over wings"
    body = client.post("/search", json={"query": query, "top_k": 5, "filter": {"batch": 1, "lang": "en"}},
                       headers=H).json()
    hits = body["results"][0]["hits"]
    assert {h["id"] for h in hits} == {"new-0", "new-2"}
    assert all(h["metadata"]["lang"] == "en" for h in hits)
    want = retriever.search([query], top_k=5, filter={"batch": 1, "lang": "en"})[0]
    assert [h["id"] for h in hits] == [h.id for h in want]
    assert np.allclose([h["score"] for h in hits], [h.score for h in want], atol=1e-5)
    ranged = client.post("/search", json={"query": query, "top_k": 10, "filter": {"year": {"gte": 2001}}},
                         headers=H).json()["results"][0]["hits"]
    assert sorted(h["id"] for h in ranged) == ["new-1", "new-2"]
    plain = client.post("/search", json={"query": query, "top_k": 3}, headers=H).json()["results"][0]["hits"]
    assert all("metadata" not in h for h in plain if not h["id"].startswith("new-"))

    # persisted: a fresh load from disk (another process would see the same) has them
    fresh = load_index(folder)
    assert fresh.count == before + 3 and fresh.get_document("new-2").metadata == NEW[2]["metadata"]
    fresh.close()

    r = client.request("DELETE", "/documents", json={"ids": ["new-0", "new-1"]}, headers=H)
    assert r.status_code == 200 and r.json() == {"deleted": 2, "documents": before + 1}, r.text
    one_line_error(client.get("/documents/new-0", headers=H), 404, "no document 'new-0'")
    hits = client.post("/search", json={"query": query, "top_k": 5, "filter": {"batch": 1}},
                       headers=H).json()["results"][0]["hits"]
    assert [h["id"] for h in hits] == ["new-2"]
    body = one_line_error(client.request("DELETE", "/documents", json={"ids": ["new-0", "new-2"]}, headers=H), 404,
                          "not in the index: new-0")
    assert body["detail"] == {"ids": ["new-0"]}
    assert client.get("/documents/new-2", headers=H).status_code == 200  # all or none: new-2 is still there
    r = client.request("DELETE", "/documents", json={"ids": ["new-0", "new-2"], "missing_ok": True}, headers=H)
    assert r.json() == {"deleted": 1, "documents": before}
    assert load_index(folder).count == before


def test_bad_requests_are_one_line_4xx(client):
    doc = {"id": "x1", "text": "a text"}
    one_line_error(client.post("/documents", json={"documents": [doc]}), 401, "API key")
    one_line_error(client.post("/documents", json={"documents": [doc]}, headers={"Authorization": "Bearer nope"}),
                   401, "API key")
    assert client.post("/documents", json={"documents": [doc]},
                       headers={"Authorization": f"Bearer {KEY}"}).status_code == 201
    body = one_line_error(client.post("/documents", json={"documents": [doc]}, headers=H), 409, "already in the index")
    assert body["detail"] == {"ids": ["x1"]}
    cases = [({"documents": []}, "documents"),
             ({"documents": [{"id": "y", "text": "t"}] * 2}, "repeat"),
             ({"documents": [{"id": "y", "text": "   "}]}, "both empty"),
             ({"documents": [{"id": "y", "text": "t" * 2001}]}, "over 2000"),
             ({"documents": [{"id": "y", "text": "t", "metadata": [1]}]}, "metadata"),
             ({"documents": [{"id": "y", "text": "t", "extra": 1}]}, "extra"),
             ({"documents": [{"id": f"y{i}", "text": "t"} for i in range(9)]}, "documents")]
    for payload, text in cases:
        one_line_error(client.post("/documents", json=payload, headers=H), 422, text)
    for flt, text in [({"year": {"between": 1}}, "unknown operator"), ({"a b": 1}, "filter field"),
                      ({"year": [1, 2]}, "needs a string, a number or a boolean")]:
        one_line_error(client.post("/search", json={"query": "flow", "filter": flt}, headers=H), 422, text)
    one_line_error(client.request("DELETE", "/documents", json={"ids": []}, headers=H), 422, "ids")
    assert client.get("/documents/x1", headers=H).json()["id"] == "x1"
    assert client.request("DELETE", "/documents", json={"ids": ["x1"]}, headers=H).status_code == 200


def test_no_teacher_no_adds(retriever):
    running = _Running(create_app(retriever, api_key=KEY, limits=LIMITS, warmup=False))
    try:
        with httpx.Client(base_url=running.url, timeout=60) as c:
            one_line_error(c.post("/documents", json={"documents": [{"id": "z", "text": "t"}]}, headers=H), 403,
                           "no teacher")
            assert c.get("/documents/z", headers=H).status_code == 404  # nothing was written
            r = c.request("DELETE", "/documents", json={"ids": ["z"], "missing_ok": True}, headers=H)
            assert r.status_code == 200 and r.json()["deleted"] == 0  # deletes need no teacher
    finally:
        running.stop()


def test_snapshot_round_trip(client, folder, tmp_path):
    assert client.post("/documents", json={"documents": NEW[:1]}, headers=H).status_code == 201
    snap = snapshot_index(folder, tmp_path / "snap")
    copy = load_index(snap)
    assert copy.get_document("new-0").metadata == NEW[0]["metadata"] and copy.count == load_index(folder).count
    copy.close()
    # the CLI command: a new folder named by --to; an existing one is refused with one line
    assert main(["index", "snapshot", "--name", folder.name, "--indexes-dir", str(folder.parent),
                 "--to", str(tmp_path / "snap2")]) == 0
    assert load_index(tmp_path / "snap2").get_document("new-0") is not None
    assert main(["index", "snapshot", "--name", folder.name, "--indexes-dir", str(folder.parent),
                 "--to", str(tmp_path / "snap2")]) == 2
    assert client.request("DELETE", "/documents", json={"ids": ["new-0"]}, headers=H).status_code == 200
    assert load_index(tmp_path / "snap2").get_document("new-0") is not None  # the snapshot keeps its state


def test_serve_cli_refuses_a_wrong_teacher_or_backend(folder, tmp_path, capsys):
    base = ["serve", "--index", str(folder), "--student", str(S.student_dir()), "--port", "0", "--device", "cpu"]
    assert main([*base, "--with-teacher", "--teacher", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the weight-loading progress of the student)
    assert err.startswith("error: --teacher") and "not a model folder" in err
    assert main(["serve", "--backend", "milvus", "--index", "c", "--student", str(S.student_dir()), "--port", "0"]) == 2
    assert "needs a uri" in capsys.readouterr().err


def test_an_index_another_process_is_writing_is_a_503(client, folder):
    from leafkd.retrieval.manifest import writer_lock

    doc = {"documents": [{"id": "busy-1", "text": "written while another writer holds the lock"}]}
    with writer_lock(folder):  # as `leafkd index add` would hold it (flock: per open file, so it blocks us too)
        r = client.post("/documents", json=doc, headers=H)
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "another leafkd process is writing this index" in r.json()["error"]
        assert client.request("DELETE", "/documents", json={"ids": ["1"]}, headers=H).status_code == 503
    assert client.get("/documents/busy-1", headers=H).status_code == 404  # nothing half-written
    assert client.post("/documents", json=doc, headers=H).status_code == 201  # and it works once the lock is free
    assert client.request("DELETE", "/documents", json={"ids": ["busy-1"]}, headers=H).status_code == 200
