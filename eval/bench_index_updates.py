#!/usr/bin/env python
"""Index update benchmark: the cost of adding and deleting 1,000 documents against corpus size.

For each corpus size N (synthetic documents: random unit vectors, ~200-character texts, small metadata) a base
index is built through the library, then ``--repeats`` times each:

- offline (a fresh process's view, like ``leafkd index add``): `add_documents` / `delete_documents` on the folder;
- live (a server's view): the same calls on a loaded `DocIndex`, applied in memory too;

with the wall time of every call, the bytes each add wrote, the load time (which grows with N: it reads the base
and adds the pending segments) and the time of a filtered search. For reference, the column ``rewrite_s`` measures
what the previous layout paid on every add or delete at this N: writing the whole FAISS index and the whole JSONL
store again (before even reading them back). ``--compact`` also times `compact_index` (O(N), run on demand).

Results go to OUT/bench.json after each size, and sizes already there are skipped: the run is resumable, and a long
size can be left for later. Example (CPU; the 1M size needs about 4 GB of memory and several minutes to build):

  python eval/bench_index_updates.py --sizes 1000,10000,100000,1000000 --out eval/results/bench_index_updates_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

FP = "f" * 64
WORDS = ("flow boundary layer shock wave pressure heat transfer wing supersonic laminar turbulent nozzle "
         "cylinder jet mach number drag lift surface temperature").split()


def documents(start: int, n: int, rng: np.random.Generator) -> list:
    from leafkd.data.documents import Document

    picks = rng.integers(0, len(WORDS), size=(n, 28))
    return [Document(f"d{start + i}", f"report {start + i}", " ".join(WORDS[w] for w in picks[i]),
                     {"year": 1950 + (start + i) % 70, "lang": ("en", "de", "fr")[(start + i) % 3]}) for i in range(n)]


def vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def rewrite_seconds(folder: Path, work: Path) -> float:
    """What the old layout wrote on every update at this size: the FAISS index and the JSONL store, whole."""
    import faiss

    from leafkd.retrieval import load_index
    from leafkd.retrieval.docstore import write_docs

    idx = load_index(folder, verify=False)
    ids, titles, texts = [], [], []
    for doc in idx.store.fetch(idx.keys.tolist()).values():
        ids.append(doc.id)
        titles.append(doc.title)
        texts.append(doc.text)
    t0 = time.perf_counter()
    faiss.write_index(idx.index, str(work / "rewrite.faiss"))
    write_docs(work / "rewrite.jsonl", ids, titles, texts)
    seconds = time.perf_counter() - t0
    idx.close()
    for f in ("rewrite.faiss", "rewrite.jsonl"):
        (work / f).unlink()
    return seconds


def updates(target, size: int, batch: int, repeats: int, dim: int, rng, tag: int, folder: Path) -> dict:
    """Time ``repeats`` adds and deletes of ``batch`` documents on ``target`` (a folder or a loaded index)."""
    from leafkd.retrieval import add_documents, delete_documents

    adds, dels, written = [], [], []
    for r in range(repeats):
        start = tag * 10**8 + r * batch
        docs, x = documents(start, batch, rng), vectors(batch, dim, rng)
        before = folder_bytes(folder)
        adds.append(timed(lambda docs=docs, x=x: add_documents(target, docs, vectors=x, teacher_fingerprint=FP))[0])
        written.append(folder_bytes(folder) - before)
        gone = [f"d{i}" for i in rng.choice(size, batch, replace=False)]
        dels.append(timed(lambda gone=gone: delete_documents(target, gone, missing_ok=True))[0])
    return {"add_s": [round(s, 4) for s in adds], "delete_s": [round(s, 4) for s in dels],
            "add_median_s": round(float(np.median(adds)), 4), "delete_median_s": round(float(np.median(dels)), 4),
            "add_bytes_written_median": int(np.median(written))}


def bench_size(n: int, a, work: Path) -> dict:
    from leafkd.retrieval import build_index, compact_index, load_index

    rng = np.random.default_rng(n)
    folder = work / f"n{n}"
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    docs, x = documents(0, n, rng), vectors(n, a.dim, rng)
    build_index(folder, docs, vectors=x, teacher_fingerprint=FP, factory=a.factory)
    build_s = time.perf_counter() - t0
    del docs, x
    row: dict = {"documents": n, "dim": a.dim, "factory": a.factory, "batch": a.batch, "build_s": round(build_s, 2),
                 "rewrite_s": round(rewrite_seconds(folder, work), 4)}
    row["offline"] = updates(folder, n, a.batch, a.repeats, a.dim, rng, 1, folder)
    load_s, idx = timed(lambda: load_index(folder, verify=False))
    row["load_s"] = round(load_s, 3)
    row["live"] = updates(idx, n, a.batch, a.repeats, a.dim, rng, 2, folder)
    q = vectors(1, a.dim, rng)
    for name, flt in (("search_s", None), ("search_filter_1pct_s", {"year": 1960, "lang": "de"}),
                      ("search_filter_33pct_s", {"lang": "fr"})):
        idx.hits(q, 10, flt)
        row[name] = round(min(timed(lambda flt=flt: idx.hits(q, 10, flt))[0] for _ in range(3)), 5)
    idx.close()
    if a.compact:
        row["compact_s"] = round(timed(lambda: compact_index(folder))[0], 2)
    if not a.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return row


def markdown(report: dict) -> str:
    lines = [f"# Index updates ({report['machine']})", "",
             "Median seconds per call over the repeats; each add or delete is of one batch of documents.", "",
             "| documents | add (offline) | delete (offline) | add (live) | delete (live) | bytes written per add | "
             "load | search | filtered 1% | old layout: rewrite per update | build |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(report["sizes"].values(), key=lambda r: r["documents"]):
        o, li = r["offline"], r["live"]
        lines.append(f"| {r['documents']:,} | {o['add_median_s']} | {o['delete_median_s']} | {li['add_median_s']} | "
                     f"{li['delete_median_s']} | {o['add_bytes_written_median']:,} | {r['load_s']} | {r['search_s']} | "
                     f"{r['search_filter_1pct_s']} | {r['rewrite_s']} | {r['build_s']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000", help="comma-separated corpus sizes")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--batch", type=int, default=1000, help="documents per add and per delete")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--factory", default="Flat")
    p.add_argument("--compact", action="store_true", help="also time a compaction after the updates")
    p.add_argument("--keep", action="store_true", help="keep the index folders")
    p.add_argument("--work", default=None, help="where the index folders go (default: OUT.work)")
    p.add_argument("--out", required=True, help="writes OUT/bench.json (resumable) and OUT/bench.md")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    report = json.loads(path.read_text()) if path.exists() else {"sizes": {}}
    report["machine"] = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs"
    for n in [int(s) for s in a.sizes.split(",") if s]:
        if str(n) in report["sizes"]:
            print(f"{n:,}: done before (remove it from {path} to measure again)")
            continue
        row = bench_size(n, a, work)
        report["sizes"][str(n)] = row
        path.write_text(json.dumps(report, indent=2))
        print(f"{n:,}: add {row['offline']['add_median_s']}s / {row['live']['add_median_s']}s live, delete "
              f"{row['offline']['delete_median_s']}s, load {row['load_s']}s, old rewrite {row['rewrite_s']}s",
              flush=True)
    (out / "bench.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
