"""The run's student: what it takes from the teacher (normalisation, query prompt), its build, and the forward
that training calls (packed, wrapped for DDP, compiled)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from leafkd.errors import LeafkdError
from leafkd.models import resolve_model
from leafkd.runtime import distributed as dist_
from leafkd.runtime.devices import pick_device
from leafkd.runtime.packed import PackedForward, unsupported_reason
from leafkd.runtime.packed import supported as packed_supported
from leafkd.student.build import build_student
from leafkd.training.config import ROWS_NEED_PACKED, PackedAttention, StudentKind, TrainConfig, TriState
from leafkd.training.optim import set_dropout


@dataclass
class TeacherSettings:
    """What the student inherits from its teacher."""

    path: str | None  # the teacher's model folder (a store's recorded teacher when no --teacher is given)
    query_prompt: str | None
    normalize: bool  # the student ends with Normalize


def teacher_settings(cfg: TrainConfig, teacher_vectors: np.ndarray, recorded_teacher: str | None) -> TeacherSettings:
    """The teacher's folder, query prompt and normalisation: from its model folder when --teacher is given (the
    options override), else from its vectors (unit norm: normalised)."""
    path, query_prompt, normalizes = recorded_teacher, cfg.query_prompt, None
    if cfg.teacher is not None:
        teacher_path = resolve_model(cfg.teacher)
        modules_file = teacher_path / "modules.json"
        modules = json.loads(modules_file.read_text()) if modules_file.exists() else []
        normalizes = any(m.get("type", "").endswith("Normalize") for m in modules)
        if query_prompt is None:
            st_cfg = teacher_path / "config_sentence_transformers.json"
            prompts = json.loads(st_cfg.read_text()).get("prompts", {}) if st_cfg.exists() else {}
            query_prompt = prompts.get("query") or None
        path = str(teacher_path)
    if cfg.normalize != TriState.AUTO:
        return TeacherSettings(path, query_prompt, cfg.normalize == TriState.TRUE)
    if normalizes is None:
        norms = np.linalg.norm(teacher_vectors[:1000].astype(np.float32), axis=1)
        normalizes = bool(np.allclose(norms, 1.0, atol=1e-2))
    return TeacherSettings(path, query_prompt, normalizes)


def make_student(cfg: TrainConfig, teacher_dim: int, teacher: TeacherSettings):
    """The student to train: the base encoder (cut to its layers) or a static table initialised from it (on the
    run's device), + pooling + projection (+ Normalize)."""
    student = build_student(cfg.student, teacher_dim, layers=cfg.student_layers, normalize=teacher.normalize,
                            projection=cfg.projection, max_seq_length=cfg.max_seq_length, kind=cfg.student_kind.value,
                            static_dim=cfg.static_dim, static_vocab=cfg.static_vocab, static_init=cfg.static_init.value,
                            device=str(pick_device(cfg.device)) if cfg.student_kind == StudentKind.STATIC else None)
    if teacher.query_prompt:
        student.prompts = {**student.prompts, "query": teacher.query_prompt}
    set_dropout(student, cfg.dropout)
    return student


def use_packed(cfg: TrainConfig, student) -> bool:
    """Whether batches are packed: asked for (an error when the student cannot run packed), or auto and possible."""
    if cfg.packed == TriState.TRUE and not packed_supported(student):
        raise LeafkdError(f"--packed true: {unsupported_reason(student)}")
    return cfg.packed == TriState.TRUE or (cfg.packed == TriState.AUTO and packed_supported(student))


def use_rows(cfg: TrainConfig, packed: bool) -> bool:
    """Whether packed batches go into rows (`pack(rows=True)`, row attention): only when asked for. On an H200 the
    graphed rows step ran ~1.3x the varlen step's rate at steady state, but a run whose row counts were not yet
    bucketed stalled for minutes on new shapes (eval/BENCHMARKS.md, H200 run 3), so auto stays varlen."""
    if cfg.packed_attention != PackedAttention.ROWS:
        return False
    if not packed:
        raise LeafkdError(ROWS_NEED_PACKED)
    return True


def training_forward(cfg: TrainConfig, student, packed: bool, device: torch.device) -> tuple[Any, Any]:
    """The forward the training step calls, and its DDP wrapper under torchrun (else None). Call it after the warm
    start: DDP broadcasts rank 0's weights."""
    forward = PackedForward(student) if packed else student
    ddp = None
    if dist_.world_size() > 1:
        forward = ddp = dist_.wrap_ddp(forward, device)
    if cfg.compile == TriState.TRUE or (cfg.compile == TriState.AUTO and packed and device.type == "cuda"):
        forward = torch.compile(forward, dynamic=True)
    return forward, ddp
