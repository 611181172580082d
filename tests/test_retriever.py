"""Retriever: modes, fingerprint checks, batch search against brute force, known-relevant Cranfield documents."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import retrieval_support as S

from leafkd.errors import LeafkdError
from leafkd.retrieval.retriever import Mode, Retriever

# Cranfield queries whose judged-relevant documents this teacher ranks in the top 10.
KNOWN = {"1": {"13", "51", "184"}, "5": {"552"}, "15": {"462", "463"}, "17": {"106"}}


@pytest.fixture(scope="module")
def retriever():
    return Retriever.load(S.cranfield_index(), student=S.student_dir())


def test_asymmetric_matches_brute_force(retriever):
    rs = S.cranfield()
    qids = list(rs.queries)[:30]
    texts = [rs.queries[q] for q in qids]
    hits = retriever.search(texts, top_k=10)
    # the aligned student shares the teacher's weights, so brute force with teacher query vectors is the truth
    from leafkd.runtime.encode import encode

    want_ids, want_scores = S.brute_force(encode(S.teacher_model(), texts), 10)
    for hs, wi, ws in zip(hits, want_ids, want_scores):
        assert S.same_ranking([h.id for h in hs], [h.score for h in hs], wi, ws, tol=2e-4)
        assert all(h.text == S.cranfield().corpus[h.id]["text"] for h in hs)
    by_id = dict(zip(qids, hits))
    for qid, relevant in KNOWN.items():
        assert relevant & {h.id for h in by_id[qid]}, f"query {qid}: none of {relevant} in the top 10"


def test_batch_shapes(retriever):
    assert retriever.search([], top_k=5) == []
    res = retriever.search(["shock waves", "boundary layer transition"], top_k=3)
    assert [len(r) for r in res] == [3, 3]
    assert all(r[0].score >= r[1].score >= r[2].score for r in res)
    big = retriever.search(["shock"], top_k=5000)[0]
    assert len(big) == 1398 and len({h.id for h in big}) == 1398
    with pytest.raises(LeafkdError):
        retriever.search(["x"], top_k=0)
    info = retriever.info()
    assert info["mode"] == "asymmetric" and info["documents"] == 1398 and info["index_device"] == "cpu"


def test_lean_encoder_matches_encode(retriever):
    from leafkd.runtime.encode import encode

    texts = ["a", "what similarity laws must be obeyed when constructing aeroelastic models of heated high speed "
             "aircraft"] * 3
    got = retriever.embed(texts)
    want = encode(S.teacher_model(), texts)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_foreign_student_is_refused(caplog, monkeypatch):
    # the CLI, once run in this process, stops `leafkd` records from reaching the root logger (and caplog)
    monkeypatch.setattr(logging.getLogger("leafkd"), "propagate", True)
    with pytest.raises(LeafkdError, match="trained for teacher 'some/other-teacher'"):
        Retriever.load(S.cranfield_index(), student=S.foreign_student_dir())
    with pytest.raises(LeafkdError, match="not a leafkd student"):
        Retriever.load(S.cranfield_index(), student=S.plain_model_dir())
    with caplog.at_level(logging.WARNING, logger="leafkd.retrieval"):
        r = Retriever.load(S.cranfield_index(), student=S.foreign_student_dir(), allow_fingerprint_mismatch=True)
    assert any(rec.levelno == logging.WARNING and "continuing because the fingerprint check was overridden"
               in rec.getMessage() for rec in caplog.records)
    assert len(r.search(["wing flutter"], 2)[0]) == 2


def test_teacher_and_student_modes(minilm_path):
    t = Retriever.load(S.cranfield_index(), teacher=S.teacher_dir(), mode="teacher")
    assert t.mode is Mode.TEACHER and t.mode == "teacher" and f"{t.mode}" == "teacher"
    assert t.search(["heat transfer"], 1)[0][0].id
    # the teacher recorded in the manifest is used by default
    assert Retriever.load(S.cranfield_index(), mode="teacher").encoder.name == str(S.teacher_dir())
    # the stock MiniLM folder (other max_seq_length) did not build this index
    with pytest.raises(LeafkdError, match="is not the model that built the index"):
        Retriever.load(S.cranfield_index(), teacher=minilm_path, mode="teacher")
    # mode student: the student's own index (the copy has the teacher's weights and config, so it qualifies)
    s = Retriever.load(S.cranfield_index(), student=S.student_dir(), mode="student")
    assert s.mode == "student"
    with pytest.raises(LeafkdError, match="is not the model that built the index"):
        Retriever.load(S.cranfield_index(), student=minilm_path, mode="student")
    with pytest.raises(LeafkdError, match="needs a student"):
        Retriever.load(S.cranfield_index(), mode="asymmetric")
    with pytest.raises(LeafkdError, match="mode must be asymmetric, teacher or student, not .sideways."):
        Retriever.load(S.cranfield_index(), student=S.student_dir(), mode="sideways")
    from leafkd.cli.serve import MODES  # the CLI spells the choices out (no FAISS needed for --help)

    assert MODES == tuple(m.value for m in Mode)


def test_dimension_mismatch_refused(tmp_path):
    from leafkd.retrieval.build import build_index

    folder = build_index(tmp_path / "ix", S.cranfield_docs()[:20], vectors=np.eye(20, 16, dtype=np.float32),
                         teacher_fingerprint=S.teacher_fp())
    with pytest.raises(LeafkdError, match="384-d vectors, the index is 16-d"):
        Retriever.load(folder, student=S.student_dir())


def test_fast_encoder_matches_sentence_transformers(retriever):
    """The fused path (HF model + mean pooling + projection + normalise) gives SentenceTransformer.encode's vectors."""
    enc = retriever.encoder
    assert enc.fast and retriever.info()["encoder_fast_path"]
    texts = ["a", "shock waves", "what similarity laws must be obeyed when constructing aeroelastic models of heated "
             "high speed aircraft", "boundary layer " * 60]  # the last one is truncated to the max length
    ref = S.teacher_model().encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    got = retriever.embed(texts)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert ((got * ref).sum(1) > 0.999).all()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # one text at a time equals the same text inside a padded batch: the mask keeps padding out
    single = np.stack([retriever.embed([t])[0] for t in texts])
    np.testing.assert_allclose(single, got, atol=1e-5)


