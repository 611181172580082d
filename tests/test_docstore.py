"""The SQLite document store and the segment layout: metadata in corpora, O(batch) adds and deletes on disk, live
updates of a loaded index, refresh, compaction, snapshots, migration of JSONL-store indexes, and kills at every
stage of an update leaving a loadable index."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import retrieval_support as S

from leafkd.data.documents import Document, read_documents
from leafkd.errors import LeafkdError
from leafkd.retrieval import (
    DuplicateIdError,
    InvalidDocumentError,
    UnknownIdError,
    add_documents,
    build_index,
    compact_index,
    delete_documents,
    get_document,
    index_info,
    load_index,
    snapshot_index,
)
from leafkd.retrieval.docstore import DocStore

FP = "f" * 64
DIM = 32
REPO = Path(__file__).resolve().parents[1]


def corpus(n: int, start: int = 0) -> tuple[list[Document], np.ndarray]:
    """Cranfield texts with metadata, and random unit vectors (the store does not care what they are)."""
    base = S.cranfield_docs()
    docs = [Document(f"c{i}", base[i % len(base)].title, base[i % len(base)].text,
                     {"year": 1950 + i % 40, "lang": ["en", "de", "fr"][i % 3], "i": i})
            for i in range(start, start + n)]
    x = np.random.default_rng(start).standard_normal((n, DIM)).astype(np.float32)
    return docs, x / np.linalg.norm(x, axis=1, keepdims=True)


def top1(idx, vecs: np.ndarray) -> list[str]:
    return [h[0].id if h else "" for h in idx.hits(vecs, 1)]


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} - {"docs.sqlite-wal", "docs.sqlite-shm"}


def test_corpus_metadata_is_read_and_stored(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"_id": "a", "text": "alpha", "metadata": {"year": 2001, "tags": ["x"]}}\n'
                    '{"_id": "b", "title": "T", "text": "beta"}\n')
    docs = read_documents(path)
    assert docs[0].metadata == {"year": 2001, "tags": ["x"]} and docs[1].metadata is None
    folder = build_index(tmp_path / "ix", docs, vectors=np.eye(2, DIM, dtype=np.float32), teacher_fingerprint=FP)
    assert get_document(folder, "a") == Document("a", "", "alpha", {"year": 2001, "tags": ["x"]})
    assert get_document(folder, "nope") is None
    idx = load_index(folder)
    hit = idx.hits(np.eye(1, DIM, dtype=np.float32), 1)[0][0]
    assert hit.metadata == {"year": 2001, "tags": ["x"]} and hit.to_dict()["metadata"]["year"] == 2001
    assert "metadata" not in idx.hits(np.eye(2, DIM, dtype=np.float32)[1:], 1)[0][0].to_dict()
    idx.close()
    (tmp_path / "bad.jsonl").write_text('{"_id": "a", "text": "x", "metadata": [1, 2]}\n')
    with pytest.raises(LeafkdError, match=r"bad.jsonl:1: field 'metadata' is not a JSON object"):
        read_documents(tmp_path / "bad.jsonl")
    with pytest.raises(InvalidDocumentError, match="metadata must be a JSON object"):
        add_documents(folder, [Document("z", "", "x", "not a dict")], vectors=np.eye(1, DIM), teacher_fingerprint=FP)


def test_adds_and_deletes_touch_only_the_batch_on_disk(tmp_path):
    docs, x = corpus(400)
    folder = build_index(tmp_path / "ix", docs[:300], vectors=x[:300], teacher_fingerprint=FP)
    base = {f: (folder / f).stat() for f in ("index.1.faiss", "keys.1.npy", "manifest.json")}
    m = add_documents(folder, docs[300:], vectors=x[300:], teacher_fingerprint=FP)
    assert m["count"] == 400 and m["seq"] == 1 and m["generation"] == 1
    assert files(folder) == {"manifest.json", "index.1.faiss", "keys.1.npy", "docs.sqlite", "segment.1.npy"}
    assert (folder / "segment.1.npy").stat().st_size < 100 * DIM * 4 + 1024  # the batch's vectors only
    m = delete_documents(folder, ["c5", "c350"])
    assert m["count"] == 398 and m["seq"] == 2
    for f, st in base.items():  # the base and the manifest were neither rewritten nor replaced
        now = (folder / f).stat()
        assert (now.st_ino, now.st_mtime_ns, now.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size)
    info = index_info(folder)
    assert info.manifest["count"] == 398 and info.manifest["segments"] == 1 and info.manifest["removed"] == 2
    assert "1 segment(s) and 2 deletion(s)" in info.summary()
    idx = load_index(folder)
    assert idx.count == 398 and "c5" not in idx and "c350" not in idx and "c399" in idx
    assert top1(idx, x[[6, 351, 399]]) == ["c6", "c351", "c399"]
    assert "c5" not in top1(idx, x[[5]]) and "c350" not in top1(idx, x[[350]])
    idx.close()
    with pytest.raises(DuplicateIdError, match="already in the index") as e:  # (a server's 409)
        add_documents(folder, docs[10:11], vectors=x[10:11], teacher_fingerprint=FP)
    assert e.value.ids == ["c10"]
    with pytest.raises(UnknownIdError, match="not in the index: c5"):  # (404)
        delete_documents(folder, ["c5"])
    assert delete_documents(folder, ["c5"], missing_ok=True)["count"] == 398


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF8,Flat"])
def test_live_updates_and_refresh(tmp_path, factory):
    docs, x = corpus(300)
    folder = build_index(tmp_path / "ix", docs[:200], vectors=x[:200], teacher_fingerprint=FP, factory=factory)
    idx = load_index(folder)
    m = add_documents(idx, docs[200:250], vectors=x[200:250], teacher_fingerprint=FP)  # a server's loaded index
    assert m is idx.manifest and idx.count == 250 and top1(idx, x[[210, 249]]) == ["c210", "c249"]
    delete_documents(idx, ["c3", "c210"])
    assert idx.count == 248 and top1(idx, x[[3, 210]]) != ["c3", "c210"]
    assert "c3" not in {h.id for h in idx.hits(x[[3]], 248)[0]}
    # another process (here: the folder API) updates the index; refresh catches up
    add_documents(folder, docs[250:], vectors=x[250:], teacher_fingerprint=FP)
    delete_documents(folder, ["c4"])
    assert idx.count == 248 and idx.refresh() and idx.count == 297 and not idx.refresh()
    assert top1(idx, x[[299, 4]])[0] == "c299" and "c4" not in {h.id for h in idx.hits(x[[4]], 297)[0]}
    fresh = load_index(folder)  # deletions removed from FAISS where it can, tombstones for HNSW
    assert fresh.count == 297 and top1(fresh, x[[299, 4, 5]]) == top1(idx, x[[299, 4, 5]])
    assert len(fresh.dead) == (3 if factory == "HNSW16" else 0) and fresh.index.ntotal == 297 + len(fresh.dead)
    fresh.close()
    idx.close()


def test_compaction_folds_updates_into_a_new_base(tmp_path):
    docs, x = corpus(300)
    folder = build_index(tmp_path / "ix", docs[:200], vectors=x[:200], teacher_fingerprint=FP, factory="HNSW16")
    add_documents(folder, docs[200:250], vectors=x[200:250], teacher_fingerprint=FP)
    add_documents(folder, docs[250:], vectors=x[250:], teacher_fingerprint=FP)
    delete_documents(folder, [f"c{i}" for i in range(0, 300, 7)])
    before = load_index(folder)
    want = before.hits(x[:40], 5)
    m = compact_index(folder)
    assert m["generation"] == 2 and m["count"] == 300 - 43 and m["base_seq"] == 3
    assert files(folder) == {"manifest.json", "index.2.faiss", "keys.2.npy", "docs.sqlite"}
    after = load_index(folder)
    assert len(after.dead) == 0 and after.index.ntotal == 257  # the HNSW was rebuilt without tombstones
    assert [[h.id for h in r] for r in after.hits(x[:40], 5)] == [[h.id for h in r] for r in want]
    assert compact_index(folder)["generation"] == 2  # nothing to fold: nothing written
    # the loaded index followed the compaction
    assert before.refresh() and before.static["generation"] == 2 and before.count == 257
    add_documents(before, docs[:1], vectors=x[:1], teacher_fingerprint=FP)  # c0 was deleted: addable again
    assert top1(before, x[:1]) == ["c0"]
    before.close()
    after.close()


def test_snapshot_round_trip(tmp_path):
    docs, x = corpus(120)
    folder = build_index(tmp_path / "ix", docs[:100], vectors=x[:100], teacher_fingerprint=FP)
    add_documents(folder, docs[100:], vectors=x[100:], teacher_fingerprint=FP)
    delete_documents(folder, ["c1"])
    idx = load_index(folder)
    snap = snapshot_index(idx, tmp_path / "snap")  # from a loaded (serving) index
    add_documents(idx, [Document("late", "", "added after the snapshot")], vectors=x[:1], teacher_fingerprint=FP)
    delete_documents(idx, ["c2"])
    copy = load_index(snap)  # verifies every checksum
    assert copy.count == 119 and "late" not in copy and "c2" in copy and "c1" not in copy
    assert copy.get_document("c110") == docs[110]
    assert top1(copy, x[[2, 110]]) == ["c2", "c110"] and idx.count == 119 and "late" in idx
    assert copy.manifest["snapshot_of"] == str(folder) and copy.manifest["name"] == "snap"
    # the snapshot is an index of its own: updating one leaves the other alone
    delete_documents(copy, ["c3"])
    assert "c3" in idx and copy.count == 118
    copy.close()
    with pytest.raises(LeafkdError, match="already exists"):
        snapshot_index(folder, snap)
    with pytest.raises(LeafkdError, match="cannot replace the index it copies"):
        snapshot_index(folder, folder, overwrite=True)
    assert load_index(snapshot_index(folder, snap, overwrite=True)).count == 119
    idx.close()


def legacy_index(folder: Path, docs: list[Document], x: np.ndarray, factory: str) -> None:
    """An index in the leafkd-index/1 layout (docs.<gen>.jsonl), as the previous release wrote it."""
    import faiss

    from leafkd.atomic import sha256_file, write_json
    from leafkd.retrieval.faiss_utils import add_vectors, make_index, supports_ids, train_index

    index = make_index(factory, DIM)
    if not index.is_trained:
        train_index(index, x, use_gpu=False)
    keys = np.arange(len(docs), dtype=np.int64) if supports_ids(index) else None
    add_vectors(index, x, keys)
    ids: list[str | None] = [d.id for d in docs]
    if keys is None and factory.startswith("HNSW"):
        ids[5] = None  # a tombstone row, as the old delete left them
    folder.mkdir()
    files = {"index": "index.3.faiss", "docs": "docs.3.jsonl"}
    faiss.write_index(index, str(folder / files["index"]))
    with open(folder / files["docs"], "w", encoding="utf-8") as f:
        for row in zip(ids, [d.title for d in docs], [d.text for d in docs]):
            f.write(json.dumps(row) + "\n")
    if keys is not None:
        files["keys"] = "keys.3.npy"
        np.save(folder / files["keys"], keys)
    write_json(folder / "manifest.json", {
        "format": "leafkd-index/1", "name": folder.name, "teacher": "t", "teacher_fingerprint": FP,
        "teacher_fingerprints": {FP: {}}, "dim": DIM, "metric": "inner_product", "normalized": True,
        "factory": factory, "labels": "keys" if keys is not None else "positions", "count": len(docs) - 1,
        "rows": len(docs), "tombstones": int(ids[5] is None), "next_key": len(docs), "search_params": {},
        "generation": 3, "files": files, "checksums": {f: sha256_file(folder / f) for f in files.values()}})
    assert faiss.read_index(str(folder / files["index"])).ntotal == len(docs)


@pytest.mark.parametrize("factory", ["HNSW16", "IVF8,Flat"])
def test_jsonl_store_indexes_migrate_on_load(tmp_path, factory):
    docs, x = corpus(100)
    folder = tmp_path / "old"
    legacy_index(folder, docs, x, factory)
    assert "docs.3.jsonl" in files(folder)
    idx = load_index(folder)
    assert "docs.3.jsonl" not in files(folder) and "docs.sqlite" in files(folder)
    assert idx.manifest["store"] == "docs.sqlite" and idx.manifest["generation"] == 3
    live = 99 if factory == "HNSW16" else 100
    assert idx.count == live and ("c5" in idx) == (live == 100)
    assert top1(idx, x[[7, 99]]) == ["c7", "c99"] and idx.get_document("c7").text == docs[7].text
    add_documents(idx, [Document("new", "", "x")], vectors=x[:1] * -1, teacher_fingerprint=FP)
    assert load_index(folder).count == live + 1
    idx.close()


def test_unmigratable_legacy_index_is_served_from_memory(tmp_path, monkeypatch):
    import leafkd.retrieval.migrate as migrate

    docs, x = corpus(50)
    folder = tmp_path / "old"
    legacy_index(folder, docs, x, "Flat")

    def busy(folder):  # another process holds the writer lock
        raise LeafkdError(f"{folder}: another leafkd process is writing this index")

    monkeypatch.setattr(migrate, "writer_lock", busy)
    idx = load_index(folder)
    assert "docs.3.jsonl" in files(folder) and "docs.sqlite" not in files(folder)
    assert idx.count == 50 and top1(idx, x[[9]]) == ["c9"] and idx.get_document("c9") == Document(
        "c9", docs[9].title, docs[9].text)
    with pytest.raises(LeafkdError, match="cannot be updated in place"):
        delete_documents(idx, ["c9"])
    idx.close()


# -- kills: each stage of an update is interrupted by SIGKILL in a child process
CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from leafkd.data.documents import Document
    import leafkd.retrieval.compaction as C
    import leafkd.retrieval.docstore as D
    import leafkd.retrieval.migrate as M
    from leafkd.retrieval import add_documents, compact_index, load_index

    folder, stage = sys.argv[1], sys.argv[2]
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    x = np.random.default_rng(7).standard_normal((10, 32)).astype(np.float32)
    docs = [Document(f"k{i}", "", f"killed add {i}") for i in range(10)]
    if stage == "add-before-commit":
        D.DocStore.add = die
        add_documents(folder, docs, vectors=x, teacher_fingerprint="f" * 64)
    elif stage == "add-in-transaction":  # the rows are inserted, the process dies before the COMMIT
        real = D.DocStore.set_state
        def set_state_then_die(conn, **values):
            real(conn, **values)
            die()
        D.DocStore.set_state = staticmethod(set_state_then_die)
        add_documents(folder, docs, vectors=x, teacher_fingerprint="f" * 64)
    elif stage == "compact-before-manifest":
        C.write_json = die
        compact_index(folder)
    elif stage == "compact-before-tidy":
        C.tidy = die
        compact_index(folder)
    elif stage == "migrate-before-manifest":
        M.write_json = die
        load_index(folder)
    print("not killed")
""")


