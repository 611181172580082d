"""The evaluation harness: metrics, quantisation, both engines, published scores, CLI errors and outputs.

The SciFact published-score check encodes 5,183 abstracts (about 3 minutes for MiniLM on 2 CPU cores), so it runs
only with LEAFKD_SLOW_TESTS=1; its measured numbers are recorded in eval/results/published_check.md.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest

import leafkd.evaluation as ev
from leafkd.cli import main as cli_main

SLOW = os.environ.get("LEAFKD_SLOW_TESTS") == "1"


# ----------------------------------------------------------------------------------------------- fixtures


def _write_beir(folder: Path, docs: dict[str, dict], queries: dict[str, str],
                qrels: list[tuple[str, str, int]]) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w") as f:
        for did, d in docs.items():
            f.write(json.dumps({"_id": did, "title": d.get("title", ""), "text": d["text"]}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for qid, q in queries.items():
            f.write(json.dumps({"_id": qid, "text": q}) + "\n")
    with open(folder / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, d, s in qrels:
            f.write(f"{q}\t{d}\t{s}\n")
    return folder


def _cranfield_subset(data_dir: Path, out: Path, n_queries: int, n_docs: int, seed: int = 0) -> Path:
    rs = ev.load_task(ev.resolve_tasks(["cranfield"], data_dir)[0])
    qids = rs.query_ids[:n_queries]
    judged = [d for q in qids for d in rs.qrels[q]]
    keep = list(dict.fromkeys(judged))[: n_docs // 2]
    others = [d for d in rs.doc_ids if d not in set(keep)]
    keep += random.Random(seed).sample(others, n_docs - len(keep))
    keep_set = set(keep)
    texts = dict(zip(rs.doc_ids, rs.doc_texts))
    qtext = dict(zip(rs.query_ids, rs.query_texts))
    qrels = [(q, d, g) for q in qids for d, g in rs.qrels[q].items() if d in keep_set]
    qids = list(dict.fromkeys(q for q, _, _ in qrels))
    return _write_beir(out, {d: {"text": texts[d]} for d in keep}, {q: qtext[q] for q in qids}, qrels)


@pytest.fixture(scope="module")
def small_beir(tmp_path_factory, data_dir) -> Path:
    """A Cranfield subset (real queries, judged documents plus distractors): 250 documents."""
    return _cranfield_subset(data_dir, tmp_path_factory.mktemp("data") / "cranfield-small", 40, 250)


@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory, data_dir) -> Path:
    return _cranfield_subset(data_dir, tmp_path_factory.mktemp("data") / "cranfield-tiny", 6, 30)


@pytest.fixture(scope="module")
def tiny_sts(tmp_path_factory, data_dir) -> Path:
    lines = (data_dir / "sts/stsbenchmark/test.tsv").read_text().splitlines()
    path = tmp_path_factory.mktemp("data") / "stsb-tiny.tsv"
    path.write_text("\n".join(lines[:61]) + "\n")
    return path


@pytest.fixture(scope="module")
def minilm_embedder(minilm, minilm_path) -> ev.ModelEmbedder:
    """One MiniLM embedder (and its cache) shared by the tests that need real vectors."""
    return ev.ModelEmbedder(minilm, minilm_path, name="all-MiniLM-L6-v2", device="cpu")


# ----------------------------------------------------------------------------------------------- metrics


def _random_qrels_run(seed: int):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(60)]
    qrels, run = {}, {}
    for q in range(25):
        rels = {d: rng.choice([0, 1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 8))}
        qrels[f"q{q}"] = rels
        # coarse scores so that ties (broken by document id) are common
        run[f"q{q}"] = {d: float(rng.randint(0, 6)) / 2 for d in rng.sample(docs, 30)}
    return qrels, run


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_builtin_ndcg_matches_pytrec_eval_and_beir(seed):
    import pytrec_eval
    from beir.retrieval.evaluation import EvaluateRetrieval

    qrels, run = _random_qrels_run(seed)
    ours = ev.ndcg_at_k(qrels, run, 10)
    ref = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    for q in qrels:
        assert ours[q] == pytest.approx(ref[q]["ndcg_cut_10"], abs=1e-9)
    rec = ev.recall_at_k(qrels, run, 100)
    for q in qrels:
        assert rec[q] == pytest.approx(ref[q]["recall_100"], abs=1e-9)
    builtin = ev.retrieval_metrics(qrels, run, backend="builtin")
    trec = ev.retrieval_metrics(qrels, run, backend="pytrec_eval")
    assert builtin["ndcg_at_10"] == pytest.approx(trec["ndcg_at_10"], abs=1e-9)
    # beir's evaluator (an independent wrapper around pytrec_eval) agrees to its 5-decimal rounding
    ndcg, _map, _recall, _p = EvaluateRetrieval.evaluate(qrels, run, [10], ignore_identical_ids=False)
    assert ndcg["NDCG@10"] == pytest.approx(builtin["ndcg_at_10"], abs=1e-5)


def test_search_skips_identical_ids_and_breaks_ties_like_trec_eval():
    Q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    D = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.1]], dtype=np.float32)
    run = ev.search(Q, D, ["a", "q2"], ["a", "b", "c", "e"], top_k=2)
    assert "a" not in run["a"]  # the document with the query's id is skipped
    assert list(run["a"]) == ["b", "e"]
    run = ev.search(Q, D, ["x"], ["a", "b", "c", "e"], top_k=2)
    assert list(run["x"]) == ["b", "a"]  # equal scores: larger document id first (trec_eval)
    keep = ev.search(Q, D, ["a"], ["a", "b", "c", "e"], top_k=1, ignore_identical_ids=False)
    assert list(keep["a"]) in (["a"], ["b"])


def test_sts_metrics_spearman_of_cosine():
    a = np.array([[1, 0], [1, 1], [0, 1], [1, 2]], dtype=np.float32)
    b = np.array([[1, 0], [1, 0], [1, 0], [1, 0]], dtype=np.float32)
    m = ev.sts_metrics(a, b, np.array([5.0, 3.0, 0.0, 2.0]))
    assert m["cosine_spearman"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------- quantisation


def test_truncate_renormalises():
    x = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    t = ev.truncate(x, 4)
    assert t.shape == (5, 4)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(t, x[:, :4] / np.linalg.norm(x[:, :4], axis=1, keepdims=True), rtol=1e-5)


def test_int8_codes_of_sentence_transformers_decode_to_bucket_centres():
    from sentence_transformers import quantize_embeddings

    rng = np.random.default_rng(1)
    docs = rng.normal(size=(200, 8)).astype(np.float32)
    ranges = ev.int8_ranges(docs)
    codes = quantize_embeddings(docs, "int8", ranges=ranges)
    assert codes.dtype == np.int8 and codes.min() == -128 and codes.max() == 127
    # ranges are what calibration_embeddings would give: per-dimension min and max
    np.testing.assert_array_equal(quantize_embeddings(docs, "int8", calibration_embeddings=docs), codes)
    step = (ranges[1] - ranges[0]) / 255
    back = ev.dequantize_int8(codes, ranges)
    assert back.dtype == np.float32
    assert np.all(np.abs(back - docs) <= step / 2 + 1e-6)  # bucket centres: at most half a step away
    # sentence-transformers truncates: 0.9 of a step above the minimum stays in the lowest level
    near_low = (ranges[0] + 0.9 * step)[None, :]
    np.testing.assert_array_equal(quantize_embeddings(near_low, "int8", ranges=ranges), -128)
    outside = quantize_embeddings(docs * 10, "int8", ranges=ranges)  # values beyond the calibration range clip
    assert outside.min() == -128 and outside.max() == 127
    flat = np.vstack([np.zeros(3, np.float32), np.zeros(3, np.float32)])  # a constant dimension decodes to itself
    np.testing.assert_array_equal(ev.dequantize_int8(quantize_embeddings(np.zeros((2, 3), np.float32), "int8",
                                                                         ranges=flat), flat), 0.0)


def test_binary_quantisation_and_hamming():
    from sentence_transformers import quantize_embeddings

    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 13)), rng.normal(size=(6, 13))
    pa, pb = quantize_embeddings(a, "ubinary"), quantize_embeddings(b, "ubinary")
    assert pa.dtype == np.uint8 and pa.shape == (4, 2)
    sa, sb = np.where(a > 0, 1, -1), np.where(b > 0, 1, -1)
    np.testing.assert_array_equal(ev.hamming_similarity(pa, pb, 13), sa @ sb.T)
    q, d, fn = ev.quantized_scores(a, b, "binary")
    np.testing.assert_array_equal(fn(q, d), sa @ sb.T)
    q, d, fn = ev.quantized_scores(a, b, ev.Quantization.BINARY_FLOAT_QUERY)
    np.testing.assert_allclose(fn(q, d), (a / np.linalg.norm(a, axis=1, keepdims=True)) @ sb.T, rtol=1e-5)


def _top10_overlap(a: np.ndarray, b: np.ndarray) -> float:
    ta, tb = np.argsort(-a, axis=1)[:, :10], np.argsort(-b, axis=1)[:, :10]
    return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ta, tb)]))


@pytest.mark.parametrize("seed", [0, 1])
def test_quantised_search_agrees_with_float_search(seed):
    rng = np.random.default_rng(seed)
    Q, D = rng.normal(size=(50, 64)).astype(np.float32), rng.normal(size=(400, 64)).astype(np.float32)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    exact = unit(Q) @ unit(D).T
    scores = {k: np.asarray(fn(q, d)) for k in ev.Quantization for q, d, fn in [ev.quantized_scores(Q, D, k)]}
    assert all(s.shape == (50, 400) for s in scores.values())
    np.testing.assert_allclose(scores["float32"], exact, atol=1e-5)
    assert np.abs(scores["int8"] - exact).mean() < 0.003  # queries beyond the documents' ranges clip
    q, d, fn = ev.quantized_scores(D[:50], D, "int8")  # inside the calibration range: within half a step per dim
    assert np.abs(fn(q, d) - unit(D[:50]) @ unit(D).T).max() < 0.01
    assert _top10_overlap(scores["int8"], exact) >= 0.95
    assert 0.2 < _top10_overlap(scores["binary"], exact) < _top10_overlap(scores["binary_float_query"], exact)


class _TableEmbedder(ev.Embedder):
    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def embed(self, texts, role=None, prompts=True):
        return np.stack([self.table[t] for t in texts])

    def describe(self):
        return {"query": "table", "document": "table"}


def test_fit_ridge_map_recovers_a_linear_map():
    rng = np.random.default_rng(3)
    texts = [f"t{i}" for i in range(300)]
    X = rng.normal(size=(300, 6))
    W, b = rng.normal(size=(6, 10)), rng.normal(size=10)
    Y = X @ W + b
    m = ev.fit_ridge_map(_TableEmbedder(dict(zip(texts, X))), Y, texts, alpha=1e-6)
    np.testing.assert_allclose(m.W, W, atol=1e-4)
    np.testing.assert_allclose(m.apply(X[:3]), Y[:3], atol=1e-3)
    assert m.fit_r2 == pytest.approx(1.0, abs=1e-6)


def test_fit_ridge_map_is_trainings_ridge_fit():
    """One rule: the eval baseline is `leafkd.vectors.ridge_fit` (relative alpha, default 1e-2) like the warm start."""
    from leafkd.vectors import ridge_fit

    rng = np.random.default_rng(4)
    texts = [f"t{i}" for i in range(200)]
    X, Y = rng.normal(size=(200, 12)) * 3.0, rng.normal(size=(200, 5))
    m = ev.fit_ridge_map(_TableEmbedder(dict(zip(texts, X))), Y, texts)
    W, b = ridge_fit(X, Y)
    assert m.alpha == 1e-2 and m.n_texts == 200
    np.testing.assert_array_equal(m.W, W.T)
    np.testing.assert_array_equal(m.b, b)
    # relative: scaling the inputs leaves the fitted predictions unchanged
    scaled = ev.fit_ridge_map(_TableEmbedder(dict(zip(texts, 10 * X))), Y, texts)
    np.testing.assert_allclose(scaled.apply(10 * X), m.apply(X), atol=1e-4)
    resid = Y - m.apply(X)
    assert m.fit_r2 == pytest.approx(1 - (resid ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum(), abs=1e-5)


# ----------------------------------------------------------------------------------------------- real models


def test_stsb_published_score_minilm_both_engines(data_dir, minilm_embedder):
    """all-MiniLM-L6-v2 STSBenchmark: MTEB publishes 82.03 (Spearman x100)."""
    datas = ev.load_tasks(ev.resolve_tasks(["stsb"], data_dir))
    fast = ev.evaluate({"teacher": minilm_embedder}, datas, "fast")[0]["scores"]["STSBenchmark"]
    ref = ev.evaluate({"teacher": minilm_embedder}, datas, "mteb")[0]["scores"]["STSBenchmark"]
    print(f"STSBenchmark Spearman x100: fast {100 * fast:.4f}, mteb {100 * ref:.4f}")
    assert abs(100 * fast - ev.PUBLISHED["all-MiniLM-L6-v2"]["STSBenchmark"]) < 0.5
    assert abs(100 * ref - ev.PUBLISHED["all-MiniLM-L6-v2"]["STSBenchmark"]) < 0.5
    assert abs(fast - ref) < 1e-3


def test_engines_agree_on_retrieval(small_beir, minilm_embedder, caplog, monkeypatch):
    """Same vectors through mteb and the built-in engine: nDCG@10 within 0.1 points (in fact equal)."""
    monkeypatch.setattr(logging.getLogger("leafkd"), "propagate", True)  # the CLI's setup_logging turns it off
    datas = ev.load_tasks(ev.resolve_tasks([str(small_beir)]))
    emb = {"teacher": minilm_embedder, "asymmetric": ev.AsymmetricEmbedder(minilm_embedder, minilm_embedder)}
    with caplog.at_level("INFO", logger="leafkd.evaluation"):
        fast = ev.evaluate(emb, datas, ev.Engine.FAST)
    progress = [r.getMessage() for r in caplog.records if r.name == "leafkd.evaluation.engines"]
    assert [line.split()[:3] for line in progress] == [[mode, "cranfield-small", "ndcg_at_10"] for mode in emb]
    assert {r["engine"] for r in fast} == {"fast"} and type(fast[0]["engine"]) is str
    misses = minilm_embedder.cache.misses
    ref = ev.evaluate(emb, datas, "mteb")
    assert minilm_embedder.cache.misses == misses  # mteb reused every vector the fast engine computed
    for f, r in zip(fast, ref):
        assert f["scores"]["cranfield-small"] > 0.2
        assert abs(f["scores"]["cranfield-small"] - r["scores"]["cranfield-small"]) < 1e-3
        recall = [x["metrics"]["cranfield-small"]["recall_at_100"] for x in (f, r)]
        assert abs(recall[0] - recall[1]) < 1e-3
    builtin = ev.fast_evaluate_task(minilm_embedder, datas[0], backend="builtin")
    assert builtin["ndcg_at_10"] == pytest.approx(fast[0]["scores"]["cranfield-small"], abs=1e-6)


def test_alignment_of_a_student_identical_to_its_teacher(small_beir, minilm_embedder):
    ms = ev.ModelSet(teacher=minilm_embedder, student=minilm_embedder, cache=minilm_embedder.cache)
    datas = ev.load_tasks(ev.resolve_tasks([str(small_beir)]))
    a = ev.alignment_diagnostics(ms, datas)["cranfield-small"]
    assert a["cosine"]["queries"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert a["cosine"]["documents"]["p5"] == pytest.approx(1.0, abs=1e-5)
    assert a["top10_agreement"]["asymmetric"] == pytest.approx(1.0)
    assert set(a["truncation"]["asymmetric"]) == {"384", "256", "128", "64"}
    assert a["truncation"]["asymmetric"] == a["truncation"]["teacher"]
    q = a["quantization"]["asymmetric"]
    assert q["float32"] == pytest.approx(ev.fast_evaluate_task(minilm_embedder, datas[0])["ndcg_at_10"], abs=1e-9)
    assert abs(q["int8"] - q["float32"]) < 0.03  # int8 barely moves nDCG; binary may move it more
    assert 0.0 < q["binary"] <= 1.0


@pytest.mark.skipif(not SLOW, reason="SciFact encodes 5,183 abstracts (~3 min on CPU): set LEAFKD_SLOW_TESTS=1")
def test_scifact_published_score_minilm_both_engines(data_dir, minilm_embedder):
    """all-MiniLM-L6-v2 SciFact: MTEB publishes nDCG@10 64.51."""
    datas = ev.load_tasks(ev.resolve_tasks(["scifact"], data_dir))
    fast = ev.evaluate({"teacher": minilm_embedder}, datas, "fast")[0]["scores"]["SciFact"]
    ref = ev.evaluate({"teacher": minilm_embedder}, datas, "mteb")[0]["scores"]["SciFact"]
    print(f"SciFact nDCG@10 x100: fast {100 * fast:.4f}, mteb {100 * ref:.4f}")
    assert abs(100 * ref - ev.PUBLISHED["all-MiniLM-L6-v2"]["SciFact"]) < 0.5
    assert abs(100 * fast - ev.PUBLISHED["all-MiniLM-L6-v2"]["SciFact"]) < 0.5
    assert abs(fast - ref) < 1e-3


# ----------------------------------------------------------------------------------------------- CLI


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli_main(["eval", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _bad_beir(tmp_path: Path, problem: str) -> tuple[Path, str]:
    folder = _write_beir(tmp_path / problem, {"d1": {"text": "alpha"}, "d2": {"text": "beta"}},
                         {"q1": "alpha?", "q2": "beta?"}, [("q1", "d1", 1), ("q2", "d2", 1)])
    if problem == "missing-qrels":
        (folder / "qrels" / "test.tsv").unlink()
        return folder, "test.tsv"
    if problem == "unknown-doc":
        with open(folder / "qrels" / "test.tsv", "a") as f:
            f.write("q1\tnope\t1\n")
        return folder, "nope"
    if problem == "unknown-query":
        with open(folder / "qrels" / "test.tsv", "a") as f:
            f.write("q9\td1\t1\n")
        return folder, "q9"
    if problem == "malformed-corpus":
        with open(folder / "corpus.jsonl", "a") as f:
            f.write('{"_id": "d3", "text": \n')
        return folder, "corpus.jsonl:3"
    if problem == "malformed-qrels":
        with open(folder / "qrels" / "test.tsv", "a") as f:
            f.write("q1 d1 1\n")
        return folder, "test.tsv:4"
    if problem == "empty-queries":
        (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n")
        return folder, "no judged queries"
    raise AssertionError(problem)


@pytest.mark.parametrize("problem", ["missing-qrels", "unknown-doc", "unknown-query", "malformed-corpus",
                                     "malformed-qrels", "empty-queries"])
def test_cli_bad_beir_folder_is_one_line_error(tmp_path, capsys, minilm_path, problem):
    folder, needle = _bad_beir(tmp_path, problem)
    code, out, err = _cli(["--teacher", str(minilm_path), "--tasks", str(folder), "--engine", "fast",
                           "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert str(folder) in lines[0] or folder.name in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_bad_sts_file_and_task_name(tmp_path, capsys, minilm_path):
    bad = tmp_path / "pairs.tsv"
    bad.write_text("sentence1\tsentence2\tscore\na\tb\t1.0\nc\td\thigh\n")
    code, _, err = _cli(["--teacher", str(minilm_path), "--tasks", str(bad), "--engine", "fast"], capsys)
    assert code == 2 and err.count("\n") == 1 and f"{bad}:3" in err and "not a number" in err
    code, _, err = _cli(["--teacher", str(minilm_path), "--tasks", "nosuchtask", "--engine", "fast"], capsys)
    assert code == 2 and err.count("\n") == 1 and "unknown task 'nosuchtask'" in err


def test_cli_model_path_not_a_model(tmp_path, capsys, tiny_beir):
    not_model = tmp_path / "not-a-model"
    not_model.mkdir()
    (not_model / "weights.txt").write_text("hello")
    code, _, err = _cli(["--teacher", str(not_model), "--tasks", str(tiny_beir), "--engine", "fast"], capsys)
    assert code == 2 and err.count("\n") == 1 and str(not_model) in err and "not a SentenceTransformer" in err
    code, _, err = _cli(["--student", str(tmp_path / "missing"), "--tasks", str(tiny_beir), "--engine", "fast"], capsys)
    assert code == 2 and err.count("\n") == 1 and "missing" in err


@pytest.fixture(scope="module")
def fake_student(tmp_path_factory, minilm_path) -> Path:
    """A 'student' folder: MiniLM's files plus a leafkd.json naming MiniLM as teacher and base."""
    folder = tmp_path_factory.mktemp("student") / "student"
    folder.mkdir()
    for item in Path(minilm_path).iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "leafkd.json").write_text(json.dumps({"teacher": str(minilm_path), "teacher_fingerprint": "f" * 64,
                                                    "base": str(minilm_path), "query_prompt": None}))
    return folder


