"""Devices and precisions: which torch device an option names, and the dtypes inference and training run in."""

from __future__ import annotations

from enum import StrEnum

import torch

from leafkd.errors import LeafkdError
from leafkd.runtime import distributed


class DType(StrEnum):
    """The dtype an encoder runs in (`dtype=` of encoding and capture); auto: bf16 on CUDA, fp32 elsewhere.

    torch's long names (bfloat16, float16, float32) are accepted too.
    """

    AUTO = "auto"
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @classmethod
    def _missing_(cls, value: object) -> DType | None:
        return {"bfloat16": cls.BF16, "float16": cls.FP16, "float32": cls.FP32}.get(str(value))


class Precision(StrEnum):
    """Training's precision option: auto (bf16 autocast on CUDA, none elsewhere), bf16 or fp32 (no autocast)."""

    AUTO = "auto"
    BF16 = "bf16"
    FP32 = "fp32"


_TORCH_DTYPES = {DType.BF16: torch.bfloat16, DType.FP16: torch.float16, DType.FP32: torch.float32}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The torch device for an option (auto, cpu, cuda, cuda:N); under torchrun bare cuda is cuda:LOCAL_RANK."""
    if device is None or device == "auto":
        return distributed.device_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise LeafkdError(f"device {str(device)!r} asked for, but no CUDA GPU is available")
    return distributed.device_for(torch.device(device))


def inference_dtype(device: torch.device, dtype: DType | str | torch.dtype | None) -> torch.dtype:
    """The dtype an encoder runs in: bf16 on CUDA and fp32 elsewhere by default, or the one named."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        choice = DType(dtype or DType.AUTO)
    except ValueError:
        raise LeafkdError(f"dtype must be one of {', '.join(d.value for d in DType)}, not {dtype!r}") from None
    if choice is DType.AUTO:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _TORCH_DTYPES[choice]


def autocast_dtype(precision: Precision | str, device: torch.device) -> torch.dtype | None:
    """Training's autocast dtype for a precision option (auto, bf16, fp32); None: no autocast."""
    try:
        choice = Precision(precision)
    except ValueError:
        raise LeafkdError(f"precision must be auto, bf16 or fp32, not {precision!r}") from None
    if choice is Precision.FP32 or (choice is Precision.AUTO and device.type != "cuda"):
        return None
    return torch.bfloat16
