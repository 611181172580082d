"""Distributed capture and training (torchrun, 2 CPU processes on gloo) against one process.

- a 2-rank capture writes the store a single process writes (texts, vectors bit-equal, same manifest shards);
- a killed distributed capture resumes in one process, adopting the shards the ranks had finished;
- one 2-rank DDP training step (uneven split of an odd global batch, relational and bank losses on) equals one
  single-process step on the same global batch;
- a 2-rank checkpoint resumes in one process.

Both sides run with OMP_NUM_THREADS=1 so the CPU math is the same.
"""

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from leafkd.capture.store import VectorStore
from leafkd.capture.teacher import PENDING, _chunk_digest
from leafkd.runtime.distributed import local_batch, split_range
from leafkd.training.config import load_config
from leafkd.training.trainer import train

SHARD = 64


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", LEAFKD_DIST_BACKEND="gloo", CUDA_VISIBLE_DEVICES="")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leafkd(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "leafkd", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), "-m", "leafkd", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory, wordnet_texts_file):
    return wordnet_texts_file(tmp_path_factory.mktemp("dist"), 290, 20)  # duplicates are dropped


@contextlib.contextmanager
def _one_thread():
    """The single-process reference runs in this process with the workers' thread count (the same CPU math)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stores(tmp_path_factory, texts_file, minilm_path, minilm):
    from leafkd.capture.teacher import capture
    from leafkd.data.sources import load_corpus

    root = tmp_path_factory.mktemp("stores")
    _leafkd(["capture", "--teacher", str(minilm_path), "--data", str(texts_file), "--shard-size", str(SHARD),
             "--quiet", "--device", "cpu", "--out", str(root / "dist")], nproc=2)
    with _one_thread():
        capture(minilm_path, load_corpus([str(texts_file)]), root / "single", shard_size=SHARD, show_progress=False,
                device="cpu", model=minilm)
    return VectorStore.open(root / "single", verify=True), VectorStore.open(root / "dist", verify=True)


def test_split_helpers():
    full = np.arange(15)
    parts = [local_batch(full, 2, r) for r in range(2)]
    assert np.array_equal(np.concatenate([p for p, _ in parts]), full)
    assert [len(p) for p, _ in parts] == [7, 8] and sum(w for _, w in parts) == pytest.approx(2.0)
    idx, w = local_batch(full[:1], 2, 0)
    assert len(idx) == 1 and w == 0.0  # an empty slice: a stand-in item with no weight
    idx, w = local_batch(full[:1], 2, 1)
    assert len(idx) == 1 and w == 2.0
    assert local_batch(full, 1, 0)[1] == 1.0 and split_range(10, 3, 2) == (6, 10)


def test_distributed_capture_equals_single(stores):
    single, dist = stores
    assert single.count == dist.count == 290 and dist.manifest["complete"]
    assert len(dist.manifest["shards"]) == 5  # shards 0, 2, 4 on rank 0; 1, 3 on rank 1
    assert dist.texts() == single.texts()
    assert np.array_equal(dist.vectors(), single.vectors())
    assert dist.manifest["shards"] == single.manifest["shards"]  # same files, same checksums
    assert dist.manifest["truncated"] == single.manifest["truncated"]
    assert not (dist.path / PENDING).exists()


def test_killed_distributed_capture_resumes_in_one_process(tmp_path, stores, texts_file, minilm_path, minilm):
    from leafkd.capture.teacher import capture
    from leafkd.data.sources import load_corpus

    single, dist = stores
    # The state a distributed run leaves when killed after rank 0 finished shards 0 and 2 (nothing merged).
    out = tmp_path / "killed"
    shutil.copytree(dist.path, out)
    manifest = json.loads((out / "manifest.json").read_text())
    entries = manifest["shards"]
    manifest.update(shards=[], count=0, complete=False, truncated=0)
    (out / "manifest.json").write_text(json.dumps(manifest))
    for k in (1, 3, 4):
        for key in ("vectors", "texts", "hashes"):
            (out / entries[k][key]).unlink()
    (out / PENDING).mkdir()
    for k in (0, 2):
        digest = _chunk_digest(np.load(out / entries[k]["hashes"]))
        (out / PENDING / f"shard-{k:05d}.json").write_text(json.dumps({"entry": entries[k], "digest": digest,
                                                                       "truncated": 0, "rank": 0}))
    inode = (out / entries[2]["vectors"]).stat().st_ino
    store = capture(minilm_path, load_corpus([str(texts_file)]), out, shard_size=SHARD, show_progress=False,
                    device="cpu", model=minilm)
    assert (out / entries[2]["vectors"]).stat().st_ino == inode  # adopted, not recomputed
    assert store.texts() == single.texts() and store.count == 290 and store.manifest["complete"]
    assert store.manifest["shards"][0] == entries[0] and store.manifest["shards"][2] == entries[2]
    VectorStore.open(out, verify=True)


def _train_args(texts_file, store, out, **extra) -> dict:
    args = {"student": None, "student_layers": 1, "projection": "always", "data": [str(texts_file)],
            "vectors": str(store), "heldout": 40, "max_steps": 1, "batch_size": 15, "lr": 5e-6, "projection_lr": 5e-6,
            "relational": 0.5, "bank": 20.0, "bank_size": 100, "eval_every": 0, "checkpoint_every": 0, "output": str(out), "progress": False,
            "plot": False, "device": "cpu", "ridge_samples": 200}
    args.update(extra)
    return args


def _cli(args: dict) -> list[str]:
    out = []
    for k, v in args.items():
        for item in v if isinstance(v, list) else [v]:
            out += ["--" + k.replace("_", "-"), str(item).lower() if isinstance(item, bool) else str(item)]
    return out


def _last_state(out):
    return torch.load(sorted((out / "checkpoints").glob("step-*"))[-1] / "state.pt", weights_only=False)


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory, texts_file, stores, minilm_path):
    root = tmp_path_factory.mktemp("train")
    store = stores[0].path
    runs = {nproc: root / f"w{nproc}" for nproc in (1, 2)}
    _leafkd(["train", *_cli(_train_args(texts_file, store, runs[2], student=str(minilm_path)))], nproc=2)
    with _one_thread():
        train(load_config(None, **_train_args(texts_file, store, runs[1], student=str(minilm_path))))
    return runs


def test_two_rank_step_equals_single_step(train_runs):
    a, b = _last_state(train_runs[1]), _last_state(train_runs[2])
    assert a["step"] == b["step"] == 1 and (a["epoch"], a["position"]) == (b["epoch"], b["position"])
    assert a["model"].keys() == b["model"].keys()
    diff = max(float((a["model"][k].float() - b["model"][k].float()).abs().max()) for k in a["model"])
    assert diff <= 1e-6, diff
    records = [json.loads(l) for l in (train_runs[2] / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["eval", "baseline", "train", "eval", "train_fit", "timing"]
    single = [json.loads(l) for l in (train_runs[1] / "metrics.jsonl").read_text().splitlines()]
    assert records[2]["loss"] == pytest.approx(single[2]["loss"], rel=1e-5)
    assert records[2]["samples_per_s"] > 0
    assert records[0]["heldout_cos_mean"] == pytest.approx(single[0]["heldout_cos_mean"], abs=1e-5)
    assert (train_runs[2] / "model" / "leafkd.json").exists()
    assert records[3]["heldout_cos_mean"] != records[0]["heldout_cos_mean"]  # the step did something
    # The training-text fit, gathered over both ranks, equals the single process's.
    assert records[4]["cos_mean"] == pytest.approx(single[4]["cos_mean"], abs=1e-5)


def test_two_rank_checkpoint_resumes_in_one_process(train_runs, texts_file, stores, minilm_path, caplog, monkeypatch):
    # Both runs continue in this process to step 2 (max_steps may change on resume; the folder may not move).
    monkeypatch.setattr(logging.getLogger("leafkd"), "propagate", True)  # an in-process CLI call turns it off
    caplog.set_level("INFO", logger="leafkd")
    for out in train_runs.values():
        caplog.clear()
        with _one_thread():
            result = train(load_config(None, **_train_args(texts_file, stores[0].path, out, student=str(minilm_path),
                                                           max_steps=2)))
        assert "resuming from step-00000001" in caplog.text and result["steps"] == 2
    a, b = _last_state(train_runs[1])["model"], _last_state(train_runs[2])["model"]
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) <= 1e-5
