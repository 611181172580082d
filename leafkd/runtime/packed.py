"""Packed (unpadded) forward pass of a BERT- or MPNet-based SentenceTransformer.

A padded batch spends compute on pad tokens and forces length-sorted batches to keep that waste low. Here the
texts of a batch are concatenated into one row of T real tokens: every linear layer, layer norm and activation
runs on exactly the real tokens, and attention runs per text. On CUDA with half-precision activations and no
position bias (BERT, MiniLM) attention is flash attention over variable-length sequences
(`torch.nn.attention.varlen.varlen_attn`, with backward). Elsewhere (MPNet's relative position bias, CPU, fp32)
the queries, keys and values are scattered into a padded [texts, heads, longest, dim] view for one
`scaled_dot_product_attention` call (memory-efficient kernel, with the bias as its mask) and gathered back, so
only attention sees padding. (Flex attention over the packed row with a document block mask and the bias as a
score modification was tried for MPNet and measured slower on an H100: see eval/BENCHMARKS.md.)

Training can pack texts into rows instead (`pack(rows=True)`, `--packed-attention rows`): texts bin-packed, none
split, into rows as wide as the longest text, the rows' ends filled; attention then runs per row under a same-text
mask, one `scaled_dot_product_attention` call over [rows, heads, width, dim] (cuDNN on CUDA). For the short texts
of distillation (26 tokens on average for MiniLM's tokenizer) flash attention over variable-length sequences
spends most of each 128-token tile on nothing; the row layout fills its tiles (on an H200, MiniLM's attention,
forward and backward: ~1.08 ms a layer varlen in the training step's profile, 0.62 ms in rows; eval/BENCHMARKS.md).

The weights are the model's own modules' (nothing is copied), so training through this path updates the
SentenceTransformer in place and the saved model is an ordinary one. The modules after Pooling (Dense,
Normalize) run as they are. `supported(model)` says whether a model can take this path; callers fall back to
the model's own forward otherwise.
"""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from leafkd.runtime.tokens import Tokenized

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

_ARCHS = ("bert", "mpnet")

# SDPA backends for the padded view: not cuDNN, which plans each new (texts, length) shape anew (hundreds of
# milliseconds per shape, and every packed batch has a new shape) and wastes most of its tiles on short texts.
_PADDED_SDPA_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
# Row attention, in this order: its shapes are fixed per row count, so cuDNN plans each once (MiniLM rows on an
# H200: cuDNN 0.62 ms forward and backward a layer, the memory-efficient kernel 0.98).
_ROW_SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Attention(StrEnum):
    """How a packed forward runs attention (`PackedForward.attention`; None there picks per call)."""

    VARLEN = "varlen"  # flash attention over the packed row (CUDA, half precision, no position bias)
    PADDED = "padded"  # one SDPA call over a padded [texts, heads, longest, dim] view
    ROWS = "rows"  # texts packed into rows (`pack(rows=True)`): one SDPA call over the rows, same-text mask


