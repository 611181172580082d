"""`leafkd export`: the asymmetric pair as one sentence-transformers model (Router.for_query_document).

The result loads with plain `SentenceTransformer(path)`; `encode_query` runs the student, `encode_document` (and
plain `encode`) the teacher, so tools that know sentence-transformers' query/document routing (mteb included) use
the pair as intended.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def export_pair(student: str | Path, teacher: str | Path | None, out: str | Path) -> Path:
    from sentence_transformers import SentenceTransformer

    from leafkd import atomic
    from leafkd.errors import LeafkdError
    from leafkd.models import fingerprint, load_model, resolve_model

    try:
        from sentence_transformers.sentence_transformer.modules import Router
    except ImportError:  # pragma: no cover - older sentence-transformers
        from sentence_transformers.models import Router

    student_path = resolve_model(student)
    info_path = student_path / "leafkd.json"
    if not info_path.exists():
        raise LeafkdError(f"{student_path}: not a leafkd student (no leafkd.json)")
    info = json.loads(info_path.read_text())
    teacher_path = resolve_model(teacher or info.get("teacher") or "")
    fp = fingerprint(teacher_path)
    if fp != info.get("teacher_fingerprint"):
        raise LeafkdError(f"{teacher_path}: fingerprint {fp[:12]} is not the student's teacher "
                          f"({str(info.get('teacher_fingerprint'))[:12]})")
    query_model, doc_model = load_model(student_path, device="cpu"), load_model(teacher_path, device="cpu")
    router = Router.for_query_document(query_modules=list(query_model), document_modules=list(doc_model))
    pair = SentenceTransformer(modules=[router], device="cpu")
    out = Path(out)
    with atomic.atomic_dir(out) as tmp:
        pair.save(str(tmp))
        atomic.write_json(tmp / "leafkd.json", {**info, "export": "router-query-document",
                                                "student": str(student_path), "teacher": str(teacher_path)})
    return out


def _run(args: argparse.Namespace) -> int:
    out = export_pair(args.student, args.teacher, args.out)
    print(f"wrote {out}: encode_query -> student, encode_document -> teacher")
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="save student + teacher as one Router.for_query_document model")
    p.add_argument("--student", required=True, help="trained student folder (with leafkd.json)")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the one in leafkd.json)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_run)
