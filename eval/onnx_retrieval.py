#!/usr/bin/env python
"""The ONNX query path against torch (issue 21): the same student's queries through torch, ONNX fp32 and ONNX
int8 over one index, scored with the corpus's relevance labels, through the public API (`Retriever`).

For each query backend: nDCG@10 and recall@100 of the served path (`Retriever.load(..., query_backend=...)`),
the per-query cosine of its vectors to torch's (min and mean), and the mean overlap of its top-10 ids with
torch's. Writes onnx_retrieval.json / .md into --out.

    leafkd demo                                 # a student, an index and a judged corpus under runs/demo
    python eval/onnx_retrieval.py --index runs/demo/index --student runs/demo/student/model \\
        --corpus runs/demo/corpus --out eval/results/onnx_retrieval
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_of(hits) -> dict[str, float]:
    return {h.id: h.score for h in hits}


def measure(args) -> dict[str, Any]:
    import torch

    from leafkd import Retriever
    from leafkd.data.beir import read_beir
    from leafkd.evaluation.metrics import ndcg_at_k, recall_at_k
    from leafkd.retrieval.onnx_encoder import OnnxQueryEncoder
    from leafkd.student.onnx import FOLDER, export_onnx

    torch.set_num_threads(args.threads)
    data = read_beir(args.corpus)
    qids = [q for q in data.queries if q in data.qrels]
    texts = [data.queries[q] for q in qids]
    # The exports go into a copy of the student: the user's folder (and any export of theirs in it) is untouched.
    work = Path(tempfile.mkdtemp(prefix="onnx-retrieval-"))
    student = shutil.copytree(args.student, work / "student", ignore=shutil.ignore_patterns(FOLDER))
    export = export_onnx(student, int8=True)  # fp32 and int8 graphs, each checked against torch
    torch_ret = Retriever.load(args.index, student=student, device="cpu")
    onnx_ret = Retriever.load(args.index, student=student, query_backend="onnx", onnx_threads=args.threads)
    vectors = {"torch": torch_ret.embed(texts),
               "onnx fp32": OnnxQueryEncoder(student, int8=False, threads=args.threads)(texts),
               "onnx int8": onnx_ret.embed(texts)}
    shutil.rmtree(work)
    top = 100
    runs = {name: [run_of(h) for h in torch_ret.search_vectors(v, top)] for name, v in vectors.items()}
    rows = []
    for name, v in vectors.items():
        run = dict(zip(qids, runs[name]))
        cos = np.sum(v * vectors["torch"], axis=1)
        overlap = np.mean([len(set(sorted(a, key=a.get, reverse=True)[:10])
                                   & set(sorted(b, key=b.get, reverse=True)[:10])) / 10
                           for a, b in zip(runs[name], runs["torch"])])
        rows.append({"backend": name, "ndcg_at_10": float(np.mean(list(ndcg_at_k(data.qrels, run, 10).values()))),
                     "recall_at_100": float(np.mean(list(recall_at_k(data.qrels, run, top).values()))),
                     "cosine_to_torch_min": float(cos.min()), "cosine_to_torch_mean": float(cos.mean()),
                     "top10_overlap_with_torch": float(overlap)})
    return {"command": " ".join(sys.argv), "queries": len(qids), "documents": torch_ret.index.count,
            "export_check_cosine": {"fp32": export.cosine_min.get("fp32"), "int8": export.cosine_min.get("int8")},
            "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
            "rows": rows}


def render(result: dict[str, Any]) -> str:
    lines = [f"# ONNX query path vs torch ({result['queries']} judged queries, {result['documents']} documents)", "",
             f"`{result['command']}`", "",
             "| query backend | nDCG@10 | recall@100 | cosine to torch (min / mean) | top-10 overlap with torch |",
             "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['backend']} | {100 * r['ndcg_at_10']:.2f} | {100 * r['recall_at_100']:.2f} | "
                     f"{r['cosine_to_torch_min']:.4f} / {r['cosine_to_torch_mean']:.4f} | "
                     f"{100 * r['top10_overlap_with_torch']:.1f}% |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", required=True, help="index folder or name (the teacher's document vectors)")
    p.add_argument("--student", required=True, help="student folder (exported to ONNX in a temporary copy)")
    p.add_argument("--corpus", required=True, help="BEIR folder with the queries and relevance labels")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("eval/results/onnx_retrieval"))
    args = p.parse_args()
    from leafkd.errors import LeafkdError

    if not (Path(args.student) / "modules.json").is_file():
        raise SystemExit(f"error: --student {args.student}: not a sentence-transformers model folder")
    try:
        result = measure(args)
    except LeafkdError as e:  # a bad index, corpus or export: one line, like the CLI
        raise SystemExit(f"error: {e}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "onnx_retrieval.json").write_text(json.dumps(result, indent=2))
    text = render(result)
    (args.out / "onnx_retrieval.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