def test_padding_buckets_and_spare_rows_do_not_change_vectors():
    import torch

    from leafkd.retrieval.fused import fused_forward
    from leafkd.retrieval.query_encoder import QueryEncoder
    from leafkd.retrieval.shapes import graph_shape, length_bucket

    assert [length_bucket(n, 40) for n in (1, 8, 9, 33, 41)] == [8, 8, 16, 40, 40]
    assert length_bucket(600, 512) == 512 and length_bucket(100, 384) == 128
    assert [graph_shape(n, 32) for n in (1, 3, 256, 257)] == [(1, 32), (4, 32), (256, 32), None]
    assert graph_shape(1, 128) == (1, 128) and graph_shape(2, 128) is None
    enc = QueryEncoder(S.teacher_model(), device="cpu")
    texts = ["wing flutter", "heat transfer in laminar boundary layers at high mach numbers", "x"]
    ids = enc.tokenize(texts)
    assert all(t[0] == ids[0][0] for t in ids) and max(len(t) for t in ids) <= enc.max_length
    tight = enc._run_eager(ids, max(len(t) for t in ids))
    for width in (16, 24, enc.max_length):
        np.testing.assert_allclose(enc._run_eager(ids, width), tight, atol=1e-5)
    # spare batch rows (as in a CUDA graph padded to a batch bucket) get a one-token mask and are dropped
    buf = np.empty((2, 8, 24), dtype=np.int64)
    enc._fill(buf, ids, 24)
    assert (buf[1, len(ids):, 0] == 1).all() and (buf[1, len(ids):, 1:] == 0).all()
    assert (buf[0, 0, len(ids[0]):] == enc.pad_id).all()
    with torch.inference_mode():
        out = enc._forward(torch.from_numpy(buf[0]), torch.from_numpy(buf[1])).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[: len(ids)], tight, atol=1e-5)
    assert fused_forward(object()) is None
