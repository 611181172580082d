"""The query encoder: embeds queries with low latency for retrieval and the search server."""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Sequence

import numpy as np
import torch

from leafkd.models import embedding_dimension
from leafkd.retrieval.fused import fused_forward
from leafkd.retrieval.shapes import GRAPH_BATCHES, graph_shape, graph_shapes, length_bucket, length_buckets
from leafkd.runtime.graphs import CapturedGraph, GraphCapture
from leafkd.vectors import normalize

# Up to this many queries are embedded in one forward pass; larger inputs are sorted by length and chunked.
DIRECT_MAX = 512

# CPU: what one more forward pass costs, in padded tokens (a few ms of per-call work over six or twelve layers).
# Queries are grouped by length so that padding never costs more than that (`length_groups`).
CPU_CALL_TOKENS = 48
# CPU: most padded tokens in one forward pass (bounds its activations: a few MB per thousand tokens).
CPU_GROUP_TOKENS = 8192


def length_groups(lengths: Sequence[int], call_tokens: int = CPU_CALL_TOKENS,
                  group_tokens: int = CPU_GROUP_TOKENS) -> list[list[int]]:
    """Indices of texts grouped for padded forward passes on the CPU: sorted by length, a new group whenever
    padding the next text into the current group would cost more padded tokens than a forward pass of its own
    (``call_tokens``), or the group would pass ``group_tokens`` padded tokens.

    One padded batch of mixed lengths spends most of its work on padding (200 queued queries padded to the
    longest one were slower than one at a time); groups of similar length are not, and each costs one call.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    width = 0
    for i in order:
        n = max(lengths[i], 1)
        grow = len(groups[-1]) * (n - width) if groups else 0  # the group is padded to the new, longer width
        if not groups or grow > call_tokens or (len(groups[-1]) + 1) * n > group_tokens:
            groups.append([i])
        else:
            groups[-1].append(i)
        width = n
    return groups


class QueryEncoder:
    """Embeds queries with low latency; vectors come back float32 and L2-normalised.

    - The model is owned by the encoder: on CUDA its weights are cast to bfloat16 once (no autocast).
    - Tokenisation uses a private copy of the Rust tokenizer (truncation set once, no padding); texts are padded
      to a length bucket (`leafkd.retrieval.shapes`), so only a few shapes ever reach the GPU, and they are all
      warmed up at load time.
    - For Transformer + mean Pooling + Dense + Normalize models (students and the usual teachers) the forward
      pass is `leafkd.retrieval.fused.FusedForward`: the HF model called directly, then pooling, projection and
      normalisation in one small function.
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
        self.dim = embedding_dimension(model)
        self.pad_id = model.tokenizer.pad_token_id or 0
        self._fused = fused_forward(model, self.prompt)
        self._tokenizer = self._make_tokenizer(model.tokenizer)
        self._lock = threading.Lock()  # the model and the CUDA graphs are not re-entrant
        if cuda_graphs is None:
            cuda_graphs = os.environ.get("LEAFKD_CUDA_GRAPHS", "1") not in ("0", "false", "no")
        self.use_graphs = bool(cuda_graphs) and self.device.type == "cuda" and self._fused is not None
        self._capture_graph = GraphCapture(self.device)
        # (rows, width) -> the captured graph and the pinned host buffer its output is copied into
        self._graphs: dict[tuple[int, int], tuple[CapturedGraph, torch.Tensor]] = {}
        self._graph_failed: set[tuple[int, int]] = set()
        self.warm = False
        if warmup:
            self.warmup()

    # -- facts
    @property
    def fast(self) -> bool:
        """Whether the fused forward path is in use (else the model's own modules run)."""
        return self._fused is not None

    @property
    def cuda_graphs(self) -> int:
        """How many CUDA graphs are captured."""
        return len(self._graphs)

    @property
    def graph_error(self) -> str | None:
        """Why the last CUDA-graph capture failed (one line), or None."""
        return self._capture_graph.error

    # -- tokens
    def _make_tokenizer(self, hf_tokenizer):
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(backend.to_str())  # private copy: its truncation state is ours alone
        tok.enable_truncation(self.max_length)
        tok.no_padding()
        return tok

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (prompt prepended, truncated to the model's max length)."""
        texts = list(texts)
        if self.prompt:
            texts = [self.prompt + t for t in texts]
        if self._fused is not None and self._fused.lower:
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

    # -- forward passes
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Token ids + mask -> normalised float32 sentence vectors (one fused function, capturable)."""
        if self._fused is not None:
            return self._fused(ids, mask)
        out = self.model({"input_ids": ids, "attention_mask": mask})["sentence_embedding"]
        return torch.nn.functional.normalize(out.float(), dim=-1)

    def _capture(self, rows: int, width: int) -> tuple[CapturedGraph, torch.Tensor] | None:
        key = (rows, width)
        if key in self._graphs or key in self._graph_failed or not self.use_graphs:
            return self._graphs.get(key)

        def static_inputs() -> tuple[torch.Tensor, torch.Tensor]:  # (pinned host buffer, its device copy)
            host = torch.empty((2, rows, width), dtype=torch.long, pin_memory=True)
            self._fill(host.numpy(), [], width)
            return host, host.to(self.device)

        def forward(inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            with torch.inference_mode():
                return self._forward(inputs[1][0], inputs[1][1])

        captured = self._capture_graph(static_inputs, forward, warmup=2)
        if captured is None:  # not capturable here: this shape runs eagerly from now on
            self._graph_failed.add(key)
            if not self._graphs:  # the very first capture failed: do not keep trying
                self.use_graphs = False
            return None
        out_host = torch.empty(captured.outputs.shape, dtype=torch.float32, pin_memory=True)
        self._graphs[key] = (captured, out_host)
        return self._graphs[key]

    def _run_graph(self, key: tuple[int, int], token_ids: list[list[int]]) -> np.ndarray:
        captured, out_host = self._graphs[key]
        host, static_in = captured.inputs
        self._fill(host.numpy(), token_ids, key[1])
        static_in.copy_(host, non_blocking=True)
        captured.graph.replay()
        out_host.copy_(captured.outputs, non_blocking=True)
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
        key = graph_shape(len(token_ids), width) if self.use_graphs else None
        if key is not None and (key in self._graphs or self._capture(*key) is not None):
            return self._run_graph(key, token_ids)
        return self._run_eager(token_ids, width)

    def warmup(self, freeze_gc: bool = False) -> None:
        """Run every length bucket once (and capture the CUDA graphs) so no request pays for a first call."""
        with self._lock:
            if self.device.type == "cuda":
                for width in length_buckets(self.max_length):
                    shapes = graph_shapes(width) if self.use_graphs else [(1, width)]
                    for rows, w in shapes:
                        if self._capture(rows, w) is None:
                            self._run_eager([[self.pad_id] * min(w, 4)] * rows, w)
                # eager shapes beyond the graphs (larger batches) get their kernels loaded too
                for width in length_buckets(self.max_length):
                    if width <= 128:
                        self._run_eager([[self.pad_id] * 4] * 512, width)
                torch.cuda.synchronize(self.device)
            else:
                self._run_eager([[self.pad_id] * 4], length_bucket(4, self.max_length))
            self.warm = True
        if freeze_gc:
            gc.collect()
            gc.freeze()  # the long-lived model and index objects leave the GC's scans: no multi-ms pauses

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            token_ids = self.tokenize(texts)
            if self.device.type != "cuda" and len(token_ids) > 1:
                out = np.empty((len(token_ids), self.dim), dtype=np.float32)
                for group in length_groups([len(t) for t in token_ids]):
                    out[group] = self._run([token_ids[i] for i in group])
            elif len(token_ids) <= DIRECT_MAX:
                out = self._run(token_ids)
            else:  # many texts: similar lengths together, so padding stays small
                order = np.argsort([-len(t) for t in token_ids], kind="stable")
                out = np.empty((len(token_ids), self.dim), dtype=np.float32)
                step = GRAPH_BATCHES[-1]
                for s in range(0, len(order), step):
                    idx = order[s : s + step]
                    out[idx] = self._run([token_ids[i] for i in idx])
        return normalize(out)
