"""Index build/save/load round trip, add/delete for each index family, checksums, atomicity, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import retrieval_support as S

from leafkd.data.documents import check_unique_ids, read_documents
from leafkd.errors import LeafkdError
from leafkd.retrieval.build import build_index
from leafkd.retrieval.index import load_index
from leafkd.retrieval.manifest import verify_index
from leafkd.retrieval.updates import add_documents, delete_documents

FP = "f" * 64  # a fingerprint for indexes built from precomputed vectors


@pytest.fixture(scope="module")
def docs():
    return S.cranfield_docs()


@pytest.fixture(scope="module")
def emb():
    return S.cranfield_embeddings()


def test_round_trip_matches_brute_force(docs, emb):
    folder = S.cranfield_index()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["teacher_fingerprint"] == S.teacher_fp()
    assert manifest["dim"] == 384 and manifest["count"] == len(docs) == 1398
    assert manifest["metric"] == "inner_product" and manifest["factory"] == "Flat"
    assert set(manifest["checksums"]) == set(manifest["files"].values())
    idx = load_index(folder)
    assert list(idx.store.ids()) == [d.id for d in docs]
    assert idx.document(docs[5].id).text == docs[5].text and idx.document(docs[5].id).title == docs[5].title
    q = emb[[0, 10, 500, 1397]] + 0.05 * np.random.default_rng(0).standard_normal((4, 384)).astype(np.float32)
    rows, scores = idx.search(q, 10)
    want_ids, want_scores = S.brute_force(q, 10)
    for r, s, wi, ws in zip(rows, scores, want_ids, want_scores):
        assert S.same_ranking(idx.ids_of(r), s, wi, ws)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF16,Flat", "SQ8", "IVF8,PQ16"])
def test_add_delete(tmp_path, docs, emb, factory):
    n = 400
    sub, vec = docs[:n], emb[:n]
    folder = build_index(tmp_path / "ix", sub[:300], vectors=vec[:300], teacher_fingerprint=FP, factory=factory)
    idx = load_index(folder)
    assert idx.count == 300
    # Each document finds itself (exact for Flat/HNSW/SQ8 on this size; PQ is lossy, so top-5).
    rows, _ = idx.search(vec[:50], 5)
    hit = np.mean([sub[i].id in idx.ids_of(rr) for i, rr in enumerate(rows)])
    assert hit >= (0.9 if "PQ" in factory else 0.98)

    gone = [sub[3].id, sub[7].id, sub[250].id]
    m = delete_documents(folder, gone)
    assert m["count"] == 297 and m["generation"] == 1 and m["seq"] == 1  # recorded in the store, base untouched
    idx = load_index(folder)
    rows, scores = idx.search(vec[[3, 7, 250]], 20)
    assert all(len(r) == 20 for r in rows)
    assert not set(gone) & {i for rr in rows for i in idx.ids_of(rr)}
    assert not any(g in idx for g in gone)

    m = add_documents(folder, sub[300:] + [sub[3]], vectors=np.concatenate([vec[300:], vec[3:4]]),
                      teacher_fingerprint=FP)
    assert m["count"] == 398
    idx = load_index(folder)
    rows, _ = idx.search(vec[[3, 350]], 5)
    assert sub[3].id in idx.ids_of(rows[0]) and sub[350].id in idx.ids_of(rows[1])
    # the base files, the store and the one segment of the add
    names = {p.name for p in folder.iterdir()} - {"docs.sqlite-wal", "docs.sqlite-shm"}
    assert names == {"manifest.json", "docs.sqlite", "segment.2.npy", *m["files"].values()}


def test_add_rejects_duplicates_and_wrong_teacher(tmp_path, docs, emb):
    folder = build_index(tmp_path / "ix", docs[:50], vectors=emb[:50], teacher_fingerprint=FP)
    with pytest.raises(LeafkdError, match="already in the index"):
        add_documents(folder, docs[10:12], vectors=emb[10:12], teacher_fingerprint=FP)
    with pytest.raises(LeafkdError, match="not the one that built"):
        add_documents(folder, docs[60:62], vectors=emb[60:62], teacher_fingerprint="a" * 64)
    with pytest.raises(LeafkdError, match="not in the index"):
        delete_documents(folder, ["no-such-id"])
    assert load_index(folder).count == 50


def test_failed_add_leaves_old_index(tmp_path, docs, emb, monkeypatch):
    from leafkd.retrieval.docstore import DocStore

    folder = build_index(tmp_path / "ix", docs[:50], vectors=emb[:50], teacher_fingerprint=FP)
    before = (folder / "manifest.json").read_bytes()

    def boom(*a, **k):  # the segment file is written, then the store's commit fails
        raise OSError("disk full")

    with monkeypatch.context() as mp:
        mp.setattr(DocStore, "add", boom)
        with pytest.raises(OSError):
            add_documents(folder, docs[50:60], vectors=emb[50:60], teacher_fingerprint=FP)
    assert (folder / "manifest.json").read_bytes() == before
    assert (folder / "segment.1.npy").exists()  # the orphan
    idx = load_index(folder)
    assert idx.count == 50 and docs[55].id not in idx
    # and the next update succeeds and tidies the orphaned file
    add_documents(folder, docs[50:60], vectors=emb[50:60], teacher_fingerprint=FP)
    m = json.loads((folder / "manifest.json").read_text())
    assert load_index(folder).count == 60
    names = {p.name for p in folder.iterdir()} - {"docs.sqlite-wal", "docs.sqlite-shm"}
    assert names == {"manifest.json", "docs.sqlite", "segment.1.npy", *m["files"].values()}


def test_failed_rebuild_keeps_old_index(tmp_path, docs, emb):
    folder = build_index(tmp_path / "ix", docs[:50], vectors=emb[:50], teacher_fingerprint=FP)
    with pytest.raises(LeafkdError, match="already exists"):
        build_index(folder, docs[:50], vectors=emb[:50], teacher_fingerprint=FP)
    with pytest.raises(LeafkdError, match="needs at least 4096 documents"):
        build_index(folder, docs[:50], vectors=emb[:50], teacher_fingerprint=FP, factory="IVF4096,Flat",
                    overwrite=True)
    with pytest.raises(LeafkdError, match="FAISS cannot make index"):
        build_index(folder, docs[:50], vectors=emb[:50], teacher_fingerprint=FP, factory="Bogus12", overwrite=True)
    assert load_index(folder).count == 50
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_checksum_failure_and_missing_files(tmp_path, docs, emb):
    folder = build_index(tmp_path / "ix", docs[:30], vectors=emb[:30], teacher_fingerprint=FP)
    m = json.loads((folder / "manifest.json").read_text())
    keys = folder / m["files"]["keys"]
    data = bytearray(keys.read_bytes())
    data[-3] ^= 0x20
    keys.write_bytes(bytes(data))
    with pytest.raises(LeafkdError, match="checksum mismatch for keys"):
        load_index(folder)
    with pytest.raises(LeafkdError, match="checksum mismatch"):
        verify_index(folder)
    (folder / m["files"]["index"]).unlink()
    with pytest.raises(LeafkdError, match="missing"):
        load_index(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(LeafkdError, match="not an index folder"):
        load_index(folder)
    with pytest.raises(LeafkdError, match="no such index folder"):
        load_index(tmp_path / "nothing-here")


def test_read_documents_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\n  second doc \n")
    assert [(d.id, d.text) for d in read_documents(tmp_path / "a.txt")] == [("0", "first doc"), ("1", "second doc")]
    (tmp_path / "b.jsonl").write_text('{"_id": "x", "title": "T", "text": "body"}\n{"text": "no id"}\n')
    got = read_documents(tmp_path / "b.jsonl", id_start=7, taken={"7"})
    assert [(d.id, d.title) for d in got] == [("x", "T"), ("8", "")]
    (tmp_path / "c.jsonl").write_text('{"_id": "x", "text": "a"}\n{"_id": "x", "text": "b"}\n')
    with pytest.raises(LeafkdError, match="duplicate document ids"):
        check_unique_ids(read_documents(tmp_path / "c.jsonl"), tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"_id": "x", "text": "a"}\nnot json\n')
    with pytest.raises(LeafkdError, match=r"d.jsonl:2: malformed JSON"):
        read_documents(tmp_path / "d.jsonl")


def test_cli_build_info_add_delete(tmp_path, capsys):
    from leafkd.cli import main

    corpus = tmp_path / "small.jsonl"
    with open(corpus, "w") as f:
        for d in S.cranfield_docs()[:40]:
            f.write(json.dumps({"_id": d.id, "title": d.title, "text": d.text}) + "\n")
    more = tmp_path / "more.txt"
    more.write_text("supersonic flow over a cone\nheat transfer in laminar boundary layers\n")
    ixdir = tmp_path / "indexes"
    assert main(["index", "build", "--teacher", str(S.teacher_dir()), "--corpus", str(corpus), "--name", "small",
                 "--indexes-dir", str(ixdir), "--factory", "HNSW16", "--no-gpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "faiss-cpu" in out and "CPU build" in out and "40 live" in out
    assert main(["index", "info", "--name", "small", "--indexes-dir", str(ixdir), "--verify"]) == 0
    assert "checksums  ok" in capsys.readouterr().out
    assert main(["index", "add", "--name", "small", "--indexes-dir", str(ixdir), "--corpus", str(more), "--quiet"]) == 0
    assert "42 documents" in capsys.readouterr().out
    assert main(["index", "delete", "--name", "small", "--indexes-dir", str(ixdir), "--ids", "1,2"]) == 0
    assert "40 documents" in capsys.readouterr().out
    idx = load_index(ixdir / "small")
    assert "1" not in idx and "40" in idx and idx.manifest["teacher_fingerprint"] == S.teacher_fp()
    # students record the teacher fingerprint as captured (with normalisation / prompt folded in): accepted
    from leafkd.models import fingerprint

    assert idx.accepts_fingerprint(fingerprint(S.teacher_dir(), normalize=True))
    assert not idx.accepts_fingerprint("0" * 64) and not idx.accepts_fingerprint(None)
    # the added .txt lines got fresh ids after the 40 existing keys, skipping the taken id "40"
    assert idx.document("42").text == "heat transfer in laminar boundary layers"
    # user errors: one line, exit 2
    assert main(["index", "build", "--teacher", str(S.teacher_dir()), "--corpus", str(tmp_path / "nope.jsonl"),
                 "--name", "x", "--indexes-dir", str(ixdir)]) == 2
    assert main(["index", "delete", "--name", "small", "--indexes-dir", str(ixdir), "--ids", "zzz"]) == 2
    assert main(["index", "info", "--name", "missing", "--indexes-dir", str(ixdir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
