"""The HTTP server, over a real loopback socket: correct top-k, concurrency, bad input, auth, OpenAPI fuzzing."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import retrieval_support as S

from leafkd.server.app import create_app
from leafkd.server.limits import Limits

KEY = "test-key-123"
H = {"X-API-Key": KEY}
LIMITS = Limits(max_query_chars=300, max_queries=16, max_top_k=50, max_body_bytes=64 * 1024)


class _Running:
    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def retriever():
    from leafkd.retrieval.retriever import Retriever

    return Retriever.load(S.cranfield_index(), student=S.student_dir())


@pytest.fixture(scope="module")
def server(retriever):
    running = _Running(create_app(retriever, api_key=KEY, limits=LIMITS, max_wait_ms=2.0))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def test_search_matches_brute_force(client, retriever):
    rs = S.cranfield()
    qids = ["1", "5", "15", "17"]
    texts = [rs.queries[q] for q in qids]
    want_ids, want_scores = S.brute_force(retriever.embed(texts), 10)
    for q, wi, ws in zip(texts, want_ids, want_scores):
        r = client.post("/search", json={"query": q, "top_k": 10}, headers=H)
        assert r.status_code == 200, r.text
        body = r.json()
        hits = body["results"][0]["hits"]
        assert body["mode"] == "asymmetric" and body["results"][0]["query"] == q
        assert S.same_ranking([h["id"] for h in hits], [h["score"] for h in hits], wi, ws, tol=2e-4)
        assert hits[0]["text"] == rs.corpus[hits[0]["id"]]["text"]
    r = client.post("/search", json={"queries": texts, "top_k": 3, "include_text": False}, headers=H)
    assert r.status_code == 200
    res = r.json()["results"]
    assert [[h["id"] for h in x["hits"]] for x in res] == [w[:3] for w in want_ids]
    assert "text" not in res[0]["hits"][0]
    default_k = client.post("/search", json={"query": rs.queries["1"]}, headers=H).json()["results"][0]["hits"]
    assert {"13", "51", "184"} & {h["id"] for h in default_k}


def test_embed_health_stats(client, retriever):
    r = client.post("/embed", json={"texts": ["supersonic flow", "heat transfer"]}, headers=H)
    assert r.status_code == 200
    vecs = np.array(r.json()["embeddings"])
    assert vecs.shape == (2, 384) and r.json()["dim"] == 384
    np.testing.assert_allclose(vecs, retriever.embed(["supersonic flow", "heat transfer"]), atol=1e-5)
    h = client.get("/health")  # no key needed
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["documents"] == 1398
    s = client.get("/stats", headers=H).json()
    assert s["index"]["documents"] == 1398 and s["index"]["device"] == "cpu" and s["index"]["bytes"] > 0
    assert s["encoder"]["device"] == "cpu" and s["requests"]["/search"] >= 1
    assert s["latency_ms"]["/search"]["p50"] > 0
    schema = client.get("/openapi.json").json()
    assert {"/search", "/embed", "/health", "/stats"} <= set(schema["paths"])


def test_200_concurrent_requests(server, client):
    rs = S.cranfield()
    queries = list(rs.queries.values())[:50]
    before = client.get("/stats", headers=H).json()["batches"]["count"]

    async def main():
        limit = asyncio.Semaphore(64)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            async def one(i):
                async with limit:
                    return await c.post("/search", json={"query": queries[i % 50], "top_k": 5}, headers=H)
            return await asyncio.gather(*(one(i) for i in range(200)))

    t0 = time.time()
    responses = asyncio.run(asyncio.wait_for(main(), 120))
    assert time.time() - t0 < 120
    assert [r.status_code for r in responses] == [200] * 200
    # every answer is the answer to its own query
    first = {}
    for i, r in enumerate(responses):
        ids = [h["id"] for h in r.json()["results"][0]["hits"]]
        assert r.json()["results"][0]["query"] == queries[i % 50]
        first.setdefault(i % 50, ids)
        assert ids == first[i % 50]
    stats = client.get("/stats", headers=H).json()
    assert stats["batches"]["count"] - before < 200  # requests were gathered into micro-batches
    assert stats["batches"]["max_queries"] > 1


BAD = [
    ({"query": ""}, 422, "query"),
    ({"query": "   \t\n "}, 422, "empty or only whitespace"),
    ({"query": "x" * 301}, 422, "at most 300"),
    ({"query": "ok", "top_k": 0}, 422, "top_k"),
    ({"query": "ok", "top_k": -3}, 422, "top_k"),
    ({"query": "ok", "top_k": 10**12}, 422, "top_k"),
    ({"query": "ok", "top_k": "5"}, 422, "top_k"),
    ({"query": "ok", "top_k": 2.5}, 422, "top_k"),
    ({"query": 5}, 422, "query"),
    ({"query": ["a"]}, 422, "query"),
    ({"queries": "not a list"}, 422, "queries"),
    ({"queries": [1, 2]}, 422, "queries"),
    ({"queries": []}, 422, "queries"),
    ({"queries": ["a"] * 17}, 422, "queries"),
    ({"queries": ["fine", " "]}, 422, "empty or only whitespace"),
    ({"query": "a", "queries": ["b"]}, 422, "exactly one"),
    ({}, 422, "exactly one"),
    ({"query": "a", "extra": 1}, 422, "extra"),
    ([1, 2, 3], 422, "body"),
    ("just a string", 422, "body"),
    (None, 422, ""),
]


@pytest.mark.parametrize("body,status,needle", BAD)
def test_bad_search_input(client, body, status, needle):
    r = client.post("/search", json=body, headers=H)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_bad_requests_of_other_kinds(client):
    bad_json = client.post("/search", content=b'{"query": "a",', headers={**H, "content-type": "application/json"})
    assert bad_json.status_code == 422 and "JSON" in bad_json.json()["error"]
    no_ct = client.post("/search", content=b"query=a", headers=H)
    assert 400 <= no_ct.status_code < 500
    huge = client.post("/search", content=b'{"query": "' + b"a" * 70000 + b'"}',
                       headers={**H, "content-type": "application/json"})
    assert huge.status_code == 413 and "error" in huge.json()
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
        r = client.post("/search", json={"query": "ok"}, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]
    assert client.get("/stats").status_code == 401
    assert client.post("/embed", json={"text": "ok"}).status_code == 401
    assert client.get("/nowhere", headers=H).status_code == 404
    assert client.get("/search", headers=H).status_code == 405
    assert client.post("/embed", json={"texts": [""]}, headers=H).status_code == 422
    lone = client.post("/search", content=b'{"query": "\\ud800"}', headers={**H, "content-type": "application/json"})
    assert lone.status_code == 422
    # the server survived all of it
    assert client.post("/search", json={"query": "wing"}, headers=H).status_code == 200
    s = client.get("/stats", headers=H).json()
    assert not any(k.startswith("5") for k in s["status_codes"])


def test_openapi_fuzz(server):
    """Schemathesis, positive and negative cases from the app's own schema: never a 5xx, never a hang."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures = []
    count = [0]

    for op_result in schema.get_all_operations():
        operation = op_result.ok()

        strategy = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                             operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def fuzz(case):
            count[0] += 1
            for headers in (H, {}):
                try:
                    case.call_and_validate(headers=headers, checks=[not_a_server_error], timeout=30)
                except Exception as e:  # collect rather than stop at the first
                    failures.append(f"{operation.label}: {type(e).__name__}: {str(e)[:300]}")  # noqa: B023 (runs now)

        fuzz()
    assert count[0] >= 40
    assert not failures, "\n".join(failures[:5])


