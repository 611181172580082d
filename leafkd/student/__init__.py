"""The student: its construction, the ridge warm start, its ``leafkd.json`` record and the pair export."""

from leafkd.student.build import build_student, projection_layer, truncate_layers
from leafkd.student.export import export_pair
from leafkd.student.info import read_student_info, write_student_info
from leafkd.student.warm_start import warm_start

__all__ = ["build_student", "export_pair", "projection_layer", "read_student_info", "truncate_layers", "warm_start",
           "write_student_info"]
