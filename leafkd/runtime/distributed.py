"""PyTorch distributed, the way `torchrun` launches it: one process per GPU (or per CPU worker).

`torchrun --nproc-per-node N ...` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
`init_from_env()` joins that process group (NCCL when the process drives a CUDA device, gloo otherwise).
Without those variables, or with WORLD_SIZE=1, nothing is initialised and every helper here is the identity
of a single process (rank 0 of 1), so the same commands run unchanged on one CPU or one GPU.

Environment knobs: LEAFKD_DIST_BACKEND (force ``gloo`` or ``nccl``), LEAFKD_DIST_TIMEOUT_MIN (collective
timeout in minutes, default 120: ranks may wait at a barrier while another finishes its last capture shard).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_from_env(device: str | None = None) -> bool:
    """Join the torchrun process group when WORLD_SIZE > 1; returns whether running distributed.

    ``device`` is the user's device option: "cpu" forces the gloo backend even where CUDA is present.
    Idempotent: a second call (or a group initialised by the caller) is left as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if env_world_size() <= 1 or not dist.is_available():
        return False
    use_cuda = torch.cuda.is_available() and not str(device or "auto").startswith("cpu")
    backend = os.environ.get("LEAFKD_DIST_BACKEND") or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank())
    timeout = datetime.timedelta(minutes=float(os.environ.get("LEAFKD_DIST_TIMEOUT_MIN", "120")))
    kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", local_rank())
    dist.init_process_group(**kwargs)
    return dist.get_world_size() > 1


def shutdown() -> None:
    """Leave the process group (end of a command); a no-op when none was joined."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if env_world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def device_for(device: torch.device) -> torch.device:
    """Give a bare ``cuda`` device this process's GPU (LOCAL_RANK) when running under torchrun."""
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in a single process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def split_range(n: int, world: int | None = None, r: int | None = None) -> tuple[int, int]:
    """This rank's contiguous [lo, hi) of n items: sizes differ by at most one, earlier ranks larger."""
    world = world_size() if world is None else world
    r = rank() if r is None else r
    return (n * r) // world, (n * (r + 1)) // world


def local_batch(full: np.ndarray, world: int | None = None, r: int | None = None) -> tuple[np.ndarray, float]:
    """This rank's slice of a global batch and its loss weight ``len(slice) * world / len(full)``.

    DistributedDataParallel averages gradients over ranks; weighting each rank's mean loss this way makes the
    average equal to the gradient of the mean loss over the whole global batch, however unevenly it splits.
    A rank whose slice is empty gets the first item with weight 0 (it still joins the gradient all-reduce).
    """
    world = world_size() if world is None else world
    if world == 1:
        return full, 1.0
    lo, hi = split_range(len(full), world, r)
    if hi <= lo:
        return full[:1], 0.0
    return full[lo:hi], (hi - lo) * world / len(full)


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Concatenate every rank's rows in rank order (the inverse of `split_range` slicing) on every rank."""
    if not is_distributed():
        return local
    parts = all_gather_object(np.ascontiguousarray(local))
    return np.concatenate(parts)


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``module`` (on ``device``), ignoring parameters the forward never uses.

    Encoders carry weights the embedding does not use (BERT's pooler): one tiny probe forward/backward finds
    them, and DDP is told to ignore them rather than search the autograd graph for unused ones every step.
    Their gradients stay None on every rank, exactly as in a single process.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    was_training = module.training
    module.train()
    probe_batch = getattr(module, "probe_batch", None)  # leafkd.runtime.packed.PackedForward has one
    if callable(probe_batch):
        out = module(probe_batch(device))
    else:
        pad = getattr(getattr(module, "tokenizer", None), "pad_token_id", None) or 0
        ids = torch.full((1, 2), pad, dtype=torch.long, device=device)
        out = module({"input_ids": ids, "attention_mask": torch.ones_like(ids)})["sentence_embedding"]
    out.float().sum().backward()
    unused = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    for p in module.parameters():
        p.grad = None
    module.train(was_training)
    find_unused = False
    if unused:
        if hasattr(DDP, "_set_params_and_buffers_to_ignore_for_model"):
            DDP._set_params_and_buffers_to_ignore_for_model(module, unused)
        else:
            find_unused = True
    device_ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=device_ids, find_unused_parameters=find_unused, broadcast_buffers=False)