def varlen_attention() -> Callable[..., Any] | None:
    """torch's flash attention over variable-length sequences (`varlen_attn`), or None where torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


@dataclass
class Packed:
    """One packed batch: ids [T], position of each token in its text [T], and per-text layout.

    A batch packed with a token bucket ends with filler tokens (ids of the pad token) that make T a multiple of
    the bucket: they form one extra sequence in `cu_seqlens`, belong to no text (`seq_ids` N) and are never
    pooled, so fixed shapes (one CUDA graph per bucket) cost no correctness.

    Packed into rows (`row_width` > 0): T = rows x row_width, each text inside one row, filler (text N) at the
    rows' ends; `cu_seqlens` then holds the row boundaries.
    """

    ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    cu_seqlens: torch.Tensor  # int32 [N+1], or [N+2] with filler
    pad_index: torch.Tensor  # int64 [N, L]: token index in 0..T-1, or T for padding
    lengths: torch.Tensor  # float32 [N]
    seq_ids: torch.Tensor  # int64 [T]: the text each token belongs to (N for filler)
    max_len: int
    row_width: int = 0  # > 0: packed into rows of this many tokens (see above)

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.ids, self.positions, self.cu_seqlens, self.pad_index, self.lengths, self.seq_ids

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Packed:
        return Packed(fn(self.ids), fn(self.positions), fn(self.cu_seqlens), fn(self.pad_index), fn(self.lengths),
                      fn(self.seq_ids), self.max_len, self.row_width)

    def to(self, device: torch.device, non_blocking: bool = True) -> Packed:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Packed:
        return self._map(torch.Tensor.pin_memory)

    def copy_(self, other: Packed) -> Packed:
        """Copy `other` (same shapes) into these tensors: the static inputs of a CUDA graph."""
        for dst, src in zip(self._tensors(), other._tensors()):
            dst.copy_(src, non_blocking=True)
        return self

    @property
    def shape_key(self) -> tuple[int, ...]:
        return (int(self.ids.shape[0]), int(self.cu_seqlens.shape[0]), *self.pad_index.shape, self.max_len,
                self.row_width)

    @property
    def num_texts(self) -> int:
        return int(self.lengths.shape[0])


def place_in_rows(lengths: np.ndarray, width: int) -> tuple[np.ndarray, int]:
    """Where each text starts when texts are bin-packed into rows of `width` tokens, and how many rows.

    Worst fit decreasing: longest text first, each into the row with the most room left (a new row when none has
    enough); no text is split. For many short texts the rows end up nearly full (batches of 1,024 training-mix
    texts in rows of 256: 0.6% filler on average, 1.1% at most over 50 batches; ~1.3 ms a batch).
    """
    starts = np.empty(len(lengths), dtype=np.int64)
    rooms: list[tuple[int, int]] = []  # (-room left, row): a max-heap on the room
    n_rows = 0
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        if rooms and -rooms[0][0] >= n:
            neg_room, row = heapq.heappop(rooms)
            room = -neg_room
        else:
            row, room, n_rows = n_rows, width, n_rows + 1
        starts[i] = row * width + width - room
        heapq.heappush(rooms, (n - room, row))
    return starts, n_rows


def pack(tokens: Tokenized, index: np.ndarray, bucket: int = 0, width: int = 0, filler_id: int = 0,
         rows: bool = False) -> Packed:
    """The texts `index` of `tokens`, concatenated in that order (vectorised; no per-text Python loop).

    bucket > 0 pads the row with filler tokens to a multiple of `bucket` tokens; width > 0 fixes the padded
    view's width (and max_len) at max(width, longest text). Both only fix shapes; the real tokens' results are
    unchanged. The filler must fit one sequence of at most max_len tokens, so bucket <= width.

    rows: pack the texts into rows of max_len tokens instead (`place_in_rows`; the number of rows rounded up to
    a multiple of bucket // max_len), for row attention (`Attention.ROWS`).
    """
    if rows:
        return _pack_rows(tokens, index, bucket, width, filler_id)
    lengths = tokens.lengths[index].astype(np.int64)
    n = len(index)
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    real = int(cu[-1])
    starts = np.repeat(cu[:-1], lengths)
    positions = np.arange(real, dtype=np.int64) - starts
    src = np.repeat(tokens.offsets[index], lengths) + positions
    ids = tokens.ids[src].astype(np.int64)
    seq_ids = np.repeat(np.arange(n, dtype=np.int64), lengths)
    max_len = max(int(lengths.max()) if n else 0, width)
    total = real
    if bucket > 0:
        if bucket > max(max_len, 1):
            raise ValueError(f"bucket {bucket} exceeds the longest sequence {max_len}")
        total = -(-real // bucket) * bucket
        fill = total - real
        cu = np.append(cu, total)
        ids = np.concatenate([ids, np.full(fill, filler_id, dtype=np.int64)])
        positions = np.concatenate([positions, np.arange(fill, dtype=np.int64)])
        seq_ids = np.concatenate([seq_ids, np.full(fill, n, dtype=np.int64)])
    cols = np.arange(max_len, dtype=np.int64)
    pad_index = np.where(cols[None, :] < lengths[:, None], cu[:n, None] + cols[None, :], total)
    return Packed(torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(cu.astype(np.int32)),
                  torch.from_numpy(pad_index), torch.from_numpy(lengths.astype(np.float32)),
                  torch.from_numpy(seq_ids), max_len)


def _pack_rows(tokens: Tokenized, index: np.ndarray, bucket: int, width: int, filler_id: int) -> Packed:
    lengths = tokens.lengths[index].astype(np.int64)
    n = len(index)
    max_len = max(int(lengths.max()) if n else 0, width, 1)
    starts, n_rows = place_in_rows(lengths, max_len)
    step = max(1, bucket // max_len)
    total = max(-(-n_rows // step) * step, 1) * max_len
    cu = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    real = int(cu[-1])
    in_text = np.arange(real, dtype=np.int64) - np.repeat(cu[:-1], lengths)  # each real token's position
    where = np.repeat(starts, lengths) + in_text  # ... and its place in the rows
    ids = np.full(total, filler_id, dtype=np.int64)
    ids[where] = tokens.ids[np.repeat(tokens.offsets[index], lengths) + in_text]
    positions = np.arange(total, dtype=np.int64) % max_len  # filler: its column (any position < max_len works)
    positions[where] = in_text
    seq_ids = np.full(total, n, dtype=np.int64)
    seq_ids[where] = np.repeat(np.arange(n, dtype=np.int64), lengths)
    cols = np.arange(max_len, dtype=np.int64)
    pad_index = np.where(cols[None, :] < lengths[:, None], starts[:, None] + cols[None, :], total)
    bounds = np.arange(0, total + 1, max_len, dtype=np.int32)
    return Packed(torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(bounds),
                  torch.from_numpy(pad_index), torch.from_numpy(lengths.astype(np.float32)),
                  torch.from_numpy(seq_ids), max_len, max_len)


def mpnet_relative_bias(encoder: Any, positions: torch.Tensor) -> torch.Tensor:
    """MPNet's relative position bias for queries and keys at `positions` [..., L] (on their device): [..., H, L, L].

    The relative positions are built from `positions` itself, never on the CPU, so the bias can be captured in a
    CUDA graph; the values are the encoder's own (its bucketing and its bias table).
    """
    relative = positions[..., None, :] - positions[..., :, None]  # key position - query position
    bucket = encoder.relative_position_bucket(relative, num_buckets=encoder.relative_attention_bias.num_embeddings)
    return encoder.relative_attention_bias(bucket).movedim(-1, -3)


def unsupported_reason(model: SentenceTransformer) -> str | None:
    """None when `model` can run packed; otherwise why not (one line)."""
    # Imported here: whoever made `model` has loaded sentence-transformers; at module level it would add
    # seconds to every import of leafkd.runtime.
    from leafkd.modules import Dense, Normalize, Pooling, Transformer, is_mean_pooling

    mods = list(model)
    if len(mods) < 2 or not isinstance(mods[0], Transformer) or not isinstance(mods[1], Pooling):
        return "the model is not Transformer + Pooling"
    auto = mods[0].auto_model
    cfg = auto.config
    if cfg.model_type not in _ARCHS:
        return f"architecture {cfg.model_type!r} (packed: {', '.join(_ARCHS)})"
    if cfg.model_type == "bert" and getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        return "BERT with relative position embeddings"
    if not is_mean_pooling(mods[1]):
        pooling = mods[1].get_config_dict()
        return f"pooling {pooling.get('pooling_mode') or pooling} (packed: mean)"
    if getattr(mods[1], "include_prompt", True) is False:
        return "pooling that excludes the prompt"
    for m in mods[2:]:
        if not isinstance(m, (Dense, Normalize)):
            return f"module {type(m).__name__} after pooling"
    return None


def supported(model: SentenceTransformer) -> bool:
    """Whether `model` can run packed (see `unsupported_reason`)."""
    return unsupported_reason(model) is None


class _MeanPool(torch.autograd.Function):
    """Mean of each text's token rows, float32 [N, hidden].

    Forward sums through the padded view (pad rows are zero), which is deterministic, unlike an atomic
    scatter-add. Backward is a gather (each token gets its text's gradient / length); autograd's own backward
    of the padded gather would be a sorting index_put, which took ~12% of a training step's GPU time.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pad_index: torch.Tensor, seq_ids: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(seq_ids, lengths)
        ctx.dtype = x.dtype
        padded = torch.cat([x, x.new_zeros(1, x.shape[1])])[pad_index]
        return padded.float().sum(1) / lengths.clamp(min=1)[:, None]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        seq_ids, lengths = ctx.saved_tensors
        per_text = grad / lengths.clamp(min=1)[:, None]
        per_text = torch.cat([per_text, per_text.new_zeros(1, per_text.shape[1])])  # filler tokens (text N): 0
        return per_text[seq_ids].to(ctx.dtype), None, None, None


class PackedForward(nn.Module):
    """`forward(packed) -> sentence embeddings [N, dim]` over the modules of a SentenceTransformer.

    Holds the model as a submodule, so DistributedDataParallel can wrap this module and sync the model's
    parameters; `model.train()`/`eval()` and dropout settings apply as usual.
    """

    def __init__(self, model: SentenceTransformer):
        super().__init__()
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"packed forward unsupported: {reason}")
        self.model = model
        # The transformers BertModel or MPNetModel: its submodules' names differ by architecture, so Any.
        auto: Any = model[0].auto_model
        self.auto = auto
        self.arch: str = auto.config.model_type
        self.heads: int = auto.config.num_attention_heads
        self.varlen = varlen_attention()
        # None picks per call (see _attention_kind); tests force padded or varlen to compare them.
        self.attention: Attention | None = None

    def probe_batch(self, device: torch.device) -> Packed:
        """A one-text, two-token batch (for probes such as finding parameters the forward never uses)."""
        pad = self.model.tokenizer.pad_token_id or 0
        return pack(Tokenized(np.full(2, pad, dtype=np.int32), np.array([0, 2])), np.array([0])).to(device)

    # -- pieces ---------------------------------------------------------------------------------------------
    def _embed(self, p: Packed) -> torch.Tensor:
        emb = self.auto.embeddings
        x = emb.word_embeddings(p.ids)
        if self.arch == "mpnet":
            # MPNet counts positions from padding_idx + 1 (create_position_ids_from_input_ids).
            x = x + emb.position_embeddings(p.positions + emb.padding_idx + 1)
        else:
            x = x + emb.position_embeddings(p.positions)
            x = x + emb.token_type_embeddings.weight[0]
        return emb.dropout(emb.LayerNorm(x))

    def _position_bias(self, p: Packed, dtype: torch.dtype) -> torch.Tensor | None:
        if self.arch != "mpnet":
            return None
        pos = torch.arange(p.max_len, device=p.ids.device)
        return mpnet_relative_bias(self.auto.encoder, pos).unsqueeze(0).to(dtype)  # [1, H, L, L]

    def _attention_kind(self, x: torch.Tensor, p: Packed | None = None) -> Attention:
        if p is not None and p.row_width:
            return Attention.ROWS  # the layout decides: rows hold several texts
        if self.attention is not None:
            return Attention(self.attention)
        half = x.dtype != torch.float32 or torch.is_autocast_enabled("cuda")
        if x.is_cuda and half and self.arch == "bert" and self.varlen is not None:
            return Attention.VARLEN
        return Attention.PADDED

    def _attention_mask(self, p: Packed, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The padded path's mask, built once per forward: keys that are real tokens (+ MPNet's bias)."""
        valid = (p.pad_index < p.ids.shape[0])[:, None, None, :]  # [N, 1, 1, L]
        if bias is None:
            return valid
        return bias.to(dtype).masked_fill(~valid, float("-inf"))  # [N, H, L, L]

    def _row_mask(self, p: Packed, dtype: torch.dtype) -> torch.Tensor:
        """Row attention's mask, built once per forward: [R, 1, W, W] same text (MPNet: [R, H, W, W] bias, -inf
        across texts)."""
        text = p.seq_ids.view(-1, p.row_width)
        same = (text[:, :, None] == text[:, None, :])[:, None]
        if self.arch != "mpnet":
            return same
        bias = mpnet_relative_bias(self.auto.encoder, p.positions.view(-1, p.row_width)).to(dtype)  # [R, H, W, W]
        return bias.masked_fill(~same, float("-inf"))

    def _row_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Packed, mask: torch.Tensor,
                       dropout: float) -> torch.Tensor:
        t, h, d = q.shape

        def rows(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [R, H, W, D]: a view, no copy of the tokens
            return x.view(-1, p.row_width, h, d).transpose(1, 2)

        if mask.dtype != torch.bool and mask.dtype != q.dtype:  # e.g. CPU autocast
            mask = mask.to(q.dtype)
        backends: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if q.is_cuda:
            backends = sdpa_kernel(_ROW_SDPA_BACKENDS, set_priority=True)
        with backends:
            out = F.scaled_dot_product_attention(rows(q), rows(k), rows(v), attn_mask=mask, dropout_p=dropout)
        return out.transpose(1, 2).reshape(t, h, d)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Packed, kind: Attention,
                   mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
        """q, k, v: [T, H, D] -> [T, H, D], each text attending only to itself."""
        if kind is Attention.ROWS:
            return self._row_attention(q, k, v, p, mask if mask is not None else self._row_mask(p, q.dtype), dropout)
        half = q.dtype in (torch.float16, torch.bfloat16)
        if kind is Attention.VARLEN and self.varlen is not None and dropout == 0.0 and half:
            return self.varlen(q, k, v, p.cu_seqlens, p.cu_seqlens, p.max_len, p.max_len)
        if mask is None:  # varlen chosen, but attention dropout (training) needs the padded view
            mask = self._attention_mask(p, self._position_bias(p, q.dtype), q.dtype)
        t, h, d = q.shape
        zero = q.new_zeros(1, h, d)

        def padded(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [N, H, L, D]
            return torch.cat([x, zero])[p.pad_index].transpose(1, 2)

        if mask.dtype != torch.bool and mask.dtype != q.dtype:  # e.g. CPU autocast
            mask = mask.to(q.dtype)
        backends: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if q.is_cuda:
            backends = sdpa_kernel(_PADDED_SDPA_BACKENDS)
        with backends:
            out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask, dropout_p=dropout)
        # Back to packed rows by gathering each token's (text, position) cell: no data-dependent shapes, no sync.
        # Filler tokens (text N, see pack) read a real cell; their rows are never pooled and get no gradient.
        n, length = p.pad_index.shape
        return out.transpose(1, 2)[p.seq_ids.clamp(max=n - 1), p.positions.clamp(max=length - 1)]

    def _layer(self, layer: Any, x: torch.Tensor, p: Packed, kind: Attention,
               mask: torch.Tensor | None) -> torch.Tensor:
        """One encoder layer (a transformers BertLayer or MPNetLayer, whose submodule names differ) on [T, hidden]."""
        t = x.shape[0]
        if self.arch == "mpnet":
            att = layer.attention.attn
            wq, wk, wv, wo = att.q, att.k, att.v, att.o
            attn_norm, attn_drop, attn_p = layer.attention.LayerNorm, layer.attention.dropout, att.dropout.p
        else:
            att = layer.attention.self
            wq, wk, wv = att.query, att.key, att.value
            wo = layer.attention.output.dense
            attn_norm, attn_drop = layer.attention.output.LayerNorm, layer.attention.output.dropout
            attn_p = att.dropout.p
        # One fused QKV projection instead of three (the concatenation is tiny next to the product).
        qkv = F.linear(x, torch.cat([wq.weight, wk.weight, wv.weight]), torch.cat([wq.bias, wk.bias, wv.bias]))
        q, k, v = qkv.view(t, 3, self.heads, -1).unbind(1)
        out = self._attention(q, k, v, p, kind, mask, attn_p if self.auto.training else 0.0)
        x = attn_norm(attn_drop(wo(out.reshape(t, -1))) + x)
        inter = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
        return layer.output.LayerNorm(layer.output.dropout(layer.output.dense(inter)) + x)

    def token_embeddings(self, p: Packed) -> torch.Tensor:
        """Last hidden states of the real tokens, [T, hidden]."""
        x = self._embed(p)
        kind = self._attention_kind(x, p)
        mask = None  # the padded view's or the rows' mask, built once per forward and shared by the layers
        dtype = (torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else x.dtype)
        if kind is Attention.PADDED:
            mask = self._attention_mask(p, self._position_bias(p, dtype), dtype)
        elif kind is Attention.ROWS:
            mask = self._row_mask(p, dtype)
        for layer in self.auto.encoder.layer:
            x = self._layer(layer, x, p, kind, mask)
        return x

    def forward(self, p: Packed) -> torch.Tensor:
        x = self.token_embeddings(p)
        pooled = _MeanPool.apply(x, p.pad_index, p.seq_ids, p.lengths)
        features = {"sentence_embedding": pooled.to(x.dtype) if x.dtype != torch.float32 else pooled}
        for m in list(self.model)[2:]:
            features = m(features)
        return features["sentence_embedding"]