def run_killed(folder: Path, stage: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), stage], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr


def test_kills_at_each_stage_leave_a_loadable_index(tmp_path):
    docs, x = corpus(60)
    folder = build_index(tmp_path / "ix", docs[:50], vectors=x[:50], teacher_fingerprint=FP)
    add_documents(folder, docs[50:], vectors=x[50:], teacher_fingerprint=FP)
    delete_documents(folder, ["c1", "c55"])

    def state():
        idx = load_index(folder)  # checksums verified
        try:
            return idx.count, sorted(idx.store.ids()), top1(idx, x[[0, 2, 58]])
        finally:
            idx.close()

    before = state()
    assert before[0] == 58 and before[2] == ["c0", "c2", "c58"]
    for stage in ("add-before-commit", "compact-before-manifest"):
        run_killed(folder, stage)
        assert state() == before, stage
    run_killed(folder, "add-in-transaction")  # the transaction never committed: rolled back on open
    assert state() == before
    run_killed(folder, "compact-before-tidy")  # committed: the new base, with the old records still there
    assert state() == before and json.loads((folder / "manifest.json").read_text())["generation"] == 2
    m = add_documents(folder, [Document("after", "", "x")], vectors=x[1:2], teacher_fingerprint=FP)
    assert m["count"] == 59 and m["seq"] == 3  # the killed adds left no trace but their tidied files
    assert files(folder) == {"manifest.json", "index.2.faiss", "keys.2.npy", "docs.sqlite", "segment.3.npy"}
    legacy = tmp_path / "old"
    legacy_index(legacy, docs[:20], x[:20], "Flat")
    run_killed(legacy, "migrate-before-manifest")
    assert json.loads((legacy / "manifest.json").read_text())["format"] == "leafkd-index/1"
    assert "store" not in json.loads((legacy / "manifest.json").read_text())
    assert load_index(legacy).count == 20 and "docs.sqlite" in files(legacy)  # migrated by the next load


def test_store_survives_concurrent_readers(tmp_path):
    docs, x = corpus(50)
    folder = build_index(tmp_path / "ix", docs, vectors=x, teacher_fingerprint=FP)
    reader = DocStore(folder / "docs.sqlite", readonly=True)
    add_documents(folder, [Document("r1", "", "x")], vectors=x[:1], teacher_fingerprint=FP)
    assert reader.state().count == 51 and reader.get("r1") is not None
    reader.close()
