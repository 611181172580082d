"""The student: its construction (transformer layers or a static table), the ridge warm start, its ``leafkd.json``
record, the pair export and the ONNX export (`leafkd.student.onnx`, extra ``onnx``)."""

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

__all__ = ["OnnxExport", "StaticInit", "StaticStudent", "StudentChoice", "StudentKind", "as_static_student",
           "build_static_student", "build_student", "canonical_layers", "export_onnx", "export_pair", "is_static",
           "layer_indices", "load_student", "projection_layer", "read_student_info", "resolve_student",
           "truncate_layers", "warm_start", "write_student_info"]
