"""ONNX export of students (issue 21): the graph matches torch, the ONNX query encoder matches the torch one, and
`leafkd serve --query-backend onnx` answers a real HTTP /search."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import retrieval_support as S

from leafkd.cli import main

pytest.importorskip("onnxruntime")

TEXTS = ["laminar boundary layer on a flat plate", "who wrote invisible man",
         "what similarity laws must be obeyed when constructing aeroelastic models of heated high speed aircraft", "x"]


@pytest.fixture(scope="module")
def minilm2(tmp_path_factory, minilm_path):
    """all-MiniLM-L6-v2 cut to its first 2 layers + a projection to 768 + Normalize, exported with int8."""
    from leafkd.student.build import build_student
    from leafkd.student.onnx import export_onnx

    folder = tmp_path_factory.mktemp("onnx") / "minilm2"
    build_student(minilm_path, 768, layers="first:2", normalize=True).save(str(folder))
    return folder, export_onnx(folder, int8=True)


def test_onnx_export_of_minilm_cut_to_two_layers_matches_torch(minilm2):
    folder, result = minilm2
    assert result.folder == folder / "leafkd-onnx" and result.dim == 768
    assert result.cosine_min["fp32"] >= 0.999 and result.cosine_min["int8"] >= 0.98
    assert (result.folder / "model.onnx").is_file() and (result.folder / "model_int8.onnx").is_file()
    assert (result.folder / "model_int8.onnx").stat().st_size < 0.5 * (result.folder / "model.onnx").stat().st_size


def test_onnx_query_encoder_matches_the_torch_query_encoder(minilm2):
    from leafkd.retrieval.onnx_encoder import OnnxQueryEncoder
    from leafkd.retrieval.query_encoder import QueryEncoder
    from leafkd.student.static import load_student

    folder, _ = minilm2
    want = QueryEncoder(load_student(folder, device="cpu"), device="cpu", prompt="query: ")(TEXTS)
    fp32 = OnnxQueryEncoder(folder, int8=False, prompt="query: ")
    assert fp32.dim == 768 and fp32.dtype == "float32"
    for got in (fp32(TEXTS), np.concatenate([fp32([t]) for t in TEXTS])):  # padded groups and single queries
        assert got.shape == (4, 768) and np.min(np.sum(got * want, axis=1)) >= 0.999
    int8 = OnnxQueryEncoder(folder, threads=1, prompt="query: ")  # the int8 graph, when exported
    batch = int8(TEXTS)
    assert int8.dtype == "int8" and np.min(np.sum(batch * want, axis=1)) >= 0.98
    assert np.array_equal(batch[3], int8([TEXTS[3]])[0])  # a text's vector does not depend on its batch
    assert fp32([]).shape == (0, 768)


def test_static_student_exports_too(tmp_path, minilm_path):
    from leafkd.student.build import build_student
    from leafkd.student.onnx import export_onnx

    folder = tmp_path / "static"
    student = build_student(minilm_path, 384, kind="static", static_init="embeddings", static_dim=32, normalize=True)
    student.save(str(folder))
    result = export_onnx(folder, tmp_path / "out")
    assert result.cosine_min["fp32"] >= 0.999 and "int8" not in result.files


def test_export_refuses_what_it_must_not_touch(tmp_path, minilm2, capsys):
    folder, _ = minilm2
    assert main(["export", "--student", str(folder), "--int8"]) == 2
    assert main(["export", "--student", str(folder)]) == 2  # the pair needs --out
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", "--student", str(folder), "--onnx", "--out", str(other)]) == 2
    assert (other / "keep.txt").read_text() == "mine" and len(list(other.iterdir())) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3


def test_serve_backend_onnx_answers_http_search_as_torch_does():
    from leafkd.retrieval.retriever import Retriever

    student = S.student_dir()
    assert main(["export", "--student", str(student), "--onnx"]) == 0
    torch_hits = Retriever.load(S.cranfield_index(), student=student).search(["laminar boundary layer"], 5)[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "leafkd", "serve", "--index", str(S.cranfield_index()),
                             "--student", str(student), "--port", str(port), "--query-backend", "onnx", "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        from test_server import wait_until_healthy

        url = wait_until_healthy(proc, port)
        r = httpx.post(url + "/search", json={"query": "laminar boundary layer", "top_k": 5}, timeout=30)
        assert r.status_code == 200, r.text
        hits = r.json()["results"][0]["hits"]
        assert [h["id"] for h in hits] == [h.id for h in torch_hits]
        assert np.allclose([h["score"] for h in hits], [h.score for h in torch_hits], atol=1e-3)
    finally:
        proc.terminate()
        proc.wait(60)
    assert "(onnx float32)" in proc.stderr.read()
