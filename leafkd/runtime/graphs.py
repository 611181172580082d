"""CUDA graphs: `GraphCapture` (one capture routine, used by training and by the query encoder) and the graphed
packed training step (forward, loss and backward replayed with one launch per batch).

A compiled packed step of a small student is some hundreds of kernels of a few microseconds each; at the batch
sizes distillation uses, Python issues them more slowly than the GPU runs them (on an H100, MiniLM: 14.4 ms per
step at batch 512 and 20.1 ms at 1024, half the tokens for 72% of the time; with graphs 8.7 and 15.2 ms, see
eval/BENCHMARKS.md). A CUDA graph replays the whole step from one call. Graphs need fixed shapes, so batches are
packed with a token bucket (`pack(bucket=, width=)`: filler tokens up to a multiple of the bucket, the padded view
fixed at the longest training text); each shape is captured on its second appearance (its first runs eagerly,
which also compiles it) and replayed after that. The optimiser step stays eager (a few fused launches). Any
capture failure turns graphs off for the run, with the reason kept in `disabled`, and training goes on eagerly:
graphs only ever change the speed.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from leafkd.runtime.packed import Packed

S = TypeVar("S")
T = TypeVar("T")


@dataclass
class CapturedGraph(Generic[S, T]):
    """A captured CUDA graph: copy new data into ``inputs``, ``graph.replay()``, then read ``outputs``."""

    graph: torch.cuda.CUDAGraph
    inputs: S  # static input tensors (their addresses are baked into the graph)
    outputs: T  # static outputs, overwritten by each replay


def error_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:300]}" if msg else type(e).__name__


class GraphCapture:
    """Captures callables into CUDA graphs on one device; all graphs share one memory pool.

    Graphs that are replayed one at a time can share a pool, so many captured shapes cost about the memory of the
    largest. A capture that fails returns None and keeps the reason, one line, in ``error``: callers fall back to
    running eagerly, so graphs only ever change the speed.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool: Any = None
        self.error: str | None = None

    def __call__(self, prepare: Callable[[], S], run: Callable[[S], T], warmup: int = 0) -> CapturedGraph[S, T] | None:
        """Capture ``run(prepare())``: ``prepare`` makes the static inputs (outside the graph), ``run`` the work.

        ``warmup`` eager runs on a side stream first load kernels and cuBLAS workspaces outside the capture.
        """
        try:
            inputs = prepare()
            if warmup:
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(warmup):
                        run(inputs)
                torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (a batch builder pinning host memory) may call CUDA during the capture.
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                outputs = run(inputs)
        except Exception as e:  # not capturable here (an op that syncs, an old driver or torch)
            self.error = error_line(e)
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
            return None
        return CapturedGraph(graph, inputs, outputs)


def bucket_tokens(mean_tokens_per_batch: float, width: int) -> int:
    """Filler bucket: about 1% of a batch's tokens (a power of two, 64..width), so padding costs <= ~1%."""
    b = 64
    while b * 2 <= 0.01 * mean_tokens_per_batch:
        b *= 2
    return max(1, min(b, width))


def bucket_rows(mean_tokens_per_batch: float, width: int) -> int:
    """Row-count bucket of batches packed into rows (`pack(rows=True)`): a power of two near 8% of a batch's rows.

    A batch's row count varies with its texts (batch 1024 of MiniLM's training texts: ~105-111 rows of 256), and
    every new count is a new shape: cuDNN plans and a CUDA graph. Rounding up to a multiple of this leaves a few
    shapes for ~4% of empty rows; without it an H200 run stalled for minutes (eval/BENCHMARKS.md, H200 run 3)."""
    rows = mean_tokens_per_batch / max(width, 1)
    b = 1
    while b * 2 <= 0.08 * rows:
        b *= 2
    return b


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
        self.graphs: dict[tuple, CapturedGraph] = {}
        self.seen: Counter = Counter()
        self.capture = GraphCapture(self.device)
        self.disabled: str | None = None
        self.replays = 0
        self.eager_steps = 0

    def zero_grad(self) -> None:
        torch._foreach_zero_([p.grad for p in self.params])  # type: ignore[misc]  # set in __init__, never None

    def _compute(self, packed: Packed, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Autocast's weight cache would keep graph-pool copies alive across captures: off (as torch.cuda.graph asks).
        with torch.autocast("cuda", dtype=self.autocast or torch.float32, enabled=self.autocast is not None,
                            cache_enabled=False):
            emb = self.forward(packed)
        target = self.teacher[idx].float()
        loss, parts = self.loss_fn(emb.float(), target, None)
        loss.backward()
        return loss.detach(), {k: v.detach() for k, v in parts.items()}

    def _capture(self, key: tuple, packed: Packed, idx: torch.Tensor) -> CapturedGraph | None:
        def static_inputs() -> tuple[Packed, torch.Tensor]:
            return packed.to(self.device), idx.to(self.device, non_blocking=True)

        def step(inputs: tuple[Packed, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            self.zero_grad()
            return self._compute(*inputs)

        entry = self.capture(static_inputs, step)
        if entry is None:  # eager from now on
            self.disabled = self.capture.error
            return None
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
        (static_packed, static_idx), (loss, parts) = entry.inputs, entry.outputs
        static_packed.copy_(packed)
        static_idx.copy_(idx, non_blocking=True)
        entry.graph.replay()
        self.replays += 1
        return loss, parts

    def stats(self) -> dict:
        return {"graphs": len(self.graphs), "replays": self.replays, "eager_steps": self.eager_steps,
                "disabled": self.disabled}


def fixed_width(lengths: np.ndarray) -> int:
    """The padded view's width for every batch: the longest training text."""
    return int(lengths.max()) if len(lengths) else 1


