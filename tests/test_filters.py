"""Metadata filters: parsing and one-line errors, SQL = Python semantics, and filtered search inside FAISS equal to an
exact search over the allowed documents, for every path (exact scoring, IDSelector, over-fetching) and index family,
with deletions and live adds; the Retriever returns metadata with its hits."""

from __future__ import annotations

import numpy as np
import pytest
import retrieval_support as S

import leafkd.retrieval.selection as selection
from leafkd.data.documents import Document
from leafkd.errors import LeafkdError
from leafkd.retrieval import Filter, FilterError, Retriever, add_documents, build_index, delete_documents, load_index
from leafkd.retrieval.docstore import DocStore

FP = "f" * 64
LANGS = ["en", "de", "fr", "it"]


def metadata_of(i: int) -> dict | None:
    """Varied metadata: missing fields, nested objects, booleans, numbers stored as strings, no metadata at all."""
    if i % 11 == 0:
        return None
    m: dict = {"year": 1940 + i % 60, "lang": LANGS[i % 4], "peer_reviewed": i % 3 == 0,
               "source": {"kind": "journal" if i % 5 else "report", "pages": i % 23}}
    if i % 7 == 0:
        del m["year"]
    if i % 13 == 0:
        m["year"] = str(m.get("year", 1999))  # a string is not a number
    return m


@pytest.fixture(scope="module")
def docs():
    return [Document(d.id, d.title, d.text, metadata_of(i)) for i, d in enumerate(S.cranfield_docs())]


@pytest.fixture(scope="module")
def emb():
    return S.cranfield_embeddings()


FILTERS = [
    {"lang": "de"},
    {"year": {"gte": 1970, "lt": 1990}},
    {"year": {"gt": 1995}, "lang": {"in": ["en", "fr"]}},
    {"source.kind": "report", "peer_reviewed": True},
    {"lang": {"ne": "en"}, "source.pages": {"lte": 3}},
    {"year": "1999"},
    {"peer_reviewed": False, "year": {"ne": 1950}},
    {"year": 1951},  # few matches
    {"lang": "xx"},  # none
]


def expected(docs, emb, q: np.ndarray, flt: dict, k: int, alive=None) -> tuple[list[list[str]], list]:
    f = Filter.parse(flt)
    ok = np.array([f.matches(d.metadata) and (alive is None or alive[i]) for i, d in enumerate(docs)])
    scores = q @ emb.T
    scores[:, ~ok] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, : min(k, int(ok.sum()))]
    return [[docs[j].id for j in row] for row in order], np.take_along_axis(scores, order, axis=1)


def assert_same(idx, docs, emb, q, flt, k=10, alive=None):
    want_ids, want_scores = expected(docs, emb, q, flt, k, alive)
    hits = idx.hits(q, k, flt)
    for hs, wi, ws in zip(hits, want_ids, want_scores):
        assert S.same_ranking([h.id for h in hs], [h.score for h in hs], wi, ws, tol=2e-4), (flt, wi)
        for h in hs:
            assert Filter.parse(flt).matches(h.metadata)


def test_parse_errors_are_one_line():
    cases = [({"year": {"between": [1, 2]}}, "unknown operator 'between'"),
             ({"bad field": 1}, "filter field 'bad field'"),
             ({"year": {"gt": True}}, "gt needs a number or a string"),
             ({"year": {"in": []}}, "'in' needs a list of 1 to 1024 values"),
             ({"year": [1, 2]}, "needs a string, a number or a boolean"),
             ({"year": {}}, "an empty object"),
             ({"year": float("nan")}, "needs a string, a number or a boolean"),
             ([1], "a filter is a JSON object")]
    for spec, message in cases:
        with pytest.raises(FilterError, match=message) as e:
            Filter.parse(spec)
        assert "\n" not in str(e.value)
    assert Filter.parse({}) is None and Filter.parse(None) is None


def test_sql_selects_what_python_matches(tmp_path, docs):
    store = DocStore(tmp_path / "s.sqlite")
    store.fill(docs, np.arange(len(docs)))
    for spec in FILTERS + [{"source": "journal"}, {"source.kind": {"ne": "journal"}}, {"year": {"gte": "1990"}}]:
        flt = Filter.parse(spec)
        want = [i for i, d in enumerate(docs) if flt.matches(d.metadata)]
        assert store.match(flt).tolist() == want, spec
    store.close()


def test_milvus_expression():
    f = Filter.parse({"year": {"gte": 1970, "lt": 1990}, "lang": {"in": ["en", "d\"e"]}, "source.kind": "r",
                      "peer_reviewed": True})
    assert f.to_milvus() == ('metadata["year"] >= 1970 and metadata["year"] < 1990 and '
                             '(metadata["lang"] == "en" or metadata["lang"] == "d\\"e") and '
                             'metadata["source"]["kind"] == "r" and metadata["peer_reviewed"] == true')


@pytest.mark.parametrize("factory,exact_max", [("Flat", 4096), ("Flat", 0), ("HNSW32", 0), ("IVF16,Flat", 0),
                                               ("SQ8", 0), ("PQ16x4", 0), ("PQ16x4", 4096)])
