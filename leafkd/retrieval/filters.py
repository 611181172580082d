"""Metadata filters: equality, ``in`` and ranges on fields of the documents' JSON ``metadata``.

A filter is a JSON object; every condition must hold::

    {"lang": "de", "year": {"gte": 2000, "lt": 2010}, "tag": {"in": ["a", "b"]}, "source.kind": {"ne": "web"}}

Keys are field names (dots reach into nested objects: ``source.kind`` is ``metadata["source"]["kind"]``); a
scalar value means equality, an object maps operators (`Op`) to values. Values are strings, numbers or booleans;
ranges take numbers or strings (strings compare by code point, so ISO dates order correctly). A document whose
field is missing matches no condition on that field (``ne`` included), and values only match values of the same
JSON type (``1`` does not match ``true`` or ``"1"``).

One `Filter` compiles to SQL over the SQLite document store (`Filter.to_sql`) and to a Milvus boolean
expression (`Filter.to_milvus`), so both backends select the same documents.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from leafkd.errors import LeafkdError

Scalar = str | int | float | bool

FIELD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,7}$")
MAX_CONDITIONS = 64
MAX_IN_VALUES = 1024


class FilterError(LeafkdError):
    """A filter that is not valid (HTTP 422)."""


class Op(StrEnum):
    """A comparison on one metadata field."""

    EQ = "eq"
    NE = "ne"
    GT = "gt"
    GTE = "gte"
    LT = "lt"
    LTE = "lte"
    IN = "in"


SQL_OPS = {Op.EQ: "=", Op.NE: "!=", Op.GT: ">", Op.GTE: ">=", Op.LT: "<", Op.LTE: "<="}
MILVUS_OPS = {Op.EQ: "==", Op.NE: "!=", Op.GT: ">", Op.GTE: ">=", Op.LT: "<", Op.LTE: "<="}
RANGE_OPS = (Op.GT, Op.GTE, Op.LT, Op.LTE)


def json_kind(value: Scalar) -> str:
    """The JSON type of a filter value: ``bool``, ``number`` or ``text``."""
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, (int, float)) else "text"


def check_value(field: str, op: Op, value: Any) -> Scalar:
    if isinstance(value, bool) or isinstance(value, str):
        ok = not (isinstance(value, bool) and op in RANGE_OPS)
    elif isinstance(value, (int, float)):
        ok = value == value and abs(value) != float("inf")  # no NaN or infinity
    else:
        ok = False
    if not ok:
        allowed = "a number or a string" if op in RANGE_OPS else "a string, a number or a boolean"
        raise FilterError(f"filter on {field!r}: {op.value} needs {allowed}, got {json.dumps(value)[:60]}")
    return value


@dataclass(frozen=True)
class Condition:
    """``metadata[field] <op> value`` (for `Op.IN`, ``value`` is a tuple of scalars)."""

    field: str
    op: Op
    value: Scalar | tuple[Scalar, ...]

    @property
    def path(self) -> str:
        """The SQLite JSON path of the field (`FIELD_RE` makes it safe to inline)."""
        return "$." + self.field

    def scalars(self) -> tuple[Scalar, ...]:
        return self.value if isinstance(self.value, tuple) else (self.value,)


def parse_condition(field: Any, spec: Any) -> list[Condition]:
    if not isinstance(field, str) or not FIELD_RE.match(field):
        raise FilterError(f"filter field {str(field)[:60]!r}: use names of letters, digits and '_', "
                          "joined by '.' for nested fields")
    if not isinstance(spec, Mapping):
        return [Condition(field, Op.EQ, check_value(field, Op.EQ, spec))]
    if not spec:
        raise FilterError(f"filter on {field!r}: an empty object (give operators: {', '.join(o.value for o in Op)})")
    out = []
    for name, value in spec.items():
        try:
            op = Op(name)
        except ValueError:
            raise FilterError(f"filter on {field!r}: unknown operator {str(name)[:30]!r} "
                              f"(use {', '.join(o.value for o in Op)})") from None
        if op is Op.IN:
            if not isinstance(value, list) or not value or len(value) > MAX_IN_VALUES:
                raise FilterError(f"filter on {field!r}: 'in' needs a list of 1 to {MAX_IN_VALUES} values")
            out.append(Condition(field, op, tuple(check_value(field, Op.EQ, v) for v in value)))
        else:
            out.append(Condition(field, op, check_value(field, op, value)))
    return out


@dataclass(frozen=True)
class Filter:
    """A conjunction of conditions on metadata fields (see the module's docstring)."""

    conditions: tuple[Condition, ...]

    @classmethod
    def parse(cls, spec: Filter | Mapping[str, Any] | None) -> Filter | None:
        """A filter from its JSON form (``None`` or ``{}``: no filter); bad input is a one-line `LeafkdError`."""
        if spec is None or isinstance(spec, Filter):
            return spec
        if not isinstance(spec, Mapping):
            raise FilterError(f"a filter is a JSON object of field conditions, got {type(spec).__name__}")
        conditions = [c for field, value in spec.items() for c in parse_condition(field, value)]
        if len(conditions) > MAX_CONDITIONS:
            raise FilterError(f"a filter has at most {MAX_CONDITIONS} conditions, got {len(conditions)}")
        return cls(tuple(conditions)) if conditions else None

    # -- SQLite
    def to_sql(self, column: str = "metadata") -> tuple[str, list[Scalar]]:
        """A WHERE clause over the store's ``metadata`` column and its parameters."""
        parts: list[str] = []
        params: list[Scalar] = []
        for c in self.conditions:
            if c.op is Op.IN:
                ors = [sql_compare(column, c.path, Op.EQ, v, params) for v in c.scalars()]
                parts.append("(" + " OR ".join(ors) + ")")
            else:
                parts.append(sql_compare(column, c.path, c.op, c.scalars()[0], params))
        return " AND ".join(parts) or "1", params

    # -- Milvus
    def to_milvus(self, field: str = "metadata") -> str:
        """The same selection as a Milvus boolean expression (``in`` is written as ``or``: Milvus Lite 3.x rejects
        ``in`` on JSON fields)."""
        parts = []
        for c in self.conditions:
            ref = field + "".join(f'["{p}"]' for p in c.field.split("."))
            if c.op is Op.IN:
                parts.append("(" + " or ".join(f"{ref} == {milvus_literal(v)}" for v in c.scalars()) + ")")
            else:
                parts.append(f"{ref} {MILVUS_OPS[c.op]} {milvus_literal(c.scalars()[0])}")
        return " and ".join(parts)

    # -- Python (for documents already in memory)
    def matches(self, metadata: Mapping[str, Any] | None) -> bool:
        """Whether a metadata object satisfies every condition (the rules of `to_sql`)."""
        return all(condition_holds(c, metadata) for c in self.conditions)


def sql_compare(column: str, path: str, op: Op, value: Scalar, params: list[Scalar]) -> str:
    """``json_extract(column, path) <op> ?`` restricted to the value's JSON type (SQLite maps true to 1)."""
    extract = f"json_extract({column}, '{path}')"
    jtype = f"json_type({column}, '{path}')"
    kind = json_kind(value)
    if kind == "bool":
        same_type = f"{jtype} IN ('true', 'false')"
        value = int(value)
    elif kind == "number":
        same_type = f"{jtype} IN ('integer', 'real')"
    else:
        same_type = f"{jtype} = 'text'"
    params.append(value)
    if op is Op.NE:  # present, and not an equal value of the same type
        return f"({jtype} IS NOT NULL AND {jtype} != 'null' AND NOT ({same_type} AND {extract} = ?))"
    return f"({same_type} AND {extract} {SQL_OPS[op]} ?)"


def milvus_literal(value: Scalar) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def lookup(metadata: Mapping[str, Any] | None, field: str) -> tuple[bool, Any]:
    node: Any = metadata
    for part in field.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return node is not None, node


def same_kind(a: Any, b: Scalar) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, (int, float)):
        return isinstance(b, (int, float))
    return isinstance(a, str) and isinstance(b, str)


def condition_holds(c: Condition, metadata: Mapping[str, Any] | None) -> bool:
    present, value = lookup(metadata, c.field)
    if not present:
        return False
    if c.op is Op.IN:
        return any(same_kind(value, v) and value == v for v in c.scalars())
    want = c.scalars()[0]
    if c.op is Op.NE:
        return not (same_kind(value, want) and value == want)
    if not same_kind(value, want):
        return False
    return {Op.EQ: value == want, Op.GT: value > want, Op.GTE: value >= want, Op.LT: value < want,
            Op.LTE: value <= want}[c.op]
