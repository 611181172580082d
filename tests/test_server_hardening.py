"""The search server under hostile use, over real loopback HTTP and real `leafkd serve` processes.

Streaming bodies past the limit, answers too large to build, requests that used to stall every other client,
unknown paths, control-character queries, slash redirects, and authentication that must be on whenever a key is
set and may be off only on loopback (or with --no-auth).
"""

from __future__ import annotations

import asyncio
import json
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
from test_server import _Running, wait_until_healthy
from test_server import retriever  # noqa: F401 (registers the fixture `retriever` here)

from leafkd.server.app import create_app
from leafkd.server.limits import Limits

KEY = "hardening-key-42"
H = {"X-API-Key": KEY}
STRICT = Limits(max_query_chars=300, max_queries=64, max_top_k=1000, max_hits=2000, max_response_bytes=256 << 10,
                max_body_bytes=64 << 10)
ROOMY = Limits(max_query_chars=300, max_queries=64, max_top_k=1398, max_hits=100_000, max_response_bytes=256 << 20)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def strict(retriever):
    """A server with tight limits, and a client of it."""
    running = _Running(create_app(retriever, api_key=KEY, limits=STRICT))
    with httpx.Client(base_url=running.url, timeout=60) as c:
        running.client = c
        yield running
    running.stop()


@pytest.fixture(scope="module")
def client(strict):
    return strict.client