def wait_until_healthy(proc: subprocess.Popen, port: int, seconds: float = 180) -> str:
    """The URL of a `leafkd serve` process once its /health answers 200 (it must not exit before)."""
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + seconds
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        assert time.time() < deadline, "server did not come up"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


def test_cli_serve_and_graceful_shutdown(tmp_path):
    from leafkd.cli import main

    # bad setups are one-line errors before anything listens
    free = ["--port", "0"]
    assert main(["serve", "--index", str(S.cranfield_index()), "--student", str(S.foreign_student_dir()), *free]) == 2
    assert main(["serve", "--index", str(tmp_path / "missing"), "--student", str(S.student_dir()), *free]) == 2
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(S.cranfield_index(), broken)
    next(broken.glob("keys.*.npy")).unlink()  # issue 20 layout: base index + keys + docs.sqlite
    assert main(["serve", "--index", str(broken), "--student", str(S.student_dir()), *free]) == 2
    assert main(["serve", "--index", str(S.cranfield_index()), "--student", str(S.student_dir()), *free,
                 "--api-key-env", "LEAFKD_TEST_UNSET_VAR"]) == 2

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LEAFKD_TEST_KEY": "k1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "leafkd", "serve", "--index", str(S.cranfield_index()),
                             "--student", str(S.student_dir()), "--port", str(port),
                             "--api-key-env", "LEAFKD_TEST_KEY"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = wait_until_healthy(proc, port)
        r = httpx.post(url + "/search", json={"query": "laminar boundary layer", "top_k": 2},
                       headers={"X-API-Key": "k1"}, timeout=30)
        assert r.status_code == 200 and len(r.json()["results"][0]["hits"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert "mode asymmetric" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_missing_extras_are_one_line_errors(tmp_path):
    """Without FAISS (or FastAPI) `leafkd index` / `leafkd serve` print one `error:` line naming the extra to
    install, and the parser (`leafkd --help`) still builds."""
    script = ("import sys\n"
              "sys.modules[sys.argv[1]] = None  # as if it were not installed\n"
              "from leafkd.cli import build_parser, main\n"
              "build_parser().format_help()\n"
              "sys.exit(main(sys.argv[2:]))\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cases = [("faiss", ["index", "info", "--name", "x", "--indexes-dir", str(tmp_path)],
              ["'leafkd[cpu]'", "'leafkd[gpu]'"]),
             ("fastapi", ["serve", "--index", str(tmp_path / "x")], ["'leafkd[server]'"])]
    for module, argv, extras in cases:
        r = subprocess.run([sys.executable, "-c", script, module, *argv], env=env, capture_output=True, text=True,
                           timeout=300)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"needs {module}" in errors[0] and all(e in errors[0] for e in extras), errors[0]
