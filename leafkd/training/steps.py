"""One optimiser step: `grad_accum` micro-batches (eager, or replayed as a CUDA graph), then the guarded update.

Eager micro-batches run the forward under bf16 autocast (on CUDA) and backpropagate the loss; a CUDA graph
(leafkd.runtime.graphs) replays forward, loss and backward in one launch. The update is AdamW with a
NaN/inf guard: on CUDA the fused optimiser skips a non-finite step on the device (the GradScaler protocol), so
the host never waits for the loss; elsewhere a non-finite step is dropped. Skips are counted at log time and
a run that keeps diverging stops.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from leafkd.errors import LeafkdError
from leafkd.runtime import distributed as dist_
from leafkd.runtime.graphs import GraphedTrainStep
from leafkd.training.config import TrainConfig, TriState
from leafkd.training.loader import Batch

MAX_SKIPPED_STEPS = 20


def graphs_unsupported(cfg: TrainConfig, device: torch.device, world: int, packed: bool = True, forward=None,
                       autocast: torch.dtype | None = None) -> str | None:
    """None when the training step can be replayed as CUDA graphs; otherwise why not (one line). Without
    `forward` only what the config and device decide is checked (before any work)."""
    if not packed or cfg.packed == TriState.FALSE:
        return "needs packed training"
    if device.type != "cuda":
        return f"needs a CUDA device, not {device.type}"
    if world > 1:
        return "one process only (DDP's gradient hooks are not captured)"
    if cfg.grad_accum != 1:
        return "needs grad_accum 1"
    if cfg.dropout > 0:
        return "needs dropout 0"
    if forward is None:
        return None
    inner = getattr(forward, "_orig_mod", forward)
    if autocast is None or inner._attention_kind(torch.empty(1, device=device, dtype=autocast)) != "varlen":
        return "needs flash attention over packed texts (BERT-style student, bf16/fp16)"
    return None


class StepStats:
    """What the steps since the last log line add up to; kept on the device, so no step waits for the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self.skipped = 0  # non-finite steps of the whole run
        self.skipped_dev = torch.zeros((), device=device)  # those the fused optimiser skipped, not yet counted
        self.loss_sum = torch.zeros((), device=device)
        self.loss_count: Any = 0  # steps in loss_sum: an int, or a device tensor under the fused guard
        self.part_sums: dict[str, Any] = {}
        self.t_last, self.samples, self.tokens = time.perf_counter(), 0, 0

    def add_parts(self, parts: dict[str, torch.Tensor], scale: float = 1.0) -> None:
        for name, value in parts.items():
            self.part_sums[name] = self.part_sums.get(name, 0.0) + value / scale

    def record(self, step: int, epoch: int, lr: float, world: int) -> dict[str, Any]:
        """The `train` record of the steps since the last one (and a reset); stops a diverging run."""
        now = time.perf_counter()
        self.skipped += int(self.skipped_dev)
        self.skipped_dev.zero_()
        if self.skipped > MAX_SKIPPED_STEPS:
            raise LeafkdError(f"training diverged: {self.skipped} steps with non-finite loss; lower --lr")
        count = float(self.loss_count)
        parts = self.part_sums
        if world > 1 and parts:
            reduced = dist_.all_reduce_sum(torch.stack([torch.as_tensor(v, device=self.device).float()
                                                        for v in parts.values()])) / world
            parts = dict(zip(parts, reduced))
        seconds = now - self.t_last
        record = {"type": "train", "step": step, "epoch": epoch, "loss": float(self.loss_sum / max(count, 1)),
                  "lr": lr, "samples_per_s": self.samples / seconds, "tokens_per_s": self.tokens / seconds,
                  "skipped_steps": self.skipped, "loss_parts": {k: float(v) / max(count, 1) for k, v in parts.items()}}
        self.loss_sum.zero_()
        self.loss_count = 0
        self.part_sums = {}
        self.t_last, self.samples, self.tokens = now, 0, 0
        return record


