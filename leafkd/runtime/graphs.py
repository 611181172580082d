"""CUDA graphs of the packed training step: forward, loss and backward replayed with one launch per batch.

A compiled packed step of a small student is some hundreds of kernels of a few microseconds each; at the batch
sizes distillation uses, Python issues them more slowly than the GPU runs them (on an H100, MiniLM: 14.4 ms per
step at batch 512 and 20.1 ms at 1024, half the tokens for 72% of the time; with graphs 8.7 and 15.2 ms, see
eval/BENCHMARKS.md). A CUDA graph replays the whole step from one call. Graphs need fixed shapes, so batches are packed with a token bucket (`pack(bucket=,
width=)`: filler tokens up to a multiple of the bucket, the padded view fixed at the longest training text);
each shape is captured on its second appearance (its first runs eagerly, which also compiles it) and replayed
after that. The optimiser step stays eager (a few fused launches). Any capture failure turns graphs off for the
run, with the reason kept in `disabled`, and training goes on eagerly: graphs only ever change the speed.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from leafkd.runtime.packed import Packed


def bucket_tokens(mean_tokens_per_batch: float, width: int) -> int:
    """Filler bucket: about 1% of a batch's tokens (a power of two, 64..width), so padding costs <= ~1%."""
    b = 64
    while b * 2 <= 0.01 * mean_tokens_per_batch:
        b *= 2
    return max(1, min(b, width))


class GraphedTrainStep:
    """`step(packed, idx) -> (loss, parts)`: gradients of the loss land in the parameters' (static) `.grad`.

    Gradients are zeroed inside the step (the caller must not set them to None). Returned tensors are the
    graph's static outputs: read them (queue work on them) before the next call. Keep no autograd graph of this
    model alive between calls (a loss, an output with grad): its gradient nodes would tie the next capture to
    the stream they were made on.
    """

    def __init__(self, forward: Callable[[Packed], torch.Tensor], loss_fn: torch.nn.Module,
                 params: list[torch.nn.Parameter], teacher: torch.Tensor, autocast: torch.dtype | None,
                 max_graphs: int = 64):
        self.forward, self.loss_fn, self.teacher, self.autocast = forward, loss_fn, teacher, autocast
        self.device = teacher.device
        self.params = [p for p in params if p.requires_grad]
        for p in self.params:  # static gradient buffers: the graphs accumulate into these addresses
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, tuple] = {}
        self.seen: Counter = Counter()
        self.pool = None
        self.disabled: str | None = None
        self.replays = 0
        self.eager_steps = 0

    def zero_grad(self) -> None:
        torch._foreach_zero_([p.grad for p in self.params])

    def _compute(self, packed: Packed, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Autocast's weight cache would keep graph-pool copies alive across captures: off (as torch.cuda.graph asks).
        with torch.autocast("cuda", dtype=self.autocast or torch.float32, enabled=self.autocast is not None,
                            cache_enabled=False):
            emb = self.forward(packed)
        target = self.teacher[idx].float()
        loss, parts = self.loss_fn(emb.float(), target, None)
        loss.backward()
        return loss.detach(), {k: v.detach() for k, v in parts.items()}

    def _capture(self, key: tuple, packed: Packed, idx: torch.Tensor) -> tuple | None:
        try:
            static_packed = packed.to(self.device)
            static_idx = idx.to(self.device, non_blocking=True)
            torch.cuda.synchronize(self.device)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: the batch-building thread may pin host memory while this thread captures.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                self.zero_grad()
                loss, parts = self._compute(static_packed, static_idx)
        except Exception as e:  # not capturable here (an op that syncs, an old driver): eager from now on
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.disabled = f"{type(e).__name__}: {msg[:300]}"
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
            return None
        entry = (graph, static_packed, static_idx, loss, parts)
        self.graphs[key] = entry
        return entry

    def __call__(self, packed: Packed, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        key = (*packed.shape_key, int(idx.shape[0]))
        entry = self.graphs.get(key)
        if (entry is None and self.disabled is None and self.seen[key] >= 1
                and len(self.graphs) < self.max_graphs):
            entry = self._capture(key, packed, idx)
        self.seen[key] += 1
        if entry is None:
            self.eager_steps += 1
            self.zero_grad()
            return self._compute(packed.to(self.device), idx.to(self.device, non_blocking=True))
        graph, static_packed, static_idx, loss, parts = entry
        static_packed.copy_(packed)
        static_idx.copy_(idx, non_blocking=True)
        graph.replay()
        self.replays += 1
        return loss, parts

    def stats(self) -> dict:
        return {"graphs": len(self.graphs), "replays": self.replays, "eager_steps": self.eager_steps,
                "disabled": self.disabled}


def fixed_width(lengths: np.ndarray) -> int:
    """The padded view's width for every batch: the longest training text."""
    return int(lengths.max()) if len(lengths) else 1


