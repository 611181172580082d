"""POST /v1/embeddings over real HTTP on loopback, called by the openai Python client itself (its default base64
encoding and encoding_format float), with dimensions, input_type and the 4xx answers."""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
import retrieval_support as S
from test_server import _Running

openai = pytest.importorskip("openai", reason="needs the 'test' extra (openai)")

from leafkd.data.documents import Document  # noqa: E402
from leafkd.retrieval.build import embed_documents  # noqa: E402
from leafkd.retrieval.retriever import Retriever  # noqa: E402
from leafkd.server.app import create_app  # noqa: E402
from leafkd.server.limits import Limits  # noqa: E402
from leafkd.server.teacher import DocumentEncoder  # noqa: E402
from leafkd.vectors import normalize  # noqa: E402

KEY = "oa-key-789"
TEXTS = ["pressure distribution on a cone", "what is the heat transfer rate at the stagnation point?"]


@pytest.fixture(scope="module")
def retriever():
    return Retriever.load(S.cranfield_index(), student=S.student_dir())


@pytest.fixture(scope="module")
def url(retriever):
    teacher = DocumentEncoder.load(retriever.index, S.teacher_dir(), device="cpu")
    running = _Running(create_app(retriever, api_key=KEY, limits=Limits(max_queries=4), teacher=teacher))
    yield running.url
    running.stop()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def vectors(resp) -> np.ndarray:
    assert [d.index for d in resp.data] == list(range(len(resp.data)))
    return np.array([d.embedding for d in resp.data], dtype=np.float32)


def test_openai_client_gets_the_query_encoders_embeddings(client, retriever):
    want = retriever.embed(TEXTS)
    resp = client.embeddings.create(input=TEXTS, model="leafkd-student")  # the client asks for base64
    assert resp.model == retriever.encoder.name and resp.usage.prompt_tokens > 0
    assert np.allclose(vectors(resp), want, atol=1e-6)
    one = client.embeddings.create(input=TEXTS[0], model="m", encoding_format="float")
    assert np.allclose(vectors(one)[0], want[0], atol=1e-6)
    cut = client.embeddings.create(input=TEXTS, model="m", dimensions=16)
    assert np.allclose(vectors(cut), normalize(want[:, :16]), atol=1e-6)
    assert np.allclose(np.linalg.norm(vectors(cut), axis=1), 1, atol=1e-5)


def test_documents_are_embedded_by_the_teacher(client):
    resp = client.embeddings.create(input=TEXTS, model="m", extra_body={"input_type": "document"})
    want = embed_documents(S.teacher_model(), [Document("", "", t) for t in TEXTS])
    assert np.allclose(vectors(resp), want, atol=1e-5)
    assert resp.model.endswith(S.teacher_dir().name)


def test_base64_is_little_endian_float32(url, retriever):
    # the body openai-python sends when no encoding_format is given (recorded), replayed byte for byte
    body = json.dumps({"input": TEXTS, "model": "text-embedding-3-small", "encoding_format": "base64"})
    r = httpx.post(url + "/v1/embeddings", content=body, headers={"Authorization": f"Bearer {KEY}",
                                                                   "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "list" and out["data"][0]["object"] == "embedding"
    got = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in out["data"]])
    assert np.allclose(got, retriever.embed(TEXTS), atol=1e-6)
    assert out["usage"]["prompt_tokens"] == out["usage"]["total_tokens"] > 0


def test_bad_requests(url, client, retriever):
    def err(payload, status=422):
        r = httpx.post(url + "/v1/embeddings", json=payload, headers={"X-API-Key": KEY})
        assert r.status_code == status, r.text
        assert "\n" not in r.json()["error"]
        return r.json()["error"]

    assert "token arrays" in err({"input": [[1, 2, 3]], "model": "m"})
    assert "empty" in err({"input": ["  "], "model": "m"})
    assert "input" in err({"input": [], "model": "m"})
    assert "over this server's limit of 4" in err({"input": ["a"] * 5, "model": "m"})
    assert "dimensions" in err({"input": "a", "dimensions": 0})
    assert "dimensions" in err({"input": "a", "dimensions": retriever.index.dim + 1})
    assert "encoding_format" in err({"input": "a", "encoding_format": "int8"})
    assert "input_type" in err({"input": "a", "input_type": "passage"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).embeddings.create(input="a", model="m")


def test_documents_need_a_teacher(retriever):
    running = _Running(create_app(retriever, warmup=False))
    try:
        r = httpx.post(running.url + "/v1/embeddings", json={"input": "a", "input_type": "document"})
        assert r.status_code == 403 and "no teacher" in r.json()["error"]
        assert httpx.post(running.url + "/v1/embeddings", json={"input": "a"}).status_code == 200
    finally:
        running.stop()