class TrainStep:
    """Forward, loss and backward of `grad_accum` micro-batches, then the (guarded, clipped) optimiser update."""

    def __init__(self, cfg: TrainConfig, student: torch.nn.Module, forward, loss_fn: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, teacher: torch.Tensor, device: torch.device, *,
                 autocast: torch.dtype | None, packed: bool, graphed: GraphedTrainStep | None = None, ddp=None):
        self.student, self.forward, self.loss_fn, self.optimizer = student, forward, loss_fn, optimizer
        self.teacher, self.device, self.autocast, self.packed = teacher, device, autocast, packed
        self.graphed, self.ddp = graphed, ddp
        self.accum, self.clip, self.world = cfg.grad_accum, cfg.clip, dist_.world_size()
        self.fused = device.type == "cuda"  # the optimiser is fused AdamW there (see Trainer.setup_optimiser)

    def __call__(self, batches: Iterator[tuple[int, int, Batch]], stats: StepStats) -> tuple[int, int]:
        """One optimiser step on the next micro-batches of `batches`; returns the data position after them."""
        if self.graphed is None:  # the graphs zero their static gradient buffers themselves
            self.optimizer.zero_grad(set_to_none=True)
        total: torch.Tensor | None = None
        epoch = position = 0
        for micro in range(self.accum):
            epoch, position, item = next(batches)
            if self.ddp is not None:  # DDP's no_sync(): all-reduce the gradients only on the last micro-batch
                self.ddp.require_backward_grad_sync = micro == self.accum - 1
            if self.graphed is not None:
                total, parts = self.graphed(item["packed"], item["idx"])
                stats.add_parts(parts)
            else:
                loss = self.eager_micro_step(item, stats)
                total = loss if total is None else total + loss
            stats.samples += item["n"]
            stats.tokens += item["real_tokens"]
        assert total is not None
        total = total / self.accum
        if self.world > 1:  # the global batch's loss, so every rank makes the same skip decision
            total = dist_.all_reduce_sum(total) / self.world
        self.update(total, stats)
        return epoch, position

    def eager_micro_step(self, item: Batch, stats: StepStats) -> torch.Tensor:
        """Forward, loss and backward of one micro-batch; returns its (detached) loss."""
        device = self.device
        target = self.teacher[item["idx"].to(device, non_blocking=True)].float()
        with torch.autocast(device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            if self.packed:
                emb = self.forward(item["packed"].to(device))
            else:
                ids = item["ids"].to(device, non_blocking=True)
                mask = item["mask"].to(device, non_blocking=True)
                emb = self.forward({"input_ids": ids, "attention_mask": mask})["sentence_embedding"]
        keys = self.teacher[item["full"].to(device, non_blocking=True)].float() if "full" in item else None
        loss, parts = self.loss_fn(emb.float(), target, keys)
        if item["weight"] != 1.0:  # distributed, uneven split: the mean over ranks is the global-batch mean
            loss = loss * item["weight"]
            parts = {name: value * item["weight"] for name, value in parts.items()}
        stats.add_parts(parts, scale=self.accum)
        (loss / self.accum).backward()
        return loss.detach()

    def update(self, total: torch.Tensor, stats: StepStats) -> None:
        """The optimiser step, unless the loss is not finite."""
        if self.fused:
            # NaN/inf guard without a host sync: fused AdamW skips the update on the device when `found_inf`
            # is set (the GradScaler protocol), so the CPU keeps queueing work; skips are counted at log time.
            found_inf = (~torch.isfinite(total)).float()
            self.clip_gradients()
            self.optimizer.found_inf, self.optimizer.grad_scale = found_inf, None  # type: ignore[attr-defined]
            self.optimizer.step()
            stats.skipped_dev += found_inf
            stats.loss_sum += torch.nan_to_num(total) * (1 - found_inf)
            stats.loss_count += 1 - found_inf
        elif not torch.isfinite(total):
            # NaN/inf guard: drop this step's update; stop if it keeps happening.
            stats.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.clip_gradients()
            self.optimizer.step()
            stats.loss_sum += total
            stats.loss_count += 1

    def clip_gradients(self) -> None:
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip)