def test_chunked_bodies_are_counted(strict, client):
    def chunks(total: int, size: int = 8192):
        yield b'{"query": "'
        for _ in range(total // size):
            yield b"a" * size
        yield b'"}'

    big = client.post("/search", content=chunks(200 << 10), headers={**H, "content-type": "application/json"})
    assert big.status_code == 413 and "body" in big.json()["error"]
    assert big.headers.get("connection") == "close"
    small = client.post("/search", content=iter([b'{"query": "laminar flow",', b' "top_k": 3}']),
                        headers={**H, "content-type": "application/json"})
    assert small.status_code == 200 and len(small.json()["results"][0]["hits"]) == 3


def test_a_raw_chunked_stream_is_cut_off_early(strict):
    host, port = strict.url.removeprefix("http://").split(":")
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /search HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Type: application/json\r\n"
                  "Transfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"%x\r\n%s\r\n" % (16384, b"a" * 16384)
        answer = b""
        try:
            while sent < (64 << 20) and not answer:
                s.sendall(chunk)
                sent += 16384
                s.setblocking(False)
                try:
                    answer = s.recv(4096)
                except BlockingIOError:
                    pass
                s.setblocking(True)
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(30)
        while b"\r\n\r\n" not in answer:
            more = s.recv(4096)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < (8 << 20)  # the server answered long before the 64 MiB were sent


def test_headers_redirects_and_docs(client):
    for r in (client.post("/search", json={"query": "wing"}, headers=H), client.get("/nowhere"),
              client.post("/search", json={"query": ""}, headers=H), client.post("/search", json={"query": "a"}),
              client.get("/health"), client.get("/openapi.json")):
        assert r.headers.get("x-content-type-options") == "nosniff", (r.status_code, r.headers)
    slash = client.post("/search/", json={"query": "wing"}, headers={**H, "Host": "evil.example"})
    assert slash.status_code == 404 and "location" not in slash.headers
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").status_code == 200


@pytest.mark.parametrize("text,status", [("\u0000", 422), ("\u0000\u0000 \t", 422), ("\u200b\u2028", 422),
                                         ("\u0007", 422), ("a\u0000b", 200), ("é", 200)])
def test_control_character_queries(client, text, status):
    r = client.post("/search", json={"query": text}, headers=H)
    assert r.status_code == status, r.text
    r = client.post("/embed", json={"texts": ["fine", text]}, headers=H)
    assert r.status_code == status, r.text


def test_hits_and_answer_size_are_bounded(client):
    r = client.post("/search", json={"queries": ["wing"] * 64, "top_k": 1000}, headers=H)
    assert r.status_code == 422 and "64 queries x top_k 1000" in r.json()["error"]
    r = client.post("/search", json={"queries": ["supersonic flow", "heat transfer"], "top_k": 1000}, headers=H)
    assert r.status_code == 422 and "MiB" in r.json()["error"], r.text
    r = client.post("/search", json={"queries": ["supersonic flow", "heat transfer"], "top_k": 1000,
                                     "include_text": False}, headers=H)
    assert r.status_code == 200 and len(r.json()["results"][1]["hits"]) == 1000


def test_stats_keep_to_known_routes(client):
    for i in range(40):
        client.get(f"/scan-{i}-{os.urandom(4).hex()}")
        client.post(f"/admin/{i}", json={})
    stats = client.get("/stats", headers=H).json()
    assert set(stats["requests"]) <= {"/search", "/embed", "/health", "/stats", "/openapi.json", "other"}
    assert stats["requests"]["other"] >= 80


def test_a_huge_answer_does_not_stall_other_clients(retriever):
    """A 32-query x top_k 1398 answer with texts (tens of MB) is built off the event loop: single queries sent
    while it is being built are answered before it is."""
    running = _Running(create_app(retriever, api_key=KEY, limits=ROOMY))
    try:
        queries = list(S.cranfield().queries.values())
        done: list[tuple[str, float]] = []

        def big() -> None:
            r = httpx.post(running.url + "/search", json={"queries": queries[:32], "top_k": 1398}, headers=H,
                           timeout=300)
            assert r.status_code == 200 and len(r.json()["results"]) == 32
            done.append(("big", time.perf_counter()))

        t = threading.Thread(target=big)
        t.start()
        time.sleep(0.3)
        with httpx.Client(base_url=running.url, timeout=60) as c:
            for q in queries[40:43]:
                t0 = time.perf_counter()
                r = c.post("/search", json={"query": q, "top_k": 5}, headers=H)
                assert r.status_code == 200
                done.append(("single", time.perf_counter() - t0))
        t.join(300)
        assert [kind for kind, _ in done] == ["single", "single", "single", "big"], done
    finally:
        running.stop()


# -- the micro-batcher and the CPU encoder

def test_length_groups():
    from leafkd.retrieval.query_encoder import length_groups

    lengths = [12, 80, 13, 11, 79, 200, 12, 14]
    groups = length_groups(lengths, call_tokens=48)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in g) for g in groups] == [[11, 12, 12, 13, 14], [79, 80], [200]]
    assert length_groups([5] * 100, group_tokens=50) == [list(range(i, i + 10)) for i in range(0, 100, 10)]
    assert length_groups([]) == []


def test_cpu_grouped_batches_embed_like_single_queries(retriever):
    queries = list(S.cranfield().queries.values())[:40] + ["x", "a much longer query " * 6]
    batched = retriever.embed(queries)
    single = np.concatenate([retriever.embed([q]) for q in queries])
    np.testing.assert_allclose(batched, single, atol=2e-5)


def test_a_short_query_is_not_held_behind_a_large_request(retriever):
    from leafkd.server.batcher import MicroBatcher

    batcher = MicroBatcher(retriever, max_batch=256, max_wait_ms=2, slice_tokens=128)
    big_texts = [q for q in S.cranfield().queries.values()][:200]
    order: list[str] = []

    async def main():
        async def run(name, texts, delay):
            await asyncio.sleep(delay)
            out = await batcher.submit("search", texts, 5)
            order.append(name)
            return out

        return await asyncio.gather(run("big", big_texts, 0), run("short", ["wing flutter"], 0.05))

    batcher.start()
    try:
        big, short = asyncio.run(main())
    finally:
        batcher.stop()
    assert order == ["short", "big"], order
    assert batcher.batches >= 10  # the large request went through in slices
    want = retriever.search(big_texts[:50], 5)
    assert [[h.id for h in hs] for hs in big[:50]] == [[h.id for h in hs] for hs in want]
    assert len(big) == 200 and len(short) == 1 and batcher.depth == 0


