"""Teacher-guided data selection: guard, dedup, clusters, seeded subset/reweight, and a resumable training run."""

import json
import shutil

import numpy as np
import pytest
import torch

from leafkd.errors import LeafkdError
from leafkd.training.config import TrainConfig, load_config
from leafkd.training.selection import (
    degenerate_mask,
    difficulty,
    fill_by_cluster,
    near_duplicates,
    reweight,
    select_subset,
)
from leafkd.training.trainer import train
from leafkd.vectors import kmeans


def _anisotropic(n, d=16, seed=0):
    """Unit vectors around a common direction, like real text embeddings."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=d)
    v = m / np.linalg.norm(m) + 0.3 * rng.normal(size=(n, d)) / np.sqrt(d)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32), m / np.linalg.norm(m)


def test_degenerate_mask_reasons():
    v, m = _anisotropic(200)
    texts = [f"text {i}" for i in range(200)]
    lengths = np.full(200, 6)
    texts[3] = "   "                 # blank
    lengths[4] = 2                   # nothing but [CLS] [SEP] after tokenisation
    v[5] = 0.0                       # zero vector
    v[6] *= 1e-6                     # near-zero norm
    v[7] *= 50.0                     # extreme norm
    v[8] = -m                        # points away from everything
    v[9, 0] = np.nan
    keep, dropped = degenerate_mask(texts, lengths, v)
    assert dropped["nonfinite"].tolist() == [9]
    assert dropped["empty"].tolist() == [3, 4]
    assert dropped["zero_norm"].tolist() == [5, 6]
    assert dropped["outlier_norm"].tolist() == [7]
    assert dropped["outlier_direction"].tolist() == [8]
    assert keep.sum() == 200 - 7 and not keep[[3, 4, 5, 6, 7, 8, 9]].any()
    # ordinary spread is not flagged
    keep, dropped = degenerate_mask([f"t{i}" for i in range(200)], np.full(200, 6), _anisotropic(200, seed=1)[0])
    assert keep.all()


def test_near_duplicates_by_teacher_cosine():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(60, 32)).astype(np.float32)
    copies = base[[5, 17, 40]] + 0.01 * rng.normal(size=(3, 32)).astype(np.float32)
    v = np.vstack([base, copies, copies[:1] + 0.005])  # rows 60-62 copy 5, 17, 40; row 63 copies row 60 (and 5)
    _, labels = kmeans(v, 4, seed=0)
    dup_of = near_duplicates(v, labels, 0.98)
    assert dup_of[:60].tolist() == [-1] * 60
    assert dup_of[60:].tolist() == [5, 17, 40, 5]
    assert (near_duplicates(v, labels, 1.0) == -1).all()
    # one cluster for everything gives the same answer
    assert near_duplicates(v, np.zeros(len(v), np.int64), 0.98).tolist() == dup_of.tolist()


def test_kmeans_and_subset_are_seeded_sized_and_cover_clusters():
    v, _ = _anisotropic(600, seed=2)
    c1, l1 = kmeans(v, 12, seed=3)
    c2, l2 = kmeans(v, 12, seed=3)
    assert np.array_equal(l1, l2) and np.allclose(c1, c2) and len(np.unique(l1)) == 12
    # one big cluster and nine small ones; difficulty rises with the index
    labels = np.r_[np.zeros(510, np.int64), np.repeat(np.arange(1, 10), 10)]
    scores = np.linspace(0.05, 0.5, 600)
    a = select_subset(scores, labels, 100, seed=7)
    b = select_subset(scores, labels, 100, seed=7)
    c = select_subset(scores, labels, 100, seed=8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(a) == 100 and len(np.unique(a)) == 100
    assert set(labels[a]) == set(range(10))  # every cluster covered
    big = [np.mean(labels[select_subset(scores, labels, 100, diversity=d, seed=1)] == 0) for d in (0.0, 1.0)]
    assert big[0] > big[1]  # diversity moves budget from the big cluster to the small ones
    in_big = a[labels[a] == 0]
    assert scores[in_big].mean() > scores[labels == 0].mean()  # harder texts preferred
    flat = select_subset(scores, labels, 100, temperature=1e6, diversity=0.0, seed=1)
    assert abs(np.mean(labels[flat] == 0) - 0.85) < 0.05  # huge temperature: uniform
    assert len(select_subset(scores, labels, 5000)) == 600


def test_reweight_and_difficulty():
    labels = np.r_[np.zeros(80, np.int64), np.ones(20, np.int64)]
    scores = np.linspace(0.1, 1.0, 100)
    base = np.ones(100)
    w = reweight(scores, labels, base, temperature=1.0, diversity=0.5, max_ratio=3.0)
    assert w.sum() == pytest.approx(100.0)
    assert w.max() <= 3.0 * 1.0001 and w.min() >= 1 / 3 * 0.9999
    assert w[79] > w[0]
    assert np.allclose(reweight(scores, labels, base, temperature=1e9, diversity=0.0), 1.0, atol=1e-6)
    t = np.eye(3, 4, dtype=np.float32)
    assert np.allclose(difficulty(t, t), 0.0, atol=1e-6) and np.allclose(difficulty(-t, t, "l2"), 4.0)
    filled = fill_by_cluster(np.array([0.2, np.nan, 0.4, np.nan]), np.array([0, 0, 1, 1]))
    assert filled.tolist() == pytest.approx([0.2, 0.2, 0.4, 0.4])
    with pytest.raises(LeafkdError):
        load_config(None, teacher="x", data=["y"], select="best")


def test_result_key_ignores_selection_defaults():
    a = TrainConfig(teacher="t", data=["d"])
    assert a.result_key() == TrainConfig(teacher="t", data=["d"], select_fraction=0.3).result_key()
    assert a.result_key() != TrainConfig(teacher="t", data=["d"], select="subset").result_key()
    assert a.result_key() != TrainConfig(teacher="t", data=["d"], drop_degenerate=False).result_key()


@pytest.fixture(scope="module")
def sel_texts(tmp_path_factory, data_dir):
    lines = (data_dir / "train" / "questions.tsv").read_text().splitlines()[1:3001:10]
    lines = [l.split("\t")[0] for l in lines]
    lines += ["\u200b"] + [t.upper() for t in lines[:4]]  # empty after tokenisation; duplicates (uncased model)
    path = tmp_path_factory.mktemp("sel") / "texts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def sel_vectors(tmp_path_factory):
    return tmp_path_factory.mktemp("sel-vectors") / "store"  # captured by the first run, reused by the next


def _cfg(texts, minilm_path, out, vectors, **extra):
    args = {"teacher": str(minilm_path), "student": str(minilm_path), "student_layers": 1, "projection": "always",
            "data": [str(texts)], "heldout": 60, "epochs": 2.0, "batch_size": 16, "lr": 5e-4, "projection_lr": 5e-4,
            "eval_every": 0, "checkpoint_every": 6, "keep_checkpoints": 50, "output": str(out), "progress": False,
            "plot": False, "device": "cpu", "select": "subset", "select_fraction": 0.5, "select_clusters": 8,
            "select_refresh_every": 5, "select_score_texts": 150, "ridge_samples": 100, "vectors": str(vectors)}
    args.update(extra)
    return load_config(None, **args)


def test_train_with_selection_writes_files_and_resumes_identically(tmp_path, sel_texts, sel_vectors, minilm_path):
    out = tmp_path / "a"
    result = train(_cfg(sel_texts, minilm_path, out, sel_vectors))
    info = json.loads((out / "selection.json").read_text())
    arrays = dict(np.load(out / "selection.npz"))
    assert info["dropped"]["empty"] == 1 and info["dropped"]["duplicate"] >= 1
    assert info["size"] == round(0.5 * info["pool"]) and len(arrays["chosen"]) == info["size"]
    assert len(info["rounds"]) >= 3 and 100 < info["rounds"][0]["scored"] <= 150 and info["rounds"][1]["scored"] == 150
    assert set(arrays["chosen"]) <= set(arrays["pool"])
    meta = json.loads((out / "model" / "leafkd.json").read_text())
    assert meta["selection"]["mode"] == "subset" and result["final"]["heldout_cos_mean"] > 0

    # Resume from step 6 (a refresh at step 5 is pending for the next epoch): identical weights and selection.
    last = lambda: torch.load(sorted((out / "checkpoints").glob("step-*"))[-1] / "state.pt", weights_only=False)
    a = last()
    shutil.rmtree(out / "model")
    for ckpt in (out / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > 6:
            shutil.rmtree(ckpt)
    train(_cfg(sel_texts, minilm_path, out, sel_vectors))
    b = last()
    assert a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert np.array_equal(np.load(out / "selection.npz")["chosen"], arrays["chosen"])


def test_train_with_reweight(tmp_path, sel_texts, sel_vectors, minilm_path):
    out = tmp_path / "rw"
    train(_cfg(sel_texts, minilm_path, out, sel_vectors, select="reweight", select_refresh_every=0, max_steps=2,
               checkpoint_every=0))
    w = np.load(out / "selection.npz")["weights"]
    pool = np.load(out / "selection.npz")["pool"]
    assert w[pool].sum() == pytest.approx(len(pool)) and w[pool].max() > 1.2
