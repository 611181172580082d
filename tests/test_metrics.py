"""GET /metrics over real HTTP: Prometheus text that prometheus_client's own parser reads, with request counts and
latency histograms per route, batch sizes, queue depth, index size and the encoder's device; one registry per app."""

from __future__ import annotations

import httpx
import pytest
import retrieval_support as S
from test_server import _Running

parser = pytest.importorskip("prometheus_client.parser", reason="needs the 'server' extra (prometheus-client)")

from leafkd.retrieval.retriever import Retriever  # noqa: E402
from leafkd.server.app import create_app  # noqa: E402

KEY = "metrics-key"
H = {"X-API-Key": KEY}


def scrape(client: httpx.Client, **headers) -> dict:
    r = client.get("/metrics", headers=headers or H)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return {s.name + repr(sorted(s.labels.items())): s.value
            for fam in parser.text_string_to_metric_families(r.text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples[name + repr(sorted(labels.items()))]


def test_metrics_parse_and_count(tmp_path):
    retriever = Retriever.load(S.cranfield_index(), student=S.student_dir())
    apps = [_Running(create_app(retriever, api_key=KEY, warmup=False)) for _ in range(2)]  # no registry clash
    try:
        with httpx.Client(base_url=apps[0].url, timeout=60) as c:
            assert c.get("/metrics").status_code == 401
            for q in ["flow over a flat plate", "shock waves", "heat transfer"]:
                assert c.post("/search", json={"query": q, "top_k": 3}, headers=H).status_code == 200
            assert c.post("/search", json={"queries": ["a", "b", "c", "d"], "top_k": 2}, headers=H).status_code == 200
            assert c.post("/search", json={"query": ""}, headers=H).status_code == 422
            assert c.get("/nowhere").status_code == 404
            assert c.get("/documents/zzz", headers=H).status_code == 404
            s = scrape(c, Authorization=f"Bearer {KEY}")
        assert value(s, "leafkd_requests_total", route="/search", status="200") == 4
        assert value(s, "leafkd_requests_total", route="/search", status="422") == 1
        assert value(s, "leafkd_requests_total", route="other", status="404") == 1
        assert value(s, "leafkd_requests_total", route="/documents/{doc_id:path}", status="404") == 1
        assert value(s, "leafkd_request_duration_seconds_count", route="/search") == 5
        assert value(s, "leafkd_request_duration_seconds_bucket", route="/search", le="+Inf") == 5
        assert value(s, "leafkd_batch_size_sum") == 7 and value(s, "leafkd_batch_size_count") >= 2
        assert value(s, "leafkd_queue_depth") == 0
        assert value(s, "leafkd_index_documents") == retriever.index.count == len(S.cranfield_docs())
        assert value(s, "leafkd_index_bytes") == retriever.index.nbytes()
        info = [k for k in s if k.startswith("leafkd_encoder_info")]
        assert len(info) == 1 and "('device', 'cpu')" in info[0]
        with httpx.Client(base_url=apps[1].url, timeout=60) as c:
            other = scrape(c)
        assert ("leafkd_requests_total" + repr(sorted({"route": "/search", "status": "200"}.items()))) not in other
    finally:
        for a in apps:
            a.stop()
