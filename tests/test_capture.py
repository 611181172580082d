"""Teacher capture: store round trip, dedup, resume after kill -9 with identical vectors, black-box input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from leafkd.capture.store import VectorStore
from leafkd.capture.teacher import capture, capture_blackbox, check_store_for_teacher
from leafkd.data.sources import load_corpus
from leafkd.errors import LeafkdError


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory, wordnet_texts_file):
    return wordnet_texts_file(tmp_path_factory.mktemp("cap"), 600, 50)  # duplicates are dropped


@pytest.fixture(scope="module")
def full_store(tmp_path_factory, texts_file, minilm_path, minilm):
    out = tmp_path_factory.mktemp("full") / "store"
    return capture(minilm_path, load_corpus([str(texts_file)]), out, shard_size=128, show_progress=False, model=minilm)


def test_store_contents(full_store, minilm, texts_file):
    assert full_store.count == 600 and full_store.dim == 384
    assert len(full_store.manifest["shards"]) == 5
    vecs = full_store.vectors()
    assert vecs.dtype == np.float16 and vecs.shape == (600, 384)
    texts = full_store.texts()
    ref = minilm.encode(texts[:8])
    assert np.abs(vecs[:8].astype(np.float32) - ref).max() < 2e-3
    VectorStore.open(full_store.path, verify=True)


def test_resume_after_kill_gives_identical_vectors(tmp_path, texts_file, minilm_path, full_store):
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "leafkd", "capture", "--teacher", str(minilm_path), "--data", str(texts_file),
           "--out", str(out), "--shard-size", "128", "--quiet", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        mf = out / "manifest.json"
        if mf.exists():
            count = json.loads(mf.read_text())["count"]
            if count >= 128:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = count
                break
        time.sleep(0.02)
    proc.wait()
    assert killed_at is not None and killed_at < 600, "the capture finished before it could be killed"
    partial = VectorStore.open(out, verify=True)  # only whole shards are ever listed
    assert partial.count == killed_at and not partial.manifest["complete"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    resumed = VectorStore.open(out, verify=True)
    assert resumed.count == 600 and resumed.manifest["complete"]
    assert resumed.texts() == full_store.texts()
    assert np.array_equal(resumed.vectors(), full_store.vectors())
    assert len({bytes(h) for h in resumed.hashes()}) == 600


def test_rerun_on_complete_store_adds_nothing(full_store, texts_file, minilm_path, minilm):
    again = capture(minilm_path, load_corpus([str(texts_file)]), full_store.path, shard_size=128,
                    show_progress=False, model=minilm)
    assert again.count == 600 and len(again.manifest["shards"]) == 5


def test_fingerprint_mismatch_is_refused(tmp_path, full_store, texts_file, minilm_path):
    fake = tmp_path / "other"
    fake.mkdir()
    for f in minilm_path.iterdir():
        if f.is_file():
            (fake / f.name).write_bytes(f.read_bytes())
    (fake / "1_Pooling").mkdir()
    (fake / "1_Pooling" / "config.json").write_text((minilm_path / "1_Pooling" / "config.json").read_text())
    (fake / "config.json").write_text((minilm_path / "config.json").read_text().replace("}", ', "leafkd_test": 1}', 1))
    with pytest.raises(LeafkdError, match="vectors from teacher"):
        check_store_for_teacher(full_store, fake)
    with pytest.raises(LeafkdError, match="come from teacher"):
        capture(fake, load_corpus([str(texts_file)]), full_store.path, show_progress=False)


def test_blackbox_vectors(tmp_path):
    texts = [f"text number {i}" for i in range(10)] + ["text number 3"]
    vecs = np.random.default_rng(0).normal(size=(11, 16)).astype(np.float32)
    np.save(tmp_path / "v.npy", vecs)
    store = capture_blackbox(texts, tmp_path / "v.npy", tmp_path / "bb")
    assert store.count == 10 and store.fingerprint.startswith("blackbox:")
    assert np.allclose(store.vectors().astype(np.float32), vecs[:10], atol=1e-2)
    np.save(tmp_path / "short.npy", vecs[:5])
    with pytest.raises(LeafkdError, match="5 vectors for 11 texts"):
        capture_blackbox(texts, tmp_path / "short.npy", tmp_path / "bb2")


def test_cli_errors_are_one_line(tmp_path, minilm_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    (tmp_path / "ok.txt").write_text("hello\n")
    out = ["--out", str(tmp_path / "o")]
    cases = [
        ["capture", "--teacher", str(minilm_path), "--data", str(tmp_path / "missing.txt"), *out],
        ["capture", "--teacher", str(minilm_path), "--data", str(tmp_path / "bad.jsonl"), *out],
        ["capture", "--teacher", str(tmp_path), "--data", str(tmp_path / "bad.jsonl"), *out],
        ["capture", "--teacher", str(tmp_path / "nomodel"), "--data", str(tmp_path / "ok.txt"), *out],
    ]
    for args in cases:
        r = subprocess.run([sys.executable, "-m", "leafkd", *args], capture_output=True, text=True)
        assert r.returncode == 2, (args, r.stderr)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_fingerprint_hashes_each_file_once_until_it_changes(tmp_path, monkeypatch):
    from leafkd import models

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    calls = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p: calls.append(Path(p).name) or real(p))
    first = models.fingerprint(folder)
    assert models.fingerprint(folder) == first and models.fingerprint(folder, prompt="q: ") != first
    assert sorted(calls) == ["config.json", "model.safetensors"]  # three fingerprints, each file read once
    (folder / "model.safetensors").write_bytes(b"\1" * 1025)
    assert models.fingerprint(folder) != first and calls.count("model.safetensors") == 2


def test_shard_texts_are_one_json_string_a_line():
    from leafkd.capture.store import json_lines

    texts = ["line\nbreak", 'a "quote"', "ünïcödé", "", "tab\there", "\u2028sep", "back\\slash", "[1, 2]"]
    assert json_lines(texts) == "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts)
    assert [json.loads(line) for line in json_lines(texts).split("\n")[:-1]] == texts
    assert json_lines([]) == ""


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_non_finite_float16_rows_are_refused(value):
    from leafkd.capture.teacher import _check_finite

    vecs = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float16)
    _check_finite(vecs)  # finite (the largest float16, 65504, is finite too)
    _check_finite(np.full((2, 8), 65504, dtype=np.float16))
    vecs[17, 3] = value
    with pytest.raises(LeafkdError, match="non-finite"):
        _check_finite(vecs)
    with pytest.raises(LeafkdError, match="non-finite"):
        _check_finite(vecs.astype(np.float32))