def test_cli_end_to_end_all_modes(tmp_path, capsys, fake_student, tiny_beir, tiny_sts, data_dir):
    out_dir = tmp_path / "results"
    code, out, err = _cli(["--student", str(fake_student), "--tasks", f"{tiny_beir},{tiny_sts}", "--engine", "fast",
                           "--ridge", "--ridge-texts", "200", "--alignment", "--data-dir", str(data_dir),
                           "--out", str(out_dir), "--device", "cpu"], capsys)
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| mode")]
    assert [r.split("|")[1].strip() for r in rows] == ["teacher", "student", "asymmetric", "base", "ridge"]
    assert "ridge map fitted on 200 training texts" in err and "alignment  cranfield-tiny" in err  # logged
    assert "teacher    stsb-tiny      cosine_spearman" in err
    res = json.loads((out_dir / "results.json").read_text())
    assert res["engine"] == "fast" and res["ridge"]["texts"] == 200 and res["ridge"]["alpha"] == 0.01
    assert res["modes"] == ["teacher", "student", "asymmetric", "base", "ridge"]
    assert set(res["alignment"]["cranfield-tiny"]["quantization"]["asymmetric"]) == {
        "float32", "int8", "binary", "binary_float_query"}
    by_mode = {r["mode"]: r for r in res["rows"]}
    for r in res["rows"]:
        assert r["teacher"] and r["student"] == str(fake_student) and r["data"] == str(data_dir)
        assert "commit" in r and set(r["scores"]) == {"cranfield-tiny", "stsb-tiny"}
    # the "student" is the teacher's own weights, so all of these coincide
    for mode in ("student", "asymmetric", "base"):
        assert by_mode[mode]["scores"] == pytest.approx(by_mode["teacher"]["scores"], abs=1e-6)
    assert by_mode["ridge"]["scores"]["stsb-tiny"] > 0.5
    assert res["alignment"]["cranfield-tiny"]["top10_agreement"]["asymmetric"] == pytest.approx(1.0)
    md = (out_dir / "results.md").read_text()
    assert "| mode | cranfield-tiny | stsb-tiny | average |" in md and "Matryoshka" in md
    for png in ("scores.png", "alignment.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_mteb_engine_matches_fast(tmp_path, capsys, fake_student, tiny_beir, tiny_sts):
    results = {}
    for engine in ("mteb", "fast"):
        code, _, err = _cli(["--student", str(fake_student), "--modes", "teacher,asymmetric", "--tasks",
                             f"{tiny_beir},{tiny_sts}", "--engine", engine, "--out", str(tmp_path / engine)], capsys)
        assert code == 0, err
        results[engine] = json.loads((tmp_path / engine / "results.json").read_text())
    assert [r["mode"] for r in results["mteb"]["rows"]] == ["teacher", "asymmetric"]
    for a, b in zip(results["mteb"]["rows"], results["fast"]["rows"]):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-3)