# -- authentication and start-up (real `leafkd serve` processes)

ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("LEAFKD_API_KEY", None)


def serve_cmd(*extra: str, index: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "leafkd", "serve", "--index", str(index or S.cranfield_index()), "--student",
            str(S.student_dir()), "--device", "cpu", "--no-gpu", *extra]


def one_error(r, needle: str) -> None:
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert needle in errors[0], errors[0]


def test_serve_refuses_unsafe_or_broken_setups(tmp_path, capsys, monkeypatch):
    from leafkd.cli import main

    r = subprocess.run(serve_cmd("--port", "0", "--host", "0.0.0.0"), env=ENV, capture_output=True, text=True,
                       timeout=300)
    one_error(r, "without an API key")  # a real process; the rest run `main` here, the same code path

    def run(*args: str):
        try:
            code = main(serve_cmd("--port", "0", *args)[3:])
        except SystemExit as e:
            code = e.code
        return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)

    monkeypatch.delenv("LEAFKD_API_KEY", raising=False)
    one_error(run("--api-key-env", "LEAFKD_SURELY_UNSET"), "not set")
    one_error(run("--api-key", ""), "empty")
    (tmp_path / "key").write_text("k1\n")
    one_error(run("--api-key", "a", "--api-key-file", str(tmp_path / "key")), "one of")
    one_error(run("--api-key-file", str(tmp_path / "missing")), "no such file")
    one_error(run("--api-key", "has space"), "printable")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        one_error(run("--port", str(busy.getsockname()[1])), "cannot listen")
    monkeypatch.setenv("LEAFKD_API_KEY", "k")
    one_error(run("--no-auth"), "--no-auth")
    monkeypatch.delenv("LEAFKD_API_KEY")
    # an index whose stored search parameters FAISS would fail on is refused before serving
    import shutil

    bad = tmp_path / "bad-index"
    shutil.copytree(S.cranfield_index(), bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["search_params"] = {"efSearch": -5}
    (bad / "manifest.json").write_text(json.dumps(m))
    try:
        code = main(serve_cmd("--port", "0", index=bad)[3:])
    except SystemExit as e:
        code = e.code
    one_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), "efSearch")


def test_auth_helpers():
    from leafkd.errors import LeafkdError
    from leafkd.server.auth import auth_line, is_loopback, resolve_api_key

    assert resolve_api_key(environ={}) is None
    assert resolve_api_key(environ={"LEAFKD_API_KEY": " s3cret\n"}).value == "s3cret"
    assert resolve_api_key(key_env="MY", environ={"MY": "a", "LEAFKD_API_KEY": "b"}).value == "a"
    assert resolve_api_key(key="c", environ={"LEAFKD_API_KEY": "b"}).value == "c"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("127.8.9.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.1.2.3")
    assert "OFF" in auth_line(None, "0.0.0.0", no_auth=True)
    assert "loopback" in auth_line(None, "127.0.0.1", no_auth=False)
    with pytest.raises(LeafkdError, match="without an API key"):
        auth_line(None, "::", no_auth=False)


def test_leafkd_api_key_turns_auth_on():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(serve_cmd("--port", str(port)), env={**ENV, "LEAFKD_API_KEY": "env-key"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = wait_until_healthy(proc, port)
        assert httpx.post(url + "/search", json={"query": "wing"}, timeout=30).status_code == 401
        assert httpx.get(url + "/stats", timeout=30).status_code == 401
        assert httpx.post(url + "/embed", json={"text": "wing"}, timeout=30).status_code == 401
        ok = httpx.post(url + "/search", json={"query": "wing"}, headers={"X-API-Key": "env-key"}, timeout=30)
        assert ok.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert "auth on" in err and "LEAFKD_API_KEY" in err and "env-key" not in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
