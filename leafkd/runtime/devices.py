"""Devices and precisions: which torch device an option names, and the dtypes inference and training run in."""

from __future__ import annotations

import torch

from leafkd.errors import LeafkdError
from leafkd.runtime import distributed as dist_


def pick_device(device: str | None = None) -> torch.device:
    """The torch device for an option (auto, cpu, cuda, cuda:N); under torchrun bare cuda is cuda:LOCAL_RANK."""
    if device in (None, "auto"):
        return dist_.device_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LeafkdError(f"device {device!r} asked for, but no CUDA GPU is available")
    return dist_.device_for(torch.device(device))


def inference_dtype(device: torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype an encoder runs in: bf16 on CUDA and fp32 elsewhere by default, or the one named."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
            "fp32": torch.float32, "float32": torch.float32}[str(dtype)]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Training's autocast dtype for a precision option (auto, bf16, fp32); None: no autocast."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision in ("auto", "bf16"):
        return torch.bfloat16
    raise LeafkdError(f"precision must be auto, bf16 or fp32, not {precision!r}")
