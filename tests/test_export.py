"""The asymmetric pair exported as one Router model: queries go to the student, documents to the teacher."""

import json

import numpy as np
import pytest

from leafkd.errors import LeafkdError
from leafkd.models import fingerprint
from leafkd.student.build import build_student
from leafkd.student.export import export_pair


def test_export_routes_queries_to_student(tmp_path, minilm_path):
    from sentence_transformers import SentenceTransformer

    student = build_student(minilm_path, 384, layers=1, normalize=True)
    student.save(str(tmp_path / "student"))
    (tmp_path / "student" / "leafkd.json").write_text(json.dumps(
        {"teacher": str(minilm_path), "teacher_fingerprint": fingerprint(minilm_path)}))
    out = export_pair(tmp_path / "student", None, tmp_path / "pair")
    pair = SentenceTransformer(str(out), device="cpu")
    teacher = SentenceTransformer(str(minilm_path), device="cpu")
    texts = ["how do airfoils stall", "a sentence about boundary layers"]
    assert np.allclose(pair.encode_query(texts), student.encode(texts), atol=1e-5)
    assert np.allclose(pair.encode_document(texts), teacher.encode(texts), atol=1e-5)
    assert not np.allclose(pair.encode_query(texts), pair.encode_document(texts), atol=1e-3)

    (tmp_path / "student" / "leafkd.json").write_text(json.dumps({"teacher": str(minilm_path), "teacher_fingerprint": "0" * 64}))
    with pytest.raises(LeafkdError, match="not the student's teacher"):
        export_pair(tmp_path / "student", None, tmp_path / "pair2")
    assert not (tmp_path / "pair2").exists()