def test_filtered_search_is_exact_among_allowed(tmp_path, monkeypatch, docs, emb, factory, exact_max):
    """exact_max=0 forces the IDSelector path (or over-fetching where FAISS takes no selector: IndexPQ)."""
    monkeypatch.setattr(selection, "EXACT_MAX", exact_max)
    params = {"nprobe": 16} if factory.startswith("IVF") else {"efSearch": 256} if "HNSW" in factory else None
    folder = build_index(tmp_path / "ix", docs, vectors=emb, teacher_fingerprint=FP, factory=factory,
                         search_params=params)  # (a knob the index type lacks is refused since issue 18)
    idx = load_index(folder)
    rng = np.random.default_rng(1)
    q = emb[rng.choice(len(docs), 6, replace=False)] + 0.05 * rng.standard_normal((6, emb.shape[1])).astype("f4")
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ref = emb
    if "PQ" in factory or "SQ" in factory:  # the index scores by its decoded vectors
        ref = idx.index.reconstruct_n(0, idx.index.ntotal)
    for flt in FILTERS:
        assert_same(idx, docs, ref, q, flt)
    # deletions (live: tombstones; after reload: removed, or tombstones for HNSW) and a live add
    gone = [d.id for d in docs if d.metadata and d.metadata.get("lang") == "de"][:40]
    delete_documents(idx, gone)
    alive = np.array([d.id not in set(gone) for d in docs])
    assert_same(idx, docs, ref, q, {"lang": {"in": ["de", "en"]}}, alive=alive)
    assert_same(idx, docs, ref, q, {"year": {"gte": 1950}}, k=50, alive=alive)
    new = Document("new-de", "", "a new document", {"lang": "de", "year": 2030})
    add_documents(idx, [new], vectors=q[:1], teacher_fingerprint=FP)
    assert idx.hits(q[:1], 3, {"year": 2030})[0][0].id == "new-de"
    if "PQ" not in factory:  # (4-bit PQ codes may rank another document above the new one's own vector)
        assert idx.hits(q[:1], 3, {"lang": "de"})[0][0].id == "new-de"
    idx.close()
    again = load_index(folder)
    if "PQ" not in factory and "SQ" not in factory:  # (codes of the added vector: not reconstructed above)
        assert_same(again, docs + [new], np.concatenate([ref, q[:1]]), q, {"lang": {"in": ["de", "en"]}},
                    alive=np.append(alive, True))
    assert again.count == len(docs) - len(gone) + 1 and "new-de" in again and gone[0] not in again
    again.close()


def test_retriever_filters_and_returns_metadata(tmp_path, docs, emb):
    folder = build_index(tmp_path / "ix", docs, vectors=emb, teacher=S.teacher_dir(),
                         teacher_fingerprint=S.teacher_fp())
    r = Retriever.load(folder, student=S.student_dir())
    plain = r.search(["shock waves at hypersonic speed"], top_k=5)[0]
    hits = r.search(["shock waves at hypersonic speed"], top_k=5, filter={"lang": "fr", "year": {"lt": 1970}})[0]
    assert len(hits) == 5 and all(h.metadata["lang"] == "fr" and h.metadata["year"] < 1970 for h in hits)
    assert [h.id for h in hits] != [h.id for h in plain] and hits[0].to_dict()["metadata"]["lang"] == "fr"
    assert r.search(["x"], top_k=3, filter={"lang": "none"}) == [[]]
    with pytest.raises(LeafkdError, match="unknown operator"):
        r.search(["x"], filter={"year": {"like": "19%"}})
    r.index.close()


def test_metadata_columns_match_sql(tmp_path, monkeypatch, docs):
    import leafkd.retrieval.columns as columns

    store = DocStore(tmp_path / "s.sqlite")
    store.fill(docs[:1000], np.arange(1000))
    cols = columns.MetadataColumns()
    specs = FILTERS + [{"source": "journal"}, {"source.kind": {"ne": "journal"}}, {"year": {"gte": "1990"}},
                       {"year": {"lt": "1999"}}, {"lang": {"gt": "en"}}, {"lang": {"lte": "en"}}, {"year": True}]
    for spec in specs:
        flt = Filter.parse(spec)
        assert cols.match(store, flt).tolist() == store.match(flt).tolist(), spec
    assert set(cols.columns) == {"lang", "year", "source.kind", "peer_reviewed", "source.pages", "source"}
    # documents added after the columns were built are matched in SQLite, until a rebuild takes them in
    from leafkd.retrieval.docstore import Segment

    store.add(docs[1000:], Segment(1, "segment.1.npy", "-", 1000, len(docs) - 1000))
    for spec in specs:
        flt = Filter.parse(spec)
        assert cols.match(store, flt).tolist() == store.match(flt).tolist(), spec
    assert cols.upto == 1000
    monkeypatch.setattr(columns, "TAIL_MIN", 10)
    cols.match(store, Filter.parse({"lang": "de"}))
    assert cols.upto == len(docs) and len(cols.keys) == len(docs)
    store.close()
