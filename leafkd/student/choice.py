"""The `student` option's named choices: besides a base encoder's folder or installed name, ``teacher`` (a student
cut from the teacher's own layers, with ``student_layers``) and ``static`` (a static-embedding student whose table
starts from the teacher). One string can name a whole frontier point: ``teacher:first:6``,
``all-MiniLM-L6-v2:first:2``, ``static:256`` (NAME[:LAYERS] or static[:DIM])."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from leafkd.errors import LeafkdError
from leafkd.student.layers import SPEC_HELP, canonical_layers


class StudentChoice(StrEnum):
    """Named students; any other value of the `student` option is a base encoder."""

    TEACHER = "teacher"  # the teacher's own layers (all, first:k, every:n or a list) + its pooling
    STATIC = "static"  # a token table embedded by the teacher (model2vec-style) + mean pooling


def resolve_student(student: str, teacher: str | None) -> tuple[str, bool]:
    """The base encoder `student` names and whether it asks for a static student: ``teacher`` and ``static`` name
    the teacher (which must then be given)."""
    text = str(student).strip()
    if text.lower() not in {c.value for c in StudentChoice}:
        return text, False
    if not teacher:
        raise LeafkdError(f"student {text!r} is built from the teacher: give --teacher (a model folder or installed "
                          "name)")
    return str(teacher), StudentChoice(text.lower()) is StudentChoice.STATIC


@dataclass(frozen=True)
class StudentSpec:
    """A `student` value split into its base and what it says of the layers (or a static table's dimension)."""

    base: str
    layers: int | str | None = None
    static_dim: int | None = None


def split_student(student: str, layers: Any = None, static_dim: int | None = None) -> StudentSpec:
    """`student` as NAME[:LAYERS] (``teacher:first:6``, ``all-MiniLM-L6-v2:every:2``) or ``static[:DIM]``, merged
    with the separate `layers` / `static_dim` options (the same value twice is fine, two different ones an error).
    A value that is an existing path is a folder and never split."""
    text = str(student).strip()
    head, sep, rest = text.partition(":")
    spec = StudentSpec(text, canonical_layers(layers), static_dim)
    if not sep or Path(text).exists():
        return spec
    if head.lower() == StudentChoice.STATIC:
        if not rest.isdigit() or int(rest) < 1:
            raise LeafkdError(f"student {text!r}: static:DIM takes a table dimension >= 1, e.g. static:256")
        named = StudentSpec(head, spec.layers, int(rest))
    else:
        try:
            named = StudentSpec(head, canonical_layers(rest), static_dim)
        except LeafkdError:
            raise LeafkdError(f"student {text!r}: after NAME: comes {SPEC_HELP}") from None
    for option, given, said in (("student_layers", spec.layers, named.layers),
                                ("static_dim", spec.static_dim, named.static_dim)):
        if given is not None and said != given:
            raise LeafkdError(f"student {text!r} and {option} {given!r} disagree: give one of them")
    return named
