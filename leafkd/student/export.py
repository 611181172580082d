"""The asymmetric pair as one sentence-transformers model (Router.for_query_document).

The result loads with plain `SentenceTransformer(path)`; `encode_query` runs the student, `encode_document` (and
plain `encode`) the teacher, so tools that know sentence-transformers' query/document routing (mteb included) use
the pair as intended.
"""

from __future__ import annotations

from pathlib import Path

from leafkd import atomic
from leafkd.errors import LeafkdError
from leafkd.models import fingerprint, load_model, resolve_model
from leafkd.modules import Router
from leafkd.student.info import read_student_info, write_student_info


def export_pair(student: str | Path, teacher: str | Path | None, out: str | Path) -> Path:
    from sentence_transformers import SentenceTransformer

    student_path = resolve_model(student)
    info = read_student_info(student_path)
    if not info:
        raise LeafkdError(f"{student_path}: not a leafkd student (no leafkd.json)")
    teacher_path = resolve_model(teacher or info.get("teacher") or "")
    fp = fingerprint(teacher_path)
    if fp != info.get("teacher_fingerprint"):
        raise LeafkdError(f"{teacher_path}: fingerprint {fp[:12]} is not the student's teacher "
                          f"({str(info.get('teacher_fingerprint'))[:12]})")
    query_model, doc_model = load_model(student_path, device="cpu"), load_model(teacher_path, device="cpu")
    # sentence-transformers types its modules two ways (torch's Module and its own); they are the same objects.
    router = Router.for_query_document(query_modules=list(query_model),  # type: ignore[arg-type]
                                       document_modules=list(doc_model))  # type: ignore[arg-type]
    pair = SentenceTransformer(modules=[router], device="cpu")
    out = Path(out)
    with atomic.atomic_dir(out) as tmp:
        pair.save(str(tmp))
        write_student_info(tmp, {**info, "export": "router-query-document", "student": str(student_path),
                                 "teacher": str(teacher_path)})
    return out


