"""The student's head: the Dense projection into the teacher's space (when asked or when the dims differ) and
Normalize (when the teacher's vectors are unit length)."""

from __future__ import annotations

from torch import nn

from leafkd.errors import LeafkdError
from leafkd.modules import Dense, Normalize

PROJECTIONS = ("auto", "always", "none")


def head_modules(hidden: int, teacher_dim: int, projection: str = "auto", normalize: bool = False) -> list[nn.Module]:
    """[Dense(hidden -> teacher_dim)] when `projection` asks for it (auto: when the dims differ), then [Normalize]."""
    if projection not in PROJECTIONS:
        raise LeafkdError(f"projection must be auto, always or none, not {projection!r}")
    modules: list[nn.Module] = []
    if projection == "always" or (projection == "auto" and hidden != teacher_dim):
        modules.append(Dense(hidden, teacher_dim, bias=True, activation_function=nn.Identity()))
    elif hidden != teacher_dim:
        raise LeafkdError(f"projection='none' but the student is {hidden}-d and the teacher {teacher_dim}-d")
    if normalize:
        modules.append(Normalize())
    return modules
