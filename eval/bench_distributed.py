"""Distributed scaling benchmark (issue 7): capture and training with 1 vs N torchrun processes, sharded FAISS.

    python eval/bench_distributed.py --teacher models/all-mpnet-base-v2 --student models/all-MiniLM-L6-v2 \
        --data-dir ../shared/data --out eval/results/bench_distributed_h200x2

For each world size (default 1 and 2) it launches `torchrun --nproc-per-node W` on this script's worker mode
and reads the measurements back from files:
- capture: `leafkd.capture` of the same texts into a fresh store; teacher loaded and warmed up first,
  the timed span is the capture call between two barriers (texts/s over all ranks);
- training: `leafkd.train` from the W=1 store; throughput is the run's own samples/s (global batch,
  all ranks) over its log intervals, the first interval (warm-up) left out. Weak scaling by default (the
  per-GPU batch is fixed, the global batch grows with W); --strong keeps the global batch fixed.
  Both sides run the same number of steps.
- index: a Flat (exact) and an IVF index over the captured vectors, searched on one GPU and sharded over all
  GPUs (leafkd.retrieval.faiss_utils.index_to_gpu, faiss index_cpu_to_all_gpus with shard=True); the result
  lists must be identical (ids; scores to float rounding). Without faiss-gpu or with one GPU: a CPU IndexShards
  emulation checks the merge logic and the note says so.
Prints a table and writes bench.json / bench.md to --out. On CPU (gloo) tiny sizes make it a smoke test:
    python eval/bench_distributed.py --teacher M --student M --student-layers 1 --texts 600 --steps 8 \
        --batch-per-gpu 16 --log-every 2 --out /tmp/bench_dist_cpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SOURCES = ["train/questions.tsv", "train/wordnet_glosses.tsv#3", "train/wordnet_examples.txt",
           "train/wiki_summaries.jsonl", "train/wiki_paragraphs.jsonl"]


# ------------------------------------------------------------------------------------------------ workers
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def worker_capture(a: argparse.Namespace) -> None:
    import torch

    from leafkd.capture.teacher import capture
    from leafkd.data.sources import load_corpus
    from leafkd.models import load_model
    from leafkd.runtime import distributed as d
    from leafkd.runtime.devices import pick_device
    from leafkd.runtime.encode import encode

    d.init_from_env(a.device)
    dev = pick_device(a.device)
    model = load_model(a.teacher, device=str(dev))
    if dev.type == "cuda":
        model.to(torch.bfloat16)  # as capture() does when it loads the teacher itself
    corpus = load_corpus([a.texts_file])
    encode(model, corpus.texts[: a.warmup], batch_tokens=a.batch_tokens, device=dev)  # warm-up, not stored
    _sync()
    d.barrier()
    t0 = time.perf_counter()
    store = capture(a.teacher, corpus, a.store, shard_size=a.shard_size, batch_tokens=a.batch_tokens,
                    device=a.device, show_progress=False, model=model)
    _sync()
    d.barrier()
    dt = time.perf_counter() - t0
    if d.is_main():
        Path(a.result).write_text(json.dumps({"texts": store.count, "seconds": dt, "texts_per_s": store.count / dt,
                                              "shards": len(store.manifest["shards"]), "world": d.world_size(),
                                              "device": str(dev)}))
    d.shutdown()


def worker_train(a: argparse.Namespace) -> None:
    from leafkd import load_config, train
    from leafkd.runtime import distributed as d

    d.init_from_env(a.device)
    world = d.world_size()
    batch = a.batch_per_gpu * (1 if a.strong else world)
    cfg = load_config(None, student=a.student, student_layers=a.student_layers, projection="always",
                      data=[a.texts_file], vectors=a.store, heldout=a.heldout, max_steps=a.steps, batch_size=batch,
                      eval_every=0, checkpoint_every=0, log_every=a.log_every, output=a.run_dir, progress=False,
                      plot=False, device=a.device, resume=False, compile=a.compile, ridge_samples=a.ridge_samples)
    t0 = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - t0
    if d.is_main():
        recs = [json.loads(l) for l in (Path(a.run_dir) / "metrics.jsonl").read_text().splitlines()]
        train_recs = [r for r in recs if r.get("type") == "train"]
        timed = train_recs[1:] or train_recs  # the first interval holds the warm-up
        samples, seconds, prev = 0.0, 0.0, (train_recs[0]["step"] if len(train_recs) > 1 else 0)
        for r in timed:
            n = (r["step"] - prev) * batch
            samples += n
            seconds += n / r["samples_per_s"]
            prev = r["step"]
        Path(a.result).write_text(json.dumps({
            "world": world, "global_batch": batch, "steps": result["steps"], "samples_per_s": samples / seconds,
            "timed_steps": int(samples // batch), "wall_s": wall, "final_loss": train_recs[-1]["loss"],
            "heldout_cos_mean": result["final"]["heldout_cos_mean"]}))
    d.shutdown()


# ------------------------------------------------------------------------------------------------ launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, worker: str, extra: list[str], log_path: Path, timeout: int, env: dict) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(Path(__file__).resolve()), "--worker", worker, *extra]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=REPO)
    if r.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"torchrun {worker} with {world} process(es) failed (exit {r.returncode}); log {log_path}:\n{tail}")
    print(f"  {worker} x{world}: done in {time.perf_counter() - t0:.0f} s (incl. start-up)", flush=True)


# ------------------------------------------------------------------------------------------------ FAISS
def faiss_check(vectors: np.ndarray, nq: int, k: int, ivf_lists: int, log) -> dict:
    """Single-GPU vs sharded-over-all-GPUs search results (or a CPU IndexShards emulation without faiss-gpu)."""
    try:
        import faiss
    except ImportError:
        return {"skipped": "FAISS is not installed"}
    from leafkd.retrieval.faiss_utils import gpu_count, index_to_gpu

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(0)
    q = x[rng.choice(len(x), size=min(nq, len(x)), replace=False)] + rng.normal(scale=0.01, size=(min(nq, len(x)), x.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ngpu = gpu_count()
    out: dict = {"gpus": ngpu, "faiss": faiss.__version__, "docs": len(x), "queries": len(q), "k": k, "indexes": {}}
    nlist = max(1, min(ivf_lists, len(x) // 39))
    for factory in ("Flat", f"IVF{nlist},Flat"):
        cpu = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not cpu.is_trained:
            cpu.train(x)
        cpu.add(x)
        if "IVF" in factory:
            faiss.extract_index_ivf(cpu).nprobe = min(16, nlist)
        rec: dict = {}
        if ngpu >= 2:
            one = index_to_gpu(cpu, shards=1)
            many = index_to_gpu(cpu, shards=-1)
            if "IVF" in factory:
                faiss.GpuParameterSpace().set_index_parameter(one, "nprobe", min(16, nlist))
                faiss.GpuParameterSpace().set_index_parameter(many, "nprobe", min(16, nlist))
            names = ("single_gpu", f"sharded_{ngpu}_gpus")
        else:
            # No multi-GPU FAISS: emulate the sharded index on the CPU (faiss.IndexShards over 2 halves).
            one = cpu
            many = faiss.IndexShards(x.shape[1], True, False)  # threaded, explicit ids per shard
            halves = []
            for part in np.array_split(np.arange(len(x)), 2):
                if "IVF" in factory:
                    sub = faiss.clone_index(cpu)  # the same trained coarse quantizer, half the vectors
                    sub.reset()
                else:
                    sub = faiss.IndexIDMap(faiss.IndexFlatIP(x.shape[1]))
                sub.add_with_ids(x[part], part.astype(np.int64))
                halves.append(sub)
                many.add_shard(sub)
            names = ("cpu", "cpu_IndexShards_2")
        timings = {}
        results = {}
        for name, index in zip(names, (one, many)):
            index.search(q[:64], k)  # warm-up
            t0 = time.perf_counter()
            d, i = index.search(q, k)
            timings[name] = time.perf_counter() - t0
            results[name] = (d, i)
        (d1, i1), (d2, i2) = results[names[0]], results[names[1]]
        same_ids = bool(np.array_equal(i1, i2))
        diff = ~np.all(i1 == i2, axis=1)
        # A differing row is acceptable only as a reordering among equal scores (ties).
        ties_only = bool(all(np.allclose(np.sort(d1[r]), np.sort(d2[r]), atol=1e-5) and set(i1[r]) == set(i2[r])
                             for r in np.flatnonzero(diff)))
        rec.update({"compared": list(names), "identical_ids": same_ids, "rows_differing": int(diff.sum()),
                    "differences_are_ties_only": ties_only, "max_score_diff": float(np.abs(d1 - d2).max()),
                    "qps": {n: len(q) / t for n, t in timings.items()}})
        out["indexes"][factory] = rec
        log(f"  FAISS {factory}: {names[0]} vs {names[1]}: identical ids {same_ids} "
            f"({int(diff.sum())} rows differ{', ties only' if diff.any() and ties_only else ''}), "
            f"max score diff {rec['max_score_diff']:.2e}")
    if ngpu < 2:
        out["note"] = (f"faiss sees {ngpu} GPU(s) ({'faiss-cpu' if not hasattr(faiss, 'StandardGpuResources') else 'faiss-gpu'}): "
                       "the sharded-GPU check is skipped; a CPU IndexShards emulation ran instead")
    return out


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True, help="teacher model folder")
    p.add_argument("--student", required=True, help="student base model folder")
    p.add_argument("--student-layers", type=int, default=None)
    p.add_argument("--data-dir", default=os.environ.get("LEAFKD_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--out", default="eval/results/bench_distributed")
    p.add_argument("--world-sizes", default="1,2", help="comma-separated process counts (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto: one GPU per process when CUDA is present, else CPU/gloo")
    p.add_argument("--texts", type=int, default=200000, help="texts captured (and trained on)")
    p.add_argument("--shard-size", type=int, default=None, help="capture shard size (default: texts/16)")
    p.add_argument("--batch-tokens", type=int, default=None, help="capture token budget per batch")
    p.add_argument("--warmup", type=int, default=2000, help="texts encoded before the timed capture")
    p.add_argument("--steps", type=int, default=200, help="training steps per run")
    p.add_argument("--batch-per-gpu", type=int, default=512, help="training texts per process per step")
    p.add_argument("--strong", action="store_true", help="fixed global batch (= --batch-per-gpu) instead of per GPU")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--heldout", type=int, default=1000)
    p.add_argument("--ridge-samples", type=int, default=20000)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--faiss-queries", type=int, default=10000)
    p.add_argument("--faiss-k", type=int, default=10)
    p.add_argument("--ivf-lists", type=int, default=1024)
    p.add_argument("--skip-capture", action="store_true", help="reuse OUT/work/store-w1 (captured earlier)")
    p.add_argument("--skip-train", action="store_true", help="reuse the training measurements in OUT/work")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per torchrun launch")
    # worker mode (launched by torchrun)
    p.add_argument("--worker", choices=["capture", "train"], help=argparse.SUPPRESS)
    for name in ("texts-file", "store", "result", "run-dir"):
        p.add_argument("--" + name, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker == "capture":
        worker_capture(a)
        return 0
    if a.worker == "train":
        worker_train(a)
        return 0

    import torch

    from leafkd.capture.store import VectorStore
    from leafkd.data.sources import load_corpus

    out = Path(a.out).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    worlds = [int(w) for w in a.world_sizes.split(",")]
    cuda = torch.cuda.is_available() and not a.device.startswith("cpu")
    ngpu = torch.cuda.device_count() if cuda else 0
    if cuda and max(worlds) > ngpu:
        raise SystemExit(f"--world-sizes {a.world_sizes} needs {max(worlds)} GPUs, {ngpu} visible")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # The same CPU threads per process for every world size (torchrun sets 1 only when N > 1).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(worlds))))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    if not cuda:
        env["LEAFKD_DIST_BACKEND"] = "gloo"
    device_name = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"bench_distributed: {device_name} x{ngpu if cuda else 1}, torch {torch.__version__}, world sizes {worlds}",
          flush=True)

    data_dir = Path(a.data_dir)
    sources = [str(data_dir / s) for s in SOURCES]
    corpus = load_corpus(sources, a.texts, 0)
    texts_file = work / "texts.jsonl"
    texts_file.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in corpus.texts))
    shard_size = a.shard_size or max(1, math.ceil(len(corpus.texts) / 16))
    common = ["--teacher", a.teacher, "--student", a.student, "--device", a.device, "--texts-file", str(texts_file)]
    report: dict = {"device": device_name, "gpus": ngpu, "torch": torch.__version__, "texts": len(corpus.texts),
                    "shard_size": shard_size, "teacher": a.teacher, "student": a.student,
                    "student_layers": a.student_layers, "capture": {}, "train": {}}

    if not a.skip_capture:
        for w in worlds:
            store, result = work / f"store-w{w}", work / f"capture-w{w}.json"
            if store.exists():
                import shutil

                shutil.rmtree(store)
            extra = [*common, "--store", str(store), "--result", str(result), "--shard-size", str(shard_size),
                     "--warmup", str(a.warmup)] + (["--batch-tokens", str(a.batch_tokens)] if a.batch_tokens else [])
            launch(w, "capture", extra, work / f"capture-w{w}.log", a.timeout, env)
            report["capture"][w] = json.loads(result.read_text())
    else:  # reuse the measurements of an earlier run in the same --out
        for w in worlds:
            if (work / f"capture-w{w}.json").exists():
                report["capture"][w] = {**json.loads((work / f"capture-w{w}.json").read_text()), "reused": True}
    # The stores of every world size must hold the same texts in the same order (and, given deterministic
    # math, the same vectors: on GPUs bf16 kernels may differ in the last bit between runs).
    ref = VectorStore.open(work / f"store-w{worlds[0]}")
    for w in worlds[1:]:
        if w in report["capture"]:
            other = VectorStore.open(work / f"store-w{w}")
            dv = float(np.abs(other.vectors().astype(np.float32) - ref.vectors().astype(np.float32)).max())
            report["capture"][w].update({"same_texts_as_w1": other.texts() == ref.texts(), "max_vector_diff_vs_w1": dv,
                                         "bit_equal_vs_w1": bool(np.array_equal(other.vectors(), ref.vectors()))})
    store_path = work / f"store-w{worlds[0]}"

    if a.skip_train:
        for w in worlds:
            if (work / f"train-w{w}.json").exists():
                report["train"][w] = {**json.loads((work / f"train-w{w}.json").read_text()), "reused": True}
    else:
        for w in worlds:
            result, run_dir = work / f"train-w{w}.json", work / f"run-w{w}"
            extra = [*common, "--store", str(store_path), "--result", str(result), "--run-dir", str(run_dir),
                     "--steps", str(a.steps), "--batch-per-gpu", str(a.batch_per_gpu), "--log-every", str(a.log_every),
                     "--heldout", str(a.heldout), "--ridge-samples", str(a.ridge_samples)]
            extra += (["--student-layers", str(a.student_layers)] if a.student_layers else []) \
                + (["--strong"] if a.strong else []) + (["--compile"] if a.compile else [])
            launch(w, "train", extra, work / f"train-w{w}.log", a.timeout, env)
            report["train"][w] = json.loads(result.read_text())
    report["train_scaling"] = "strong (fixed global batch)" if a.strong else "weak (fixed batch per GPU)"

    report["faiss"] = faiss_check(np.asarray(VectorStore.open(store_path).vectors()), a.faiss_queries, a.faiss_k,
                                  a.ivf_lists, log=print)

    # -- table
    base_w = worlds[0]
    rows = []
    for w in worlds:
        c, t = report["capture"].get(w), report["train"].get(w)
        rows.append({
            "world": w,
            "capture_texts_per_s": c["texts_per_s"] if c else None,
            "capture_speedup": c["texts_per_s"] / report["capture"][base_w]["texts_per_s"] if c else None,
            "train_samples_per_s": t["samples_per_s"] if t else None,
            "train_speedup": t["samples_per_s"] / report["train"][base_w]["samples_per_s"] if t else None,
            "global_batch": t["global_batch"] if t else None,
        })
    report["table"] = rows
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = ["| processes | capture texts/s | capture speed-up | train samples/s | train speed-up | global batch |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['world']} | {fmt(r['capture_texts_per_s'], '.0f')} | {fmt(r['capture_speedup'], '.2f')}x | "
                     f"{fmt(r['train_samples_per_s'], '.0f')} | {fmt(r['train_speedup'], '.2f')}x | {fmt(r['global_batch'], 'd')} |")
    fa = report["faiss"]
    faiss_lines = []
    if "indexes" in fa:
        for factory, rec in fa["indexes"].items():
            faiss_lines.append(f"- FAISS {factory}, {rec['compared'][0]} vs {rec['compared'][1]}: identical ids "
                               f"**{rec['identical_ids']}** ({rec['rows_differing']} of {fa['queries']} rows differ"
                               f"{', ties only' if rec['rows_differing'] and rec['differences_are_ties_only'] else ''}), "
                               f"max score diff {rec['max_score_diff']:.1e}; q/s "
                               + ", ".join(f"{n} {v:.0f}" for n, v in rec["qps"].items()))
    if fa.get("note") or fa.get("skipped"):
        faiss_lines.append(f"- note: {fa.get('note') or fa.get('skipped')}")
    md = [f"# Distributed scaling: {device_name} x{ngpu if cuda else 1}", "",
          f"{report['texts']} texts (capture shard size {shard_size}); teacher `{Path(a.teacher).name}`, student "
          f"`{Path(a.student).name}`" + (f" ({a.student_layers} layers)" if a.student_layers else "")
          + f"; training {a.steps} steps, {report.get('train_scaling', '-')}, torch {torch.__version__}.", "",
          *lines, "", *faiss_lines, ""]
    for w in worlds[1:]:
        c = report["capture"].get(w)
        if c:
            md.insert(-1, f"- capture with {w} processes: same texts as 1 process **{c['same_texts_as_w1']}**, "
                          f"vectors bit-equal {c['bit_equal_vs_w1']} (max diff {c['max_vector_diff_vs_w1']:.1e})")
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
