"""`leafkd demo`: the main job end to end on an embedded default, on CPU in minutes.

`leafkd distill` of the first 500 documents of the Cranfield collection (../shared/data/classic/cranfield, with
the queries judged against them) with all-MiniLM-L6-v2 as the teacher and its own first 2 layers as the student,
a short training sized for 2 CPU cores; then a table of nDCG@10 (teacher, student
alone, asymmetric), a real `leafkd serve` of the result and of the teacher on loopback, one query over HTTP with
its hits, and the per-query latency of the student server against the teacher server.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from leafkd.cli.options import number, output_folder
from leafkd.errors import LeafkdError

# A short run of the corpus-adapted recipe: small enough for 2 CPU cores, the same stages as a real one.
DEMO_TRAINING = {"student_layers": 2, "projection": "always", "max_texts": 1000, "adapt_weight": 1.0,
                 "adapt_spans": 1, "heldout": 100, "batch_size": 64, "lr": 5e-4, "projection_lr": 5e-4,
                 "max_seq_length": 128, "eval_every": 0, "checkpoint_every": 0, "plot": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


class _Server:
    """A real `leafkd serve` process on a loopback port, stopped on exit."""

    def __init__(self, *args: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "leafkd", "serve", *args, "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = (self.proc.stderr.read() if self.proc.stderr else "").strip().splitlines()
                raise LeafkdError(f"the server stopped at start-up: {err[-1] if err else 'no message'}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise LeafkdError(f"the server on {self.url} did not answer /health within {timeout:.0f} s")

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _latency_ms(url: str, queries: list[str]) -> float:
    """Median wall time of single-query /search requests (one warm-up first)."""
    _post(f"{url}/search", {"queries": [queries[0]], "top_k": 10})
    times = []
    for q in queries:
        t0 = time.perf_counter()
        _post(f"{url}/search", {"queries": [q], "top_k": 10})
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _run(args: argparse.Namespace) -> int:
    from leafkd.data.beir import write_beir_subset
    from leafkd.data.documents import jsonl_records
    from leafkd.data.paths import data_dir
    from leafkd.models import resolve_model
    from leafkd.pipeline import DistillConfig, distill

    folder = data_dir(args.data_dir)
    assert folder is not None  # required: a missing data folder is a one-line error
    corpus = write_beir_subset(folder / "classic" / "cranfield", Path(args.out) / "corpus", args.documents)
    teacher = str(resolve_model(args.teacher))
    t0 = time.perf_counter()
    cfg = DistillConfig(corpus=str(corpus), teacher=teacher, student=teacher, out=str(args.out),
                        data_dir=str(folder), device="cpu", progress=not args.quiet, seed=0,
                        train={**DEMO_TRAINING, "epochs": args.epochs})
    result = distill(cfg)
    scores = result.scores or {}
    print(f"\nleafkd distill of Cranfield's first {result.documents} documents in {time.perf_counter() - t0:.0f} s: "
          f"teacher {Path(teacher).name}, student its first {DEMO_TRAINING['student_layers']} layers")
    print(f"\n{'nDCG@10 (Cranfield, ' + str(result.documents) + ' documents)':<44s} {'score':>6s} {'of teacher':>11s}")
    labels = {"teacher": "teacher (queries and documents)", "base": "student before training (alone)",
              "student": "student alone (queries and documents)",
              "asymmetric": "asymmetric: student queries, teacher docs"}
    for mode, label in labels.items():
        if mode in scores:
            print(f"{label:<44s} {100 * scores[mode]:6.2f} {100 * scores[mode] / scores['teacher']:10.1f}%")
    queries = [str(q["text"]) for q in jsonl_records(corpus / "queries.jsonl", ("_id", "text"))]
    queries = queries[: args.latency_queries]
    with _Server("--index", str(result.index), "--student", str(result.student)) as student, \
            _Server("--index", str(result.index), "--mode", "teacher") as teacher_server:
        student.wait_ready()
        teacher_server.wait_ready()
        answer = _post(f"{student.url}/search", {"queries": [queries[0]], "top_k": 3})
        print(f"\nPOST {student.url}/search  {{\"queries\": [{queries[0]!r}], \"top_k\": 3}}")
        for hit in answer["results"][0]["hits"]:
            text = " ".join(str(hit.get("text", "")).split())
            print(f"  {hit['score']:.3f}  {hit['id']:>6}  {text[:90]}")
        student_ms, teacher_ms = _latency_ms(student.url, queries), _latency_ms(teacher_server.url, queries)
    print(f"\nper-query latency over HTTP (median of {len(queries)} single-query requests, CPU): student "
          f"{student_ms:.1f} ms, teacher {teacher_ms:.1f} ms ({teacher_ms / student_ms:.1f}x faster)")
    print(f"\nserve it yourself:\n  {result.serve_command}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="the main job on Cranfield on CPU: distil, evaluate, serve, query (minutes)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="all-MiniLM-L6-v2", help="teacher (default: %(default)s)")
    p.add_argument("--epochs", type=number(float, gt=0), default=1.0,
                   help="training epochs (default: %(default)s)")
    p.add_argument("--documents", type=number(int, min=50, max=1398), default=500,
                   help="Cranfield documents to distil for (default: %(default)s; all: 1398)")
    p.add_argument("--latency-queries", type=number(int, min=1, max=225), default=30,
                   help="queries timed against each server (default: %(default)s)")
    p.add_argument("--out", type=output_folder, default=Path("runs/demo"), help="run folder (default: runs/demo)")
    p.add_argument("--data-dir", help="the shared data folder (default: $LEAFKD_DATA or ../shared/data)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
