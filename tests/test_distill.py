"""`leafkd distill` end to end on a tiny real corpus: capture, train, index, evaluate, rerun (reused), serve a query."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_server import wait_until_healthy

from leafkd.capture.store import VectorStore
from leafkd.data.beir import write_beir_subset
from leafkd.data.documents import read_documents
from leafkd.data.sources import text_hash
from leafkd.errors import LeafkdError
from leafkd.pipeline import DistillConfig, distill
from leafkd.retrieval.index import load_index

DOCS = 120


@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory, data_dir) -> Path:
    """The first DOCS Cranfield documents, with the queries judged against them (qrels restricted to them)."""
    return write_beir_subset(data_dir / "classic" / "cranfield", tmp_path_factory.mktemp("tiny-cranfield"), DOCS)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_beir, minilm_path, data_dir):
    out = tmp_path_factory.mktemp("distill") / "run"
    extra = data_dir / "train" / "wordnet_examples.txt"
    cfg = DistillConfig(corpus=str(tiny_beir), teacher=str(minilm_path), student=str(minilm_path), out=str(out),
                        data=[str(extra)], device="cpu", progress=False,
                        train={"student_layers": 1, "max_texts": 200, "heldout": 20, "epochs": 1, "batch_size": 32,
                               "adapt_spans": 1, "eval_every": 0, "checkpoint_every": 0, "bank": 10.0, "max_steps": 8,
                               "plot": False})
    return cfg, distill(cfg)


def test_every_stage_leaves_its_part(run, tiny_beir):
    cfg, result = run
    assert result.documents == DOCS
    assert (result.student / "modules.json").exists()
    assert load_index(result.index).count == DOCS
    assert result.scores is not None and {"teacher", "student", "asymmetric"} <= set(result.scores)
    assert all(0.0 < v <= 1.0 for v in result.scores.values())
    summary = json.loads((result.out / "summary.json").read_text())
    assert summary["scores"] == result.scores
    seconds = summary["seconds"]  # where the time went, stage by stage (the training's own parts included)
    assert {"train.capture", "train.setup", "train.steps", "train.finish", "train", "index", "evaluate",
            "total"} <= set(seconds)
    assert seconds["total"] >= seconds["train"] >= seconds["train.steps"] > 0
    assert "asymmetric" in (result.out / "report.md").read_text()
    assert (result.out / "scores.png").stat().st_size > 1000
    assert result.serve_command.startswith("leafkd serve --index ")


def test_the_teacher_embeds_each_document_once(run, tiny_beir):
    """One store holds every text the teacher saw (documents, pieces, spans, extra text), each once; the index's
    vectors are those stored rows, not a second encoding."""
    _, result = run
    store = VectorStore.open(result.store)
    hashes = store.hashes()
    assert len({bytes(h) for h in hashes}) == store.count == result.teacher_texts
    row_of = {bytes(h): i for i, h in enumerate(hashes)}
    index = load_index(result.index)
    stored = store.vectors()
    for doc in read_documents(tiny_beir)[:5]:
        # The stored row (float16) as a query finds its document with the score of a vector against itself: the
        # index holds the vectors of the store.
        query = stored[row_of[text_hash(doc.full_text)]].astype(np.float32)[None]
        (hit,) = index.hits(query / np.linalg.norm(query), 1)[0]
        assert hit.id == doc.id and hit.score == pytest.approx(1.0, abs=1e-5)


def test_a_rerun_reuses_every_stage(run, caplog):
    cfg, result = run
    mtime = (result.student / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="leafkd"):
        again = distill(cfg)
    assert (again.student / "model.safetensors").stat().st_mtime_ns == mtime
    logs = caplog.text
    assert "student: reusing" in logs and "index: reusing" in logs
    assert again.scores == pytest.approx(result.scores)
    assert "train.steps" not in again.seconds  # nothing was trained


def test_the_result_serves_a_query_over_http(run):
    _, result = run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "leafkd", "serve", "--index", str(result.index), "--student",
                             str(result.student), "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = wait_until_healthy(proc, port)
        answer = httpx.post(f"{url}/search", json={"queries": ["flow over a flat plate"], "top_k": 3}, timeout=60)
        assert answer.status_code == 200
        hits = answer.json()["results"][0]["hits"]
        assert len(hits) == 3 and all(h["id"] for h in hits)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_subset_keeps_its_judged_queries_and_never_replaces_another_corpus(tiny_beir, data_dir, tmp_path):
    ids = {d.id for d in read_documents(tiny_beir)}
    qrels = [r.split("\t") for r in (tiny_beir / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    assert qrels and all(r[1] in ids for r in qrels)
    judged = {r[0] for r in qrels}
    assert {json.loads(q)["_id"] for q in (tiny_beir / "queries.jsonl").read_text().splitlines()} == judged
    # The same subset again is a no-op; another one into the same folder is refused and changes nothing.
    before = (tiny_beir / "corpus.jsonl").read_text()
    write_beir_subset(data_dir / "classic" / "cranfield", tiny_beir, DOCS)
    with pytest.raises(LeafkdError, match="holds another corpus"):
        write_beir_subset(data_dir / "classic" / "cranfield", tiny_beir, DOCS + 10)
    assert (tiny_beir / "corpus.jsonl").read_text() == before
