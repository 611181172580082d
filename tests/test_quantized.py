"""Quantised indexes: sentence-transformers' int8 / ubinary codes, the search-then-rescore pipeline against numpy, and a
quantised Cranfield index built from the float one that keeps its top-10, filters, updates, compacts and reloads."""

from __future__ import annotations

import numpy as np
import pytest
import retrieval_support as S

from leafkd.data.documents import Document
from leafkd.errors import LeafkdError
from leafkd.retrieval import (
    add_documents,
    build_index,
    compact_index,
    delete_documents,
    load_index,
    quantize_index,
)
from leafkd.retrieval.quantized import QuantizedIndex, binary_codes, int8_codes, int8_decode, int8_ranges

FP = "f" * 64


@pytest.fixture(scope="module")
def emb():
    return S.cranfield_embeddings()


def test_codes_are_sentence_transformers(emb):
    from sentence_transformers.util.quantization import quantize_embeddings

    x = emb[:300]
    assert np.array_equal(binary_codes(x), quantize_embeddings(x, "ubinary"))
    ranges = int8_ranges(emb)
    codes = int8_codes(x, ranges)
    assert codes.dtype == np.int8 and np.array_equal(codes, quantize_embeddings(x, "int8", ranges=ranges))
    step = (ranges[1] - ranges[0]) / 255
    assert np.all(np.abs(int8_decode(codes, ranges) - x) <= step / 2 + 1e-6)  # bucket midpoints


def test_search_is_search_then_rescore(emb):
    n, d = emb.shape
    q = emb[[5, 50, 500]] + 0.02
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    # candidates: Hamming top-k of the codes, exactly as numpy counts them (ties aside: compare distances)
    plain = QuantizedIndex.build(emb, "binary", "none")
    scores, labels = plain.search(q, 20)
    bits = np.unpackbits(binary_codes(emb), axis=1).astype(np.int32)
    ham = (bits[None, :, :] != np.unpackbits(binary_codes(q), axis=1)[:, None, :]).sum(-1)
    got_ham = np.take_along_axis(ham, labels, axis=1)
    assert np.array_equal(np.sort(got_ham, 1), np.sort(ham, 1)[:, :20])
    assert np.allclose(scores, 1 - 2 * got_ham / d)
    # rescoring: with every document a candidate the result is the exact top-k by the float query against the
    # decoded int8 (or the float32) rescoring vectors
    for rescore, docs_as_seen in (("int8", int8_decode(int8_codes(emb, int8_ranges(emb)), int8_ranges(emb))),
                                  ("float32", emb)):
        index = QuantizedIndex.build(emb, "binary", rescore, multiplier=n)
        scores, labels = index.search(q, 10)
        want = q @ docs_as_seen.T
        order = np.argsort(-want, axis=1, kind="stable")[:, :10]
        assert np.array_equal(labels, order) and np.allclose(scores, np.take_along_axis(want, order, 1), atol=1e-5)
    with pytest.raises(LeafkdError, match="multiple of 8"):
        QuantizedIndex.build(emb[:, :100], "binary")
    with pytest.raises(LeafkdError, match="precision must be int8 or binary, not 'int4'"):
        QuantizedIndex.build(emb, "int4")


@pytest.mark.parametrize("precision", ["binary", "int8"])
def test_quantized_cranfield_index(tmp_path, emb, precision):
    docs = [Document(d.id, d.title, d.text, {"even": i % 2 == 0}) for i, d in enumerate(S.cranfield_docs())]
    src = build_index(tmp_path / "float", docs, vectors=emb, teacher_fingerprint=FP)
    delete_documents(src, [docs[0].id])  # quantising takes the live documents
    folder = quantize_index(src, tmp_path / "q", precision=precision, multiplier=10)
    idx = load_index(folder)
    flat = load_index(src)
    assert idx.count == flat.count == len(docs) - 1 and idx.manifest["quantization"]["precision"] == precision
    memory = idx.index.memory_bytes()
    assert memory <= emb.nbytes / (24 if precision == "binary" else 3.9)
    data = S.cranfield()
    q = S.teacher_model().encode(list(data.queries.values())[:60], normalize_embeddings=True)
    got = [[h.id for h in hs] for hs in idx.hits(q, 10)]
    want = [[h.id for h in hs] for hs in flat.hits(q, 10)]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert overlap >= 0.9, overlap
    # filters go inside the quantised search (IDSelector) or score the allowed set exactly
    hits = idx.hits(q[:5], 10, {"even": True})
    assert all(len(hs) == 10 and all(h.metadata["even"] for h in hs) for hs in hits)
    # updates: live, after reload, after compaction (which rewrites codes and rescoring rows)
    new = Document("new", "", "new", {"even": False})
    add_documents(idx, [new], vectors=q[:1], teacher_fingerprint=FP)
    delete_documents(idx, [got[1][0]])
    assert idx.hits(q[:1], 1)[0][0].id == "new" and got[1][0] not in [h.id for h in idx.hits(q[1:2], 10)[0]]
    again = load_index(folder)
    assert again.count == idx.count and again.hits(q[:1], 1)[0][0].id == "new" and len(again.dead) == 0
    compact_index(folder)
    after = load_index(folder)
    assert [[h.id for h in hs] for hs in after.hits(q, 10)] == [[h.id for h in hs] for hs in again.hits(q, 10)]
    assert after.static["generation"] == 2 and after.index.rows is None
    for i in (idx, flat, again, after):
        i.close()
    with pytest.raises(LeafkdError, match="an index already exists"):
        quantize_index(src, folder)
    hnsw = build_index(tmp_path / "hnsw", docs[:100], vectors=emb[:100], teacher_fingerprint=FP, factory="HNSW16")
    with pytest.raises(LeafkdError, match="needs the exact float vectors of a Flat index"):
        quantize_index(hnsw, tmp_path / "q2")
