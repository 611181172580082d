"""Training: the student loads as a plain SentenceTransformer, beats the ridge start, resumes identically."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from leafkd.errors import LeafkdError
from leafkd.student.build import build_student
from leafkd.training.batches import LengthGroupedBatches
from leafkd.training.config import load_config
from leafkd.training.optim import lr_factor
from leafkd.training.trainer import train
from leafkd.vectors import ridge_fit


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory, data_dir):
    lines = (data_dir / "train" / "questions.tsv").read_text().splitlines()[1:3001:10]
    lines = [l.split("\t")[0] for l in lines]
    path = tmp_path_factory.mktemp("train") / "texts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _args(texts_file, minilm_path, out, **extra):
    args = {"teacher": str(minilm_path), "student": str(minilm_path), "student_layers": 1, "projection": "always",
            "data": [str(texts_file)], "heldout": 60, "epochs": 2.0, "batch_size": 16, "lr": 5e-4,
            "projection_lr": 5e-4, "eval_every": 0, "checkpoint_every": 6, "output": str(out), "progress": False,
            "plot": False, "device": "cpu"}
    args.update(extra)
    return args


def _cli(args):
    out = []
    for k, v in args.items():
        flag = "--" + k.replace("_", "-")
        for item in v if isinstance(v, list) else [v]:
            out += [flag, str(item).lower() if isinstance(item, bool) else str(item)]
    return out


def test_ridge_fit_recovers_linear_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8))
    w = rng.normal(size=(5, 8))
    y = x @ w.T + 3.0
    w_hat, b_hat = ridge_fit(x, y, alpha=1e-8)
    assert np.allclose(w_hat, w, atol=1e-3) and np.allclose(b_hat, 3.0, atol=1e-3)


def test_student_structure_and_save_load(tmp_path, minilm_path):
    from sentence_transformers import SentenceTransformer

    s = build_student(minilm_path, 768, layers=2, normalize=True)
    assert len(s[0].auto_model.encoder.layer) == 2
    assert [type(m).__name__ for m in s] == ["Transformer", "Pooling", "Dense", "Normalize"]
    s.save(str(tmp_path / "s"))
    again = SentenceTransformer(str(tmp_path / "s"), device="cpu")
    a, b = s.encode(["a test sentence"]), again.encode(["a test sentence"])
    assert a.shape == (1, 768) and np.allclose(a, b, atol=1e-6)
    same = build_student(minilm_path, 384, projection="auto")
    assert [type(m).__name__ for m in same] == ["Transformer", "Pooling"]


def test_schedule_and_batches():
    assert lr_factor(0, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 100, 0.1) == pytest.approx(0.0)
    idx = np.arange(100)
    sampler = LengthGroupedBatches(idx, np.r_[np.full(50, 2.0), np.full(50, 0.5)], np.arange(100) % 17, 8, seed=3)
    e0 = np.concatenate(sampler.epoch(0))
    assert np.array_equal(e0, np.concatenate(LengthGroupedBatches(idx, sampler.weights, sampler.lengths, 8, 3).epoch(0)))
    counts = np.bincount(e0, minlength=100)
    assert (counts[:50] == 2).all() and set(counts[50:]) <= {0, 1}


def test_train_beats_ridge_and_writes_outputs(tmp_path, texts_file, minilm_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "run"
    result = train(load_config(None, **_args(texts_file, minilm_path, out, epochs=4.0, plot=True)))
    final, ridge = result["final"], result["ridge_baseline"]
    assert final["heldout_cos_mean"] > ridge["heldout_cos_mean"] + 0.01
    model_dir = out / "model"
    info = json.loads((model_dir / "leafkd.json").read_text())
    assert info["teacher_dim"] == 384 and len(info["teacher_fingerprint"]) == 64
    assert info["metrics"]["final"]["heldout_cos_mean"] == pytest.approx(final["heldout_cos_mean"])
    model = SentenceTransformer(str(model_dir), device="cpu")
    assert model.encode(["x"]).shape == (1, 384)
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["type"] == "train" for r in records) and records[-3]["type"] == "eval"
    # The fit on a sample of training texts is recorded next to the held-out numbers (the overfitting gap).
    fit = result["train_fit"]
    assert records[-2] == {"type": "train_fit", "step": result["steps"], **fit}
    # Last, where the run's time went (also returned, and in distill's summary.json).
    assert records[-1] == {"type": "timing", "step": result["steps"], **result["seconds"]}
    assert set(result["seconds"]) == {"capture", "setup", "steps", "finish"}
    assert all(v >= 0 for v in result["seconds"].values()) and result["seconds"]["steps"] > 0
    assert info["metrics"]["train_fit"] == fit and fit["cos_mean"] > ridge["heldout_cos_mean"]
    assert (out / "curves.png").stat().st_size > 1000


def test_resume_after_kill_is_identical(tmp_path, texts_file, minilm_path):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    # The reference runs as its own process too: this test process's torch settings (threads, set by other tests)
    # would change the floating-point summation order and so the bits.
    ref = [sys.executable, "-m", "leafkd", "train", *_cli(_args(texts_file, minilm_path, ref_out, checkpoint_every=3))]
    assert subprocess.run(ref, capture_output=True, text=True).returncode == 0
    cmd = [sys.executable, "-m", "leafkd", "train", *_cli(_args(texts_file, minilm_path, out, checkpoint_every=3))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        ckpts = list((out / "checkpoints").glob("step-*/state.pt")) if (out / "checkpoints").exists() else []
        if any(int(p.parent.name.split("-")[1]) >= 6 for p in ckpts):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert not (out / "model").exists(), "the run finished before it could be killed"
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a = torch.load(sorted((ref_out / "checkpoints").glob("step-*"))[-1] / "state.pt", weights_only=False)["model"]
    b = torch.load(sorted((out / "checkpoints").glob("step-*"))[-1] / "state.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bank_loss_trains_against_the_named_documents(tmp_path, texts_file, minilm_path, data_dir, caplog, monkeypatch):
    # The bank: teacher vectors of a document set that is also training data (here 150 SciFact abstracts).
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(l + "\n" for l in (data_dir / "beir" / "scifact" / "corpus.jsonl").read_text().splitlines()[:150]))
    out = tmp_path / "bank"
    args = _args(texts_file, minilm_path, out, data=[str(texts_file), f"{docs}#text"], bank=50.0,
                 bank_data=[f"{docs}#text"], log_every=2)
    monkeypatch.setattr(logging.getLogger("leafkd"), "propagate", True)  # an in-process CLI call turns it off
    caplog.set_level("INFO", logger="leafkd")
    result = train(load_config(None, **args))
    logs = caplog.messages
    assert any("bank loss: 1" in m and "--bank-data" in m for m in logs), logs
    n_bank = int(next(m for m in logs if m.startswith("bank loss")).split()[2])
    assert 100 <= n_bank < 150  # the documents minus those drawn into the held-out set (60 of the 450 texts)
    parts = [r["loss_parts"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]
    assert parts and all(p["bank"] > 0 and p["leaf_l2"] > 0 for p in parts)
    assert result["final"]["heldout_cos_mean"] > result["ridge_baseline"]["heldout_cos_mean"]
    # --bank-size caps the bank (a seeded sample of the documents); held-out texts never enter it.
    from leafkd.training.data import TrainData, bank_rows

    texts = [f"text {i}" for i in range(10)]
    data = TrainData(texts, np.zeros((10, 4), np.float16), np.ones(10), np.arange(2, 10), np.arange(2), "", {},
                     bank_texts=texts[:6])
    cfg = load_config(None, **args | {"bank_size": 3})
    rows = bank_rows(cfg, data)
    assert len(rows) == 3 and set(rows) <= {2, 3, 4, 5} and np.array_equal(rows, bank_rows(cfg, data))
    assert list(bank_rows(load_config(None, **args), data)) == [2, 3, 4, 5]
    # A bank whose texts are not training data has no teacher vectors: a one-line error before any training.
    bad = _args(texts_file, minilm_path, tmp_path / "bad-bank", bank=1.0, bank_data=[f"{docs}#text"])
    r = subprocess.run([sys.executable, "-m", "leafkd", "train", *_cli(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --bank-data: 150 of its 150 texts"), r.stderr[-1500:]
    assert "Traceback" not in r.stderr and not (tmp_path / "bad-bank" / "teacher-vectors").exists()  # before the capture


def test_bad_options_are_one_line_errors(tmp_path, texts_file, minilm_path):
    cases = [
        {"data": [str(tmp_path / "missing.txt")]},
        {"student": str(tmp_path)},
        {"leaf_l2": 0.0},
        {"heldout": 100000},
        {"bank_data": [str(texts_file)]},  # a bank without its loss weight
    ]
    for extra in cases:
        args = _args(texts_file, minilm_path, tmp_path / "bad", **extra)
        r = subprocess.run([sys.executable, "-m", "leafkd", "train", *_cli(args)], capture_output=True, text=True)
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        assert r.returncode == 2 and lines and lines[-1].startswith("error: "), (extra, r.stderr[-1500:])
        assert "Traceback" not in r.stderr
    with pytest.raises(LeafkdError, match="cuda_graphs must be"):
        train(load_config(None, **_args(texts_file, minilm_path, tmp_path / "bad", cuda_graphs="maybe")))
    if not torch.cuda.is_available():
        with pytest.raises(LeafkdError, match="cuda-graphs true: needs a CUDA device"):
            train(load_config(None, **_args(texts_file, minilm_path, tmp_path / "graphs", cuda_graphs="true",
                                            device="cpu", packed="true")))
        assert not (tmp_path / "graphs").exists()  # refused before any work
    with pytest.raises(LeafkdError, match="cannot go with --compile true"):
        load_config(None, **_args(texts_file, minilm_path, tmp_path / "det", deterministic=True, compile="true"))
    assert load_config(None, **_args(texts_file, minilm_path, tmp_path / "det", deterministic=True)).compile == "false"
    with pytest.raises(LeafkdError, match="unknown option"):
        load_config(None, bogus=1)
    (tmp_path / "c.toml").write_text("lr = [\n")
    with pytest.raises(LeafkdError, match="malformed TOML"):
        load_config(tmp_path / "c.toml")


def test_adapt_options_add_the_adaptation_text_as_adapt_text_files_would(tmp_path, texts_file, data_dir):
    # --adapt builds `leafkd adapt-text`'s text in memory: documents and pieces x adapt_weight, spans once.
    from leafkd.data.adaptation import adaptation_text
    from leafkd.data.sources import load_corpus
    from leafkd.training.corpus import bank_sources, training_corpus

    docs = tmp_path / "docs.jsonl"
    corpus_lines = (data_dir / "beir" / "scifact" / "corpus.jsonl").read_text().splitlines()[:40]
    docs.write_text("".join(line + "\n" for line in corpus_lines))
    cfg = load_config(None, teacher="t", data=[str(texts_file)], adapt=[str(docs)], seed=2, bank=1.0,
                      bank_from_adapt=True)
    corpus = training_corpus(cfg)
    pieces, spans = adaptation_text(docs, 4, seed="2:docs")  # as `leafkd adapt-text --seed 2` draws them
    (tmp_path / "pieces.txt").write_text("".join(p + "\n" for p in pieces))
    (tmp_path / "spans.txt").write_text("".join(s + "\n" for s in spans))
    files = load_corpus([str(texts_file), f"{docs}*3", f"{tmp_path / 'pieces.txt'}*3", str(tmp_path / "spans.txt")])
    assert corpus.texts == files.texts and np.array_equal(corpus.weights, files.weights)
    assert len(spans) > 40 and bank_sources(cfg) == [str(docs)]
    once = training_corpus(load_config(None, teacher="t", data=[str(texts_file)], adapt=[str(docs)], adapt_weight=1,
                                       adapt_spans=0))
    files = load_corpus([str(texts_file), str(docs), str(tmp_path / "pieces.txt")])
    assert once.texts == files.texts and np.array_equal(once.weights, files.weights)
    # Adaptation options enter the result key only when a corpus is adapted to (older keys stay as they were).
    plain = load_config(None, teacher="t", data=["d"])
    assert plain.result_key() == load_config(None, teacher="t", data=["d"], adapt_weight=5).result_key()
    assert plain.result_key() != load_config(None, teacher="t", data=["d"], adapt=["x"]).result_key()
    with pytest.raises(LeafkdError, match="--bank-from-adapt needs"):
        load_config(None, teacher="t", data=["d"], bank_from_adapt=True)


def test_fixed_choice_options_parse_from_toml_and_flags(tmp_path):
    from leafkd.training.config import Projection, SelectMode, TriState

    (tmp_path / "c.toml").write_text('[train]\nteacher = "t"\ndata = ["d"]\nnormalize = true\npacked = false\n'
                                     'projection = "always"\nselect = "subset"\n')
    cfg = load_config(tmp_path / "c.toml", cuda_graphs="TRUE")
    assert (cfg.normalize, cfg.packed, cfg.cuda_graphs) == (TriState.TRUE, TriState.FALSE, TriState.TRUE)
    assert cfg.projection is Projection.ALWAYS and cfg.select is SelectMode.SUBSET
    assert json.dumps([cfg.projection, cfg.normalize]) == '["always", "true"]' and f"{cfg.packed}" == "false"
    with pytest.raises(LeafkdError, match="^precision must be auto, bf16 or fp32, not 'fp16'$"):
        load_config(None, teacher="t", data=["d"], precision="fp16")


def test_rows_layout_trains_like_texts_one_after_another(tmp_path, texts_file, minilm_path):
    """--packed-attention rows (texts bin-packed into rows, attention per row under a same-text mask) is a layout,
    not a different model: the same steps from the same start reach the same held-out cosine."""
    base = _args(texts_file, minilm_path, tmp_path / "varlen", max_steps=6, checkpoint_every=0,
                 packed_attention="varlen")
    a = train(load_config(None, **base))
    rows = {**base, "output": str(tmp_path / "rows"), "packed_attention": "rows",
            "vectors": str(tmp_path / "varlen" / "teacher-vectors")}
    b = train(load_config(None, **rows))
    assert a["steps"] == b["steps"] == 6
    assert b["final"]["heldout_cos_mean"] == pytest.approx(a["final"]["heldout_cos_mean"], abs=1e-4)
    assert b["final"]["heldout_cos_mean"] != pytest.approx(a["ridge_baseline"]["heldout_cos_mean"], abs=1e-3)
    with pytest.raises(LeafkdError, match="packed-attention rows: needs packed batches"):
        train(load_config(None, **{**rows, "output": str(tmp_path / "padded"), "packed": "false"}))
