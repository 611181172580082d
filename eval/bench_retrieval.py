#!/usr/bin/env python
"""Retrieval benchmark: asymmetric (student queries) vs teacher-symmetric querying, in process and over HTTP,
and FAISS CPU vs GPU flat search on synthetic vectors.

Measures, on one machine in one run:
  1. index build: teacher embedding of the corpus + FAISS build (docs/s);
  2. single-query latency p50/p99 in process (encode + search) for both modes, after the server's warm-up
     (every length bucket, CUDA graphs captured, gc frozen);
  3. batched in-process throughput (queries/s, time-based) at several batch sizes for both modes, with a
     tokenise / embed / FAISS / hits breakdown, and the asymmetric / teacher ratio per batch size;
  4. single-query latency over HTTP (the search server in its own process, keep-alive client) and queries/s under
     concurrent load (several client processes, many requests in flight; the server micro-batches);
  5. flat inner-product search at the given sizes (synthetic normalised vectors) at several query batch sizes:
     FAISS CPU; when faiss-gpu sees a GPU, FAISS GPU fp32 / fp16 (cloned index; with a larger scratch memory;
     with and without cuVS where the build has it), FAISS knn_gpu (bfKnn) on fp16 torch tensors, and a clearly
     labelled torch matmul+topk reference -- each with recall@10 against the exact CPU result.

Writes OUT.json and OUT.md and prints a compact table. Runs on CPU (use small sizes) and on GPUs.

Example (H100, about 5 minutes):
  python eval/bench_retrieval.py --teacher models/all-mpnet-base-v2 --student runs/student \\
      --corpus /data/beir/scifact --sizes 100000,1000000 --dim 768 --out eval/bench_retrieval_h100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import platform
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# TOKENIZERS_PARALLELISM is left at its default (parallel), as in `leafkd serve`: batches tokenise on all cores.

import numpy as np  # noqa: E402


def pct(values, ps=(50, 99)) -> dict:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {f"p{p}": None for p in ps}
    return {f"p{p}": round(float(np.percentile(a, p)), 3) for p in ps} | {"mean": round(float(a.mean()), 3)}


def sync_cuda() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception:
        pass


def load_queries(corpus: Path, path: str | None, n: int, docs) -> list[str]:
    if path:
        p = Path(path)
        lines = p.read_text(encoding="utf-8").splitlines()
        if p.suffix == ".jsonl":
            lines = [json.loads(x)["text"] for x in lines if x.strip()]
        qs = [x.strip() for x in lines if x.strip()]
    elif corpus.is_dir() and (corpus / "queries.jsonl").exists():
        qs = [json.loads(x)["text"] for x in (corpus / "queries.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    else:  # no query file: the first words of documents make query-like strings
        qs = [" ".join((d.title or d.text).split()[:12]) for d in docs]
    qs = [q for q in qs if q.strip()]
    reps = -(-n // max(len(qs), 1))
    return (qs * reps)[:n]


# ----------------------------------------------------------------------------------------------- in process


def _timed(fn, min_time: float = 2.0, min_calls: int = 3) -> float:
    """Seconds per call of ``fn``, averaged over at least ``min_time`` seconds and ``min_calls`` calls."""
    n = 0
    t0 = time.perf_counter()
    while n < min_calls or time.perf_counter() - t0 < min_time:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def bench_inprocess(retriever, queries: list[str], top_k: int, batches: list[int], warmup: int = 50,
                    min_time: float = 2.0) -> dict:
    retriever.warmup(freeze_gc=True)  # what the server does: every length bucket warm, CUDA graphs captured
    for q in queries[:warmup]:
        retriever.search([q], top_k)
    lat, enc = [], []
    for q in queries:
        t0 = time.perf_counter()
        v = retriever.embed([q])  # returns host numpy: the GPU work is done
        t1 = time.perf_counter()
        retriever.search_vectors(v, top_k)
        t2 = time.perf_counter()
        enc.append((t1 - t0) * 1e3)
        lat.append((t2 - t0) * 1e3)
    out = {"latency_ms": pct(lat), "encode_ms": pct(enc), "batched": {}}
    # batched throughput (the server's micro-batches at full load look like this), time-based
    for batch in batches:
        pool = (queries * (-(-4 * batch // max(len(queries), 1))))[: 4 * batch]
        chunks = [pool[s : s + batch] for s in range(0, len(pool), batch)]
        state = {"i": 0}

        def step():
            retriever.search(chunks[state["i"] % len(chunks)], top_k)
            state["i"] += 1

        step()
        per_call = _timed(step, min_time)
        # where the time goes, for the first chunk
        c = chunks[0]
        t_tok = _timed(lambda: retriever.encoder.tokenize(c), 0.3)
        t_emb = _timed(lambda: retriever.embed(c), 0.5)
        vecs = retriever.embed(c)
        t_search = _timed(lambda: retriever.index.search(vecs, top_k), 0.3)
        t_hits = _timed(lambda: retriever.search_vectors(vecs, top_k), 0.3)
        out["batched"][str(batch)] = {"qps": round(batch / per_call, 1), "ms_per_batch": round(per_call * 1e3, 3),
                                      "tokenize_ms": round(t_tok * 1e3, 3), "embed_ms": round(t_emb * 1e3, 3),
                                      "faiss_ms": round(t_search * 1e3, 3), "search_with_hits_ms": round(t_hits * 1e3, 3)}
    first = str(batches[0])
    out["batched_qps"] = out["batched"][first]["qps"]
    out["batch"] = batches[0]
    info = retriever.info()
    out["encoder"] = {k: info.get(k) for k in ("encoder_device", "encoder_dtype", "encoder_fast_path", "cuda_graphs",
                                               "cuda_graph_error", "index_device")}
    return out


# ----------------------------------------------------------------------------------------------- HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(index_dir: str, mode: str, port: int, student: str, teacher: str, device: str | None, gpu: bool | None,
               allow_fingerprint_mismatch: bool, max_wait_ms: float) -> None:
    """The search server as `leafkd serve` runs it (public API), in a process of its own; SIGTERM stops it."""
    from leafkd import Retriever
    from leafkd.server import Limits, create_app, serve

    retriever = Retriever.load(index_dir, student=student, teacher=teacher, mode=mode, device=device, gpu=gpu,
                               allow_fingerprint_mismatch=allow_fingerprint_mismatch, verify=False)
    app = create_app(retriever, limits=Limits(max_queries=1024), max_wait_ms=max_wait_ms)
    serve(app, host="127.0.0.1", port=port)


def start_server(args, index_dir: Path, mode: str, port: int):
    import httpx

    gpu = False if args.no_gpu_faiss else None
    proc = mp.get_context("spawn").Process(
        target=run_server, args=(str(index_dir), mode, port, args.student, args.teacher, args.device, gpu,
                                 args.allow_fingerprint_mismatch, args.max_wait_ms))
    proc.start()
    deadline = time.time() + 300
    while time.time() < deadline:
        if not proc.is_alive():
            raise RuntimeError(f"the server exited with status {proc.exitcode} (its error is above)")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError("server did not start in 300 s")


def stop_server(proc) -> None:
    os.kill(proc.pid, signal.SIGTERM)  # graceful: in-flight requests finish
    proc.join(60)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _load_worker(url: str, queries: list[str], n: int, concurrency: int, top_k: int, out) -> None:
    import httpx

    async def main():
        lat = []
        errors = 0
        it = iter(range(n))
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            async def worker():
                nonlocal errors
                for i in it:
                    t0 = time.perf_counter()
                    try:
                        r = await c.post("/search", json={"query": queries[i % len(queries)], "top_k": top_k,
                                                          "include_text": False})
                        if r.status_code != 200:
                            errors += 1
                    except httpx.HTTPError:
                        errors += 1
                    lat.append((time.perf_counter() - t0) * 1e3)
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return lat, errors

    out.put(asyncio.run(main()))


def bench_http(url: str, queries: list[str], top_k: int, n_single: int, n_load: int, concurrency: int, procs: int) -> dict:
    import httpx

    with httpx.Client(base_url=url, timeout=60) as c:
        for q in queries[:20]:
            c.post("/search", json={"query": q, "top_k": top_k, "include_text": False})
        lat = []
        for q in queries[:n_single]:
            t0 = time.perf_counter()
            r = c.post("/search", json={"query": q, "top_k": top_k, "include_text": False})
            lat.append((time.perf_counter() - t0) * 1e3)
            assert r.status_code == 200, r.text
        before = c.get("/stats").json()["batches"]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    per = max(1, concurrency // procs)
    workers = [ctx.Process(target=_load_worker, args=(url, queries, n_load // procs, per, top_k, out)) for _ in range(procs)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    results = [out.get() for _ in workers]
    wall = time.perf_counter() - t0
    for w in workers:
        w.join()
    all_lat = [x for lat, _ in results for x in lat]
    errors = sum(e for _, e in results)
    with httpx.Client(base_url=url, timeout=60) as c:
        stats = c.get("/stats").json()
    b = stats["batches"]
    batches = b["count"] - before["count"]
    return {"single_latency_ms": pct(lat), "load": {"requests": len(all_lat), "errors": errors,
            "concurrency": per * procs, "client_procs": procs, "qps": round(len(all_lat) / wall, 1),
            "latency_ms": pct(all_lat), "mean_batch": round((b["queries"] - before["queries"]) / max(batches, 1), 2)}}


# ----------------------------------------------------------------------------------------------- FAISS scale


def synthetic(n: int, d: int, seed: int = 0, chunk: int = 200_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[s : s + len(block)] = block
    return x


def time_search(search, q, min_time: float = 1.0) -> float:
    """Queries/s of ``search(q)`` (a whole batch per call), after one warm-up call."""
    search(q)
    sync_cuda()
    per_call = _timed(lambda: (search(q), sync_cuda()), min_time, min_calls=2)
    return len(q) / per_call


def single_latency(index, q: np.ndarray, k: int, reps: int = 50) -> dict:
    lat = []
    for i in range(reps):
        t0 = time.perf_counter()
        index.search(q[i % len(q) : i % len(q) + 1], k)
        lat.append((time.perf_counter() - t0) * 1e3)
    return pct(lat)


def _gpu_engines(cpu_index, x: np.ndarray, k: int, notes: list[str]):
    """(name, make) pairs: each make() returns (search(q_numpy) callable, single-query index or None, cleanup)."""
    import faiss

    from leafkd.retrieval.faiss_utils import GpuResources, index_to_gpu

    engines = []

    def cloned(fp16: bool, use_cuvs=None, temp_mb: int | None = None):
        def make():
            res = None
            if temp_mb:
                res = faiss.StandardGpuResources()
                res.setTempMemory(temp_mb << 20)
            g = index_to_gpu(cpu_index, fp16=fp16, use_cuvs=use_cuvs, res=res)
            return (lambda q: g.search(q, k)), g, (lambda: None)
        return make

    has_cuvs = hasattr(faiss.GpuClonerOptions(), "use_cuvs")
    engines.append(("faiss GPU flat fp32", cloned(False, False if has_cuvs else None)))
    engines.append(("faiss GPU flat fp16", cloned(True, False if has_cuvs else None)))
    engines.append(("faiss GPU flat fp16, 4 GiB temp mem", cloned(True, False if has_cuvs else None, 4096)))
    if has_cuvs:
        engines.append(("faiss GPU flat fp32, cuVS", cloned(False, True)))
        engines.append(("faiss GPU flat fp16, cuVS", cloned(True, True)))

    try:
        import torch

        if torch.cuda.is_available():
            def knn_fp16(dtype):
                def make():
                    import faiss.contrib.torch_utils  # noqa: F401  (knn_gpu on torch CUDA tensors, no copies)

                    xb = torch.from_numpy(x).to("cuda").to(dtype)
                    res = GpuResources.get(0)

                    def search(q):
                        xq = torch.from_numpy(q).to("cuda", non_blocking=True).to(dtype)
                        D, I = faiss.knn_gpu(res, xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)
                        return D.cpu().numpy(), I.cpu().numpy()

                    return search, None, (lambda: None)
                return make

            engines.append(("faiss knn_gpu (bfKnn) fp16 on torch tensors", knn_fp16(torch.float16)))

            def torch_ref():
                xb = torch.from_numpy(x).to("cuda").half()

                def search(q):
                    xq = torch.from_numpy(q).to("cuda", non_blocking=True).half()
                    outs = []
                    step = max(1, min(len(xq), int(4e9 // (2 * xb.shape[0]))))  # <= 4 GB of scores per step
                    for s in range(0, len(xq), step):
                        scores = xq[s : s + step] @ xb.T
                        outs.append(torch.topk(scores, k, dim=1))
                    return (torch.cat([o.values for o in outs]).float().cpu().numpy(),
                            torch.cat([o.indices for o in outs]).cpu().numpy())

                return search, None, (lambda: None)

            engines.append(("REFERENCE torch fp16 matmul+topk (not FAISS)", torch_ref))
    except ImportError:
        pass
    return engines


def _recall(got_ids: np.ndarray, want_ids: np.ndarray) -> float:
    hits = sum(len(set(g.tolist()) & set(w.tolist())) for g, w in zip(got_ids, want_ids))
    return round(hits / max(want_ids.size, 1), 4)


def bench_faiss(sizes: list[int], dim: int, batches: list[int], nq_cpu: int, k: int,
                min_time: float = 1.0) -> tuple[list[dict], list[str]]:
    import faiss

    from leafkd.retrieval.faiss_utils import gpu_count

    rows, notes = [], []
    ngpu = gpu_count()
    if ngpu == 0:
        notes.append("FAISS GPU parts skipped: faiss-gpu is not installed or no GPU is visible")
    queries = synthetic(max(batches + [nq_cpu]) if ngpu else nq_cpu, dim, seed=1)
    for n in sizes:
        x = synthetic(n, dim)
        cpu = faiss.IndexFlatIP(dim)
        cpu.add(x)
        _, truth = cpu.search(queries[:200], k)  # exact top-k for the recall column
        rows.append({"size": n, "dim": dim, "engine": f"faiss CPU flat fp32 ({faiss.omp_get_max_threads()} threads)",
                     "batch": nq_cpu,
                     "qps": round(time_search(lambda q, index=cpu: index.search(q, k), queries[:nq_cpu], min_time), 1),
                     "single_ms": single_latency(cpu, queries, k, reps=20), "recall": 1.0})
        if ngpu:
            for name, make in _gpu_engines(cpu, x, k, notes):
                try:
                    search, single_index, cleanup = make()
                except Exception as e:
                    notes.append(f"{name} at {n}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__}")
                    continue
                try:
                    recall = _recall(search(queries[:200])[1], truth)
                    single = single_latency(single_index, queries, k) if single_index is not None else None
                    for b in batches:
                        rows.append({"size": n, "dim": dim, "engine": name, "batch": b,
                                     "qps": round(time_search(search, queries[:b], min_time), 1),
                                     "single_ms": single, "recall": recall})
                        print(f"faiss {n:,} {name} batch {b}: {rows[-1]['qps']:,} q/s", file=sys.stderr)
                except Exception as e:
                    notes.append(f"{name} at {n}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__}")
                finally:
                    del search, single_index
                    cleanup()
                    sync_cuda()
            if ngpu > 1:
                from leafkd.retrieval.faiss_utils import index_to_gpu

                try:
                    g = index_to_gpu(cpu, fp16=True, shards=-1)
                    rows.append({"size": n, "dim": dim, "engine": f"faiss GPU flat fp16 sharded x{ngpu}", "batch": batches[-1],
                                 "qps": round(time_search(lambda q, index=g: index.search(q, k), queries[: batches[-1]],
                                                          min_time), 1),
                                 "single_ms": single_latency(g, queries, k), "recall": None})
                    del g
                except Exception as e:
                    notes.append(f"GPU sharded at {n}: {e}")
        del cpu, x
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
    return rows, notes


def memory_table(dims=(384, 768, 1024), pq=(32, 64, 96)) -> list[dict]:
    """Vector memory per million documents (codes only; IVF adds 8 bytes/doc of ids, HNSW32 ~ 256 bytes/doc)."""
    from faiss.contrib.factory_tools import get_code_size  # bytes per vector of a factory string

    out = []
    for d in dims:
        row = {"dim": d, "float32": get_code_size(d, "Flat"), "float16": get_code_size(d, "SQfp16"),
               "SQ8": get_code_size(d, "SQ8")}
        row.update({f"PQ{m}": get_code_size(d, f"PQ{m}") for m in pq if d % m == 0})
        out.append({k: (round(v * 1e6 / 2**20, 1) if k != "dim" else v) for k, v in row.items()})
    return out


# ----------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--corpus", required=True, help="BEIR folder, corpus.jsonl, .jsonl or .txt")
    ap.add_argument("--queries", default=None, help="query file (.txt or .jsonl); default: the BEIR queries")
    ap.add_argument("--out", required=True, help="output path prefix: writes OUT.json and OUT.md")
    ap.add_argument("--max-docs", type=int, default=None, help="index only the first N documents")
    ap.add_argument("--factory", default="Flat")
    ap.add_argument("--index-dir", default=None, help="reuse/keep the built index here (default: a temp folder)")
    ap.add_argument("--n-queries", type=int, default=500, help="single-query latency samples per mode")
    ap.add_argument("--batch", default="256,1024", help="batch sizes for in-process throughput (comma list)")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--http-requests", type=int, default=4000, help="requests in the concurrent load test")
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--client-procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--sizes", default="100000,1000000", help="synthetic FAISS sizes")
    ap.add_argument("--dim", type=int, default=768, help="synthetic vector dimension")
    ap.add_argument("--faiss-queries", default="4096,16384,65536", help="query batch sizes for GPU FAISS (comma list)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per FAISS throughput measurement")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--faiss-queries-cpu", type=int, default=1000, help="query batch for CPU FAISS")
    ap.add_argument("--device", default=None, help="torch device for encoders (default: cuda if present)")
    ap.add_argument("--no-gpu-faiss", action="store_true", help="search the retrieval index on the CPU")
    ap.add_argument("--allow-fingerprint-mismatch", action="store_true")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--skip-faiss", action="store_true")
    args = ap.parse_args()

    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    import leafkd
    from leafkd import Retriever, build_index, load_index
    from leafkd.data.documents import read_documents
    from leafkd.models import load_model, resolve_model
    from leafkd.retrieval.faiss_utils import faiss_build_name, gpu_count

    # leafkd logs its progress (index build, fallbacks) through `logging`: show it on stderr, one plain line each.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("leafkd").addHandler(handler)
    logging.getLogger("leafkd").setLevel(logging.INFO)

    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine()
    ngpu = gpu_count()
    notes = []
    if not cuda:
        notes.append("no CUDA device: encoders run on the CPU")
    result: dict = {"machine": {"device": device_name, "cpu_count": os.cpu_count(), "python": platform.python_version(),
                                "torch": torch.__version__, "faiss": faiss_build_name(), "faiss_gpus": ngpu,
                                "leafkd": leafkd.__version__, "torch_threads": torch.get_num_threads(),
                                "load_average": [round(x, 2) for x in os.getloadavg()]},
                    "args": vars(args)}
    corpus = Path(args.corpus)
    docs = read_documents(corpus)
    if args.max_docs:
        docs = docs[: args.max_docs]

    # 1. index build with the teacher
    tmp = tempfile.TemporaryDirectory(prefix="leafkd-bench-")
    index_dir = Path(args.index_dir) if args.index_dir else Path(tmp.name) / "bench-index"
    if not (index_dir / "manifest.json").exists():
        dev = args.device or ("cuda" if cuda else "cpu")
        teacher_model = load_model(resolve_model(args.teacher), device=dev)
        sync_cuda()
        t0 = time.perf_counter()
        build_index(index_dir, docs, teacher=args.teacher, model=teacher_model, factory=args.factory,
                    gpu=ngpu > 0 and not args.no_gpu_faiss)
        dt = time.perf_counter() - t0
        result["build"] = {"documents": len(docs), "seconds": round(dt, 2), "docs_per_s": round(len(docs) / dt, 1),
                           "factory": args.factory}
        del teacher_model
        if cuda:
            torch.cuda.empty_cache()
    doc_index = load_index(index_dir, verify=False, gpu=False if args.no_gpu_faiss else None)
    queries = load_queries(corpus, args.queries, args.n_queries, docs)
    print(f"index: {doc_index.count} docs, {doc_index.dim}-d, FAISS on {doc_index.device}; {len(queries)} queries",
          file=sys.stderr)

    # 2-3. in process
    result["inprocess"] = {}
    retrievers = {
        "asymmetric": lambda: Retriever.load(doc_index, student=args.student, mode="asymmetric", device=args.device,
                                             allow_fingerprint_mismatch=args.allow_fingerprint_mismatch),
        "teacher": lambda: Retriever.load(doc_index, teacher=args.teacher, mode="teacher", device=args.device,
                                          allow_fingerprint_mismatch=args.allow_fingerprint_mismatch),
    }
    for mode, make in retrievers.items():
        r = make()
        result["inprocess"][mode] = bench_inprocess(r, queries, args.top_k, [int(b) for b in str(args.batch).split(",") if b.strip()])
        print(f"{mode} in process: {result['inprocess'][mode]}", file=sys.stderr)
        del r
        if cuda:
            torch.cuda.empty_cache()
    doc_index = None  # free it before the HTTP servers load their own copies

    # 4. HTTP
    if not args.skip_http:
        result["http"] = {}
        for mode in ("asymmetric", "teacher"):
            port = free_port()
            proc = start_server(args, index_dir, mode, port)
            try:
                result["http"][mode] = bench_http(f"http://127.0.0.1:{port}", queries, args.top_k, min(args.n_queries, 500),
                                                  args.http_requests, args.concurrency, args.client_procs)
                print(f"{mode} over HTTP: {result['http'][mode]}", file=sys.stderr)
            finally:
                stop_server(proc)

    # 5. FAISS scale
    if not args.skip_faiss:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        fb = [int(b) for b in str(args.faiss_queries).split(",") if b.strip()]
        rows, fnotes = bench_faiss(sizes, args.dim, fb, args.faiss_queries_cpu, args.top_k, args.min_time)
        result["faiss"] = rows
        notes += fnotes
    result["memory_mib_per_million_docs"] = memory_table()
    result["notes"] = notes

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = render_markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    tmp.cleanup()
    return 0


def render_markdown(r: dict) -> str:
    m = r["machine"]
    lines = ["# leafkd retrieval benchmark", "",
             f"Device: {m['device']} ({m['cpu_count']} CPU cores, torch {m['torch']} with {m['torch_threads']} threads, "
             f"{m['faiss']}, {m['faiss_gpus']} FAISS GPUs), Python {m['python']}; load average at start "
             f"{m.get('load_average')}.", ""]
    if "build" in r:
        b = r["build"]
        lines += [f"Index build ({b['factory']}): {b['documents']} documents in {b['seconds']} s "
                  f"({b['docs_per_s']} docs/s, teacher embedding + FAISS).", ""]
    lines += ["## Query path (top-10)", "",
              "| mode | in-process p50 ms | p99 ms | encode p50 ms | encode p99 ms | batched q/s | HTTP p50 ms | HTTP p99 ms | "
              "HTTP q/s under load | load p50 ms | load p99 ms | mean batch | errors |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in ("asymmetric", "teacher"):
        ip = r.get("inprocess", {}).get(mode)
        hp = r.get("http", {}).get(mode)
        if not ip:
            continue
        cells = [mode, ip["latency_ms"]["p50"], ip["latency_ms"]["p99"], ip["encode_ms"]["p50"], ip["encode_ms"]["p99"],
                 f"{ip['batched_qps']} (batch {ip['batch']})"]
        if hp:
            cells += [hp["single_latency_ms"]["p50"], hp["single_latency_ms"]["p99"], hp["load"]["qps"],
                      hp["load"]["latency_ms"]["p50"], hp["load"]["latency_ms"]["p99"], hp["load"]["mean_batch"],
                      hp["load"]["errors"]]
        else:
            cells += ["-"] * 7
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    ip = r.get("inprocess", {})
    if ip:
        lines += ["", "Batched in process (search = tokenise + encode + FAISS + hits; breakdown per batch in ms):", "",
                  "| mode | batch | q/s | ms/batch | tokenise | embed (incl. tokenise) | FAISS | search+hits |",
                  "|---|---|---|---|---|---|---|---|"]
        for mode, v in ip.items():
            for b, row in v.get("batched", {}).items():
                lines.append(f"| {mode} | {b} | {row['qps']} | {row['ms_per_batch']} | {row['tokenize_ms']} | "
                             f"{row['embed_ms']} | {row['faiss_ms']} | {row['search_with_hits_ms']} |")
        for mode, v in ip.items():
            e = v.get("encoder", {})
            lines.append(f"\n{mode} encoder: {e.get('encoder_device')} {e.get('encoder_dtype')}, fused fast path "
                         f"{e.get('encoder_fast_path')}, {e.get('cuda_graphs')} CUDA graphs"
                         + (f" (capture error: {e['cuda_graph_error']})" if e.get("cuda_graph_error") else "")
                         + f"; index on {e.get('index_device')}")
    if "asymmetric" in ip and "teacher" in ip:
        lines.append("")
        for b in ip["asymmetric"].get("batched", {}):
            if b in ip["teacher"].get("batched", {}):
                ratio = ip["asymmetric"]["batched"][b]["qps"] / max(ip["teacher"]["batched"][b]["qps"], 1e-9)
                lines.append(f"Asymmetric / teacher-symmetric batched throughput in process, batch {b}: {ratio:.2f}x")
        hp = r.get("http", {})
        if "asymmetric" in hp and "teacher" in hp:
            ratio = hp["asymmetric"]["load"]["qps"] / max(hp["teacher"]["load"]["qps"], 1e-9)
            lines.append(f"Asymmetric / teacher-symmetric throughput over HTTP under load: {ratio:.2f}x "
                         f"(concurrency {hp['asymmetric']['load']['concurrency']}, "
                         f"{hp['asymmetric']['load']['client_procs']} client processes)")
    if r.get("faiss"):
        lines += ["", "## Flat inner-product search (synthetic normalised vectors, top-10)", "",
                  "| documents | dim | engine | query batch | q/s batched | recall@10 vs exact | single query p50 ms |",
                  "|---|---|---|---|---|---|---|"]
        for row in r["faiss"]:
            single = row["single_ms"]["p50"] if row.get("single_ms") else "-"
            lines.append(f"| {row['size']:,} | {row['dim']} | {row['engine']} | {row['batch']} | {row['qps']:,} | "
                         f"{row.get('recall', '-')} | {single} |")
        lines.append("")
        for n in sorted({row["size"] for row in r["faiss"]}):
            for kind in ("fp32", "fp16"):
                cand = [row for row in r["faiss"] if row["size"] == n and row["engine"].startswith("faiss")
                        and "GPU" in row["engine"] and kind in row["engine"] or
                        (row["size"] == n and kind == "fp16" and row["engine"].startswith("faiss knn_gpu"))]
                if cand:
                    best = max(cand, key=lambda row: row["qps"])
                    lines.append(f"Best FAISS GPU {kind} at {n:,}: {best['qps']:,} q/s ({best['engine']}, batch {best['batch']})")
    lines += ["", "## Vector memory per million documents (MiB)", "",
              "| dim | float32 | float16 | SQ8 | PQ32 | PQ64 | PQ96 |", "|---|---|---|---|---|---|---|"]
    for row in r["memory_mib_per_million_docs"]:
        lines.append("| " + " | ".join(str(row.get(k, "-")) for k in ("dim", "float32", "float16", "SQ8", "PQ32", "PQ64", "PQ96")) + " |")
    if r.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
