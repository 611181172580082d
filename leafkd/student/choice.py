"""The `student` option's named choices: besides a base encoder's folder or installed name, ``teacher`` (a student
cut from the teacher's own layers, with ``student_layers``) and ``static`` (a static-embedding student whose table
starts from the teacher)."""

from __future__ import annotations

from enum import StrEnum

from leafkd.errors import LeafkdError


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
