"""The student: its construction (transformer layers or a static table), the ridge warm start, its ``leafkd.json``
record, the pair export and the ONNX export (`leafkd.student.onnx`, extra ``onnx``).

Its names load on first use (PEP 562), so importing the subpackage (as the CLI's parser does, for the student
spec's parsing in `leafkd.student.choice`) loads no torch or sentence-transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from leafkd.lazy import lazy_names

_NAMES = {
    "StudentKind": "leafkd.student.build", "build_student": "leafkd.student.build",
    "projection_layer": "leafkd.student.build", "truncate_layers": "leafkd.student.build",
    "StudentChoice": "leafkd.student.choice", "resolve_student": "leafkd.student.choice",
    "export_pair": "leafkd.student.export",
    "read_student_info": "leafkd.student.info", "write_student_info": "leafkd.student.info",
    "canonical_layers": "leafkd.student.layers", "layer_indices": "leafkd.student.layers",
    "OnnxExport": "leafkd.student.onnx", "export_onnx": "leafkd.student.onnx",
    "StaticInit": "leafkd.student.static", "StaticStudent": "leafkd.student.static",
    "as_static_student": "leafkd.student.static", "build_static_student": "leafkd.student.static",
    "is_static": "leafkd.student.static", "load_student": "leafkd.student.static",
    "warm_start": "leafkd.student.warm_start",
}

if TYPE_CHECKING:
    from leafkd.student.build import StudentKind, build_student, projection_layer, truncate_layers
    from leafkd.student.choice import StudentChoice, resolve_student
    from leafkd.student.export import export_pair
    from leafkd.student.info import read_student_info, write_student_info
    from leafkd.student.layers import canonical_layers, layer_indices
    from leafkd.student.onnx import OnnxExport, export_onnx
    from leafkd.student.static import (
        StaticInit,
        StaticStudent,
        as_static_student,
        build_static_student,
        is_static,
        load_student,
    )
    from leafkd.student.warm_start import warm_start

__getattr__ = lazy_names(__name__, globals(), _NAMES)

__all__ = ["OnnxExport", "StaticInit", "StaticStudent", "StudentChoice", "StudentKind", "as_static_student",
           "build_static_student", "build_student", "canonical_layers", "export_onnx", "export_pair", "is_static",
           "layer_indices", "load_student", "projection_layer", "read_student_info", "resolve_student",
           "truncate_layers", "warm_start", "write_student_info"]
