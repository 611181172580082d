"""Retrieval over a teacher-built index with queries embedded by a student (asymmetric), the teacher, or a student
over its own index.

The point of asymmetric retrieval: documents are embedded once by the large teacher, and each query costs only a
small student forward pass plus a FAISS search. That only works if the student was trained into *this* teacher's
space, so a student whose ``leafkd.json`` names another teacher is refused (unless explicitly overridden, for
black-box teachers whose fingerprint cannot be checked).
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections.abc import Sequence

import numpy as np
import torch

from leafkd.vectors import normalize

# Up to this many queries are embedded in one forward pass; larger inputs go through leafkd.encode's batcher.
_DIRECT_MAX = 512


# Length buckets: queries are padded up to the next one, so the encoder sees a small, fixed set of shapes (each
# warmed up once; on CUDA single queries and small batches replay a captured CUDA graph per shape).
LENGTH_BUCKETS = (8, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512)


# Batch sizes with a CUDA graph (a batch is padded up to the next one) for texts up to GRAPH_MAX_LEN tokens.
GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


GRAPH_MAX_LEN = 64


def length_bucket(n: int, max_length: int) -> int:
    """The padded length for a text of ``n`` tokens: the next bucket, capped at ``max_length``."""
    for b in LENGTH_BUCKETS:
        if b >= n:
            return min(b, max_length)
    return max_length


def _buckets_upto(max_length: int) -> list[int]:
    out = [b for b in LENGTH_BUCKETS if b < max_length]
    return out + [max_length]


def _is_mean_pooling(module) -> bool:
    mode = getattr(module, "pooling_mode", None)
    if isinstance(mode, (list, tuple)) and len(mode) == 1:
        mode = mode[0]
    if mode == "mean":
        return True
    if isinstance(mode, str) or mode is not None:
        return False
    # sentence-transformers < 6.1 keeps one flag per mode
    others = ("pooling_mode_cls_token", "pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
              "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
    return bool(getattr(module, "pooling_mode_mean_tokens", False)) and not any(getattr(module, a, False) for a in others)


def fast_plan(model, prompt: str | None = None) -> dict | None:
    """The pieces of a Transformer -> mean Pooling -> [Dense]* -> [Normalize] model, or None for anything else.

    With a plan, queries run through the HF model directly plus a fused pooling/projection function, skipping
    sentence-transformers' per-call feature plumbing. Other architectures keep the model's own forward.
    """
    try:
        modules = list(model)
    except TypeError:
        return None
    if len(modules) < 2:
        return None
    names = [type(m).__name__ for m in modules]
    if names[0] != "Transformer" or names[1] != "Pooling" or not _is_mean_pooling(modules[1]):
        return None
    if prompt and getattr(modules[1], "include_prompt", True) is False:
        return None  # prompt tokens would have to be masked out of the pooling
    auto = getattr(modules[0], "auto_model", None)
    if auto is None:
        return None
    dense, normalize_out = [], False
    for m, name in zip(modules[2:], names[2:]):
        if normalize_out:
            return None  # something after Normalize
        if name == "Dense":
            if getattr(m, "use_residual", False) or getattr(m, "module_input_name", "sentence_embedding") != "sentence_embedding":
                return None
            if getattr(m, "module_output_name", "sentence_embedding") != "sentence_embedding":
                return None
            dense.append((m.linear, m.activation_function))
        elif name == "Normalize":
            normalize_out = True
        else:
            return None
    return {"auto": auto, "dense": dense, "lower": bool(getattr(modules[0], "do_lower_case", False))}


class QueryEncoder:
    """Embeds queries with low latency; vectors come back float32 and L2-normalised.

    - The model is owned by the encoder: on CUDA its weights are cast to bfloat16 once (no autocast).
    - Tokenisation uses a private copy of the Rust tokenizer (truncation set once, no padding); texts are padded
      to a length bucket, so only a few shapes ever reach the GPU, and they are all warmed up at load time.
    - For Transformer + mean Pooling + Dense + Normalize models (students and the usual teachers) the forward
      pass is the HF model called directly, then pooling, projection and normalisation in one small function.
    - On CUDA, single queries and batches up to 256 texts of up to 64 tokens replay a CUDA graph captured per
      (batch bucket, length bucket): one pinned host buffer, one H2D copy, one replay, one D2H copy. If capture
      fails (an op that cannot be captured, an old torch), that shape (or all) runs eagerly and ``graph_error``
      says why. ``LEAFKD_CUDA_GRAPHS=0`` disables graphs.
    """

    def __init__(self, model, *, prompt: str | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, name: str = "", cuda_graphs: bool | None = None,
                 warmup: bool = True) -> None:
        from leafkd.runtime.devices import inference_dtype
        from leafkd.runtime.tokens import max_seq_length

        self.model = model
        self.prompt = prompt or None
        self.device = torch.device(device) if device is not None else model.device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = inference_dtype(self.device, dtype)
        self.name = name
        self.max_length = max_seq_length(model)
        model.eval()
        model.to(self.device)
        if self.dtype != torch.float32:
            model.to(self.dtype)
        dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = int(dim_of() or 0)
        self.pad_id = model.tokenizer.pad_token_id or 0
        self._plan = fast_plan(model, self.prompt)
        self._tokenizer = self._make_tokenizer(model.tokenizer)
        self._lock = threading.Lock()  # the model and the CUDA graphs are not re-entrant
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("LEAFKD_CUDA_GRAPHS", "1") not in ("0", "false", "no")
        self.use_graphs = bool(cuda_graphs) and self.device.type == "cuda" and self._plan is not None
        self.graph_error: str | None = None
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._graph_failed: set[tuple[int, int]] = set()
        self._pool = None
        self.warm = False
        if warmup:
            self.warmup()

    # -- pieces
    def _make_tokenizer(self, hf_tokenizer):
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(backend.to_str())  # private copy: its truncation state is ours alone
        tok.enable_truncation(self.max_length)
        tok.no_padding()
        return tok

    @property
    def fast(self) -> bool:
        """Whether the fused forward path is in use (else the model's own modules run)."""
        return self._plan is not None

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (prompt prepended, truncated to the model's max length)."""
        texts = list(texts)
        if self.prompt:
            texts = [self.prompt + t for t in texts]
        if self._plan is not None and self._plan["lower"]:
            texts = [t.lower() for t in texts]
        if self._tokenizer is not None:
            if len(texts) == 1:
                return [self._tokenizer.encode(texts[0]).ids]
            return [e.ids for e in self._tokenizer.encode_batch(texts)]
        enc = self.model.tokenizer(texts, truncation=True, max_length=self.max_length, add_special_tokens=True)
        return [list(x) for x in enc["input_ids"]]

    def _fill(self, buf: np.ndarray, token_ids: list[list[int]], width: int) -> None:
        """Write ids and mask of each text into ``buf`` [2, rows, width]; spare rows get a one-token mask."""
        ids, mask = buf[0], buf[1]
        ids.fill(self.pad_id)
        mask.fill(0)
        for r, t in enumerate(token_ids):
            n = min(len(t), width)
            ids[r, :n] = t[:n]
            mask[r, :n] = 1
        if len(token_ids) < len(buf[0]):
            mask[len(token_ids):, 0] = 1  # padding rows: never an all-masked row (NaN-free attention)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids + mask -> normalised float32 sentence vectors (one fused function, capturable)."""
        plan = self._plan
        if plan is None:
            out = self.model({"input_ids": ids, "attention_mask": mask})["sentence_embedding"]
            return torch.nn.functional.normalize(out.float(), dim=-1)
        hidden = plan["auto"](input_ids=ids, attention_mask=mask)[0]  # last_hidden_state
        m = mask.to(hidden.dtype).unsqueeze(1)  # [B, 1, L]
        summed = torch.bmm(m, hidden).squeeze(1).float()  # masked sum over tokens, fp32 accumulate
        x = summed / mask.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
        x = x.to(hidden.dtype)
        for linear, act in plan["dense"]:
            x = act(linear(x))
        return torch.nn.functional.normalize(x.float(), dim=-1)

    # -- CUDA graphs
    def _capture(self, rows: int, width: int):
        key = (rows, width)
        if key in self._graphs or key in self._graph_failed or not self.use_graphs:
            return self._graphs.get(key)
        try:
            host = torch.empty((2, rows, width), dtype=torch.long, pin_memory=True)
            self._fill(host.numpy(), [], width)
            static_in = host.to(self.device)
            with torch.inference_mode():
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(2):  # warm up kernels and cuBLAS workspaces outside the capture
                        self._forward(static_in[0], static_in[1])
                torch.cuda.current_stream(self.device).wait_stream(side)
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    static_out = self._forward(static_in[0], static_in[1])
            out_host = torch.empty(static_out.shape, dtype=torch.float32, pin_memory=True)
            self._graphs[key] = (graph, host, static_in, static_out, out_host)
            return self._graphs[key]
        except Exception as e:  # not capturable here: this shape runs eagerly from now on
            self._graph_failed.add(key)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.graph_error = f"{type(e).__name__}: {msg[:300]}"
            if not self._graphs:  # the very first capture failed: do not keep trying
                self.use_graphs = False
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
            return None

    def _graph_shape(self, n: int, width: int) -> tuple[int, int] | None:
        if not self.use_graphs:
            return None
        if n == 1:
            return (1, width)
        if width > GRAPH_MAX_LEN:
            return None
        for b in GRAPH_BATCHES:
            if b >= n:
                return (b, width)
        return None

    def warmup(self, freeze_gc: bool = False) -> None:
        """Run every length bucket once (and capture the CUDA graphs) so no request pays for a first call."""
        with self._lock:
            if self.device.type == "cuda":
                for width in _buckets_upto(self.max_length):
                    shapes = [(1, width)]
                    if self.use_graphs and width <= GRAPH_MAX_LEN:
                        shapes += [(b, width) for b in GRAPH_BATCHES if b > 1]
                    for rows, w in shapes:
                        if self._capture(rows, w) is None:
                            self._run_eager([[self.pad_id] * min(w, 4)] * rows, w)
                # eager shapes beyond the graphs (larger batches) get their kernels loaded too
                for width in _buckets_upto(self.max_length):
                    if width <= 128:
                        self._run_eager([[self.pad_id] * 4] * 512, width)
                torch.cuda.synchronize(self.device)
            else:
                self._run_eager([[self.pad_id] * 4], length_bucket(4, self.max_length))
            self.warm = True
        if freeze_gc:
            gc.collect()
            gc.freeze()  # the long-lived model and index objects leave the GC's scans: no multi-ms pauses

    # -- forward passes
    def _run_graph(self, key, token_ids: list[list[int]]) -> np.ndarray:
        graph, host, static_in, static_out, out_host = self._graphs[key]
        self._fill(host.numpy(), token_ids, key[1])
        static_in.copy_(host, non_blocking=True)
        graph.replay()
        out_host.copy_(static_out, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return out_host.numpy()[: len(token_ids)].copy()

    def _run_eager(self, token_ids: list[list[int]], width: int) -> np.ndarray:
        buf = np.empty((2, len(token_ids), width), dtype=np.int64)
        self._fill(buf, token_ids, width)
        t = torch.from_numpy(buf)
        with torch.inference_mode():
            t = t.to(self.device, non_blocking=False)
            out = self._forward(t[0], t[1])
            return out.cpu().numpy()

    def _run(self, token_ids: list[list[int]]) -> np.ndarray:
        longest = max(len(t) for t in token_ids)
        # GPU: pad to a bucket (few shapes, all warmed up, graph-backed); CPU: no padding beyond the longest text
        width = length_bucket(longest, self.max_length) if self.device.type == "cuda" else max(longest, 1)
        key = self._graph_shape(len(token_ids), width)
        if key is not None and (key in self._graphs or self._capture(*key) is not None):
            return self._run_graph(key, token_ids)
        return self._run_eager(token_ids, width)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            token_ids = self.tokenize(texts)
            if len(token_ids) <= _DIRECT_MAX:
                out = self._run(token_ids)
            else:  # many texts: similar lengths together, so padding stays small
                order = np.argsort([-len(t) for t in token_ids], kind="stable")
                out = np.empty((len(token_ids), self.dim), dtype=np.float32)
                step = GRAPH_BATCHES[-1]
                for s in range(0, len(order), step):
                    idx = order[s : s + step]
                    out[idx] = self._run([token_ids[i] for i in idx])
        return normalize(out)


