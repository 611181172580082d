"""GPU speed benchmark (issue 5): leafkd's capture and training paths against the naive baselines, one run.

    python eval/bench_gpu.py --teacher models/all-mpnet-base-v2 --student models/all-MiniLM-L6-v2 \
        --data-dir ../shared/data --out eval/results/bench_gpu

Measures, on the same GPU and texts from ../shared/data/train:
- the GPU's bf16 matrix rate (8192^3 products), the ceiling for model FLOP utilisation (MFU);
- capture with the teacher: sentence-transformers `encode` (fp16 weights, batch 256) vs leafkd's path
  (one parallel tokenisation, length-sorted token-budget batches, bf16, prefetching), short texts and passages;
- training student + projection: the naive loop (tokenise per batch, pad to longest, fp32 weights with bf16
  autocast, AdamW) vs leafkd's `train` at the same batch size, same initialisation and steps, and the
  held-out cosine each reaches.
Prints a table and writes bench.json / bench.md to --out. On CPU it runs tiny sizes as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leafkd.data.sources import load_corpus
from leafkd.models import load_model  # noqa: E402
from leafkd.runtime.encode import default_batch_tokens, encode, encode_tokens
from leafkd.runtime.packed import PackedForward, pack
from leafkd.runtime.tokens import plan_batches, tokenize
from leafkd.training.alignment import heldout_alignment


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(device: torch.device) -> float:
    """Measured bf16 matrix rate in TFLOP/s (median of 10 products after 3 warm-ups, random data)."""
    if device.type != "cuda":
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / float(np.median(times)) / 1e12


def param_count(model) -> tuple[int, int, int, int]:
    """(non-embedding parameters, layers, hidden size) of the Transformer inside an ST model."""
    auto = model[0].auto_model
    emb = sum(p.numel() for n, p in auto.named_parameters() if "embeddings" in n)
    total = sum(p.numel() for p in model.parameters())
    cfg = auto.config
    return total - emb, cfg.num_hidden_layers, cfg.hidden_size, total


def flops_per_token(n_params: int, layers: int, hidden: int, seq: float, train: bool) -> float:
    """2N (+4 L d s attention) per token forward; three times that for forward + backward."""
    fwd = 2 * n_params + 4 * layers * hidden * seq
    return 3 * fwd if train else fwd


def texts_from(data_dir: Path, n_short: int, n_passages: int, seed: int = 0) -> tuple[list[str], list[str]]:
    train = data_dir / "train"
    short = load_corpus([str(train / "questions.tsv"), str(train / "wordnet_examples.txt"),
                         str(train / "sentences" / "movie_reviews.txt"), str(train / "sentences" / "product_reviews.txt")]).texts
    passages = load_corpus([str(train / "wiki_paragraphs.jsonl"), str(train / "wiki_summaries.jsonl")]).texts
    rng = np.random.default_rng(seed)

    def sample(texts: list[str], n: int) -> list[str]:
        # More than there are: the set repeats (throughput over a longer run; nothing caches results).
        order = np.concatenate([rng.permutation(len(texts)) for _ in range(-(-n // len(texts)))])[:n]
        return [texts[i] for i in order]

    return sample(short, n_short), sample(passages, n_passages)


def bench_capture(model_path: str, texts: list[str], device: torch.device, label: str, peak: float,
                  compile: bool = False) -> list[dict]:
    rows = []
    st = load_model(model_path, device=str(device))
    if device.type == "cuda":
        st.half()
    st.encode(texts[:512], batch_size=256)  # warm-up
    # The baseline's best of two passes: a single pass swung by up to 65% between H200 runs (passages: 1,200 vs
    # 1,978 texts/s), and every ratio below divides by it; the faster pass keeps the ratios conservative.
    times = []
    for _ in range(2):
        sync()
        t = time.perf_counter()
        ref = st.encode(texts, batch_size=256, convert_to_numpy=True)
        sync()
        times.append(time.perf_counter() - t)
    dt_st = min(times)
    del st
    model = load_model(model_path, device=str(device))
    if device.type == "cuda":
        model.to(torch.bfloat16)
    n_params, layers, hidden, _ = param_count(model)
    budget = default_batch_tokens(device)

    def row(name: str, dt: float, real: int, seq: float, **extra) -> dict:
        fpt = flops_per_token(n_params, layers, hidden, seq, train=False)
        return {"section": f"capture {label}", "method": name, "texts": len(texts), "seconds": dt,
                "texts_per_s": len(texts) / dt, "real_tokens_per_s": real / dt,
                "mfu": fpt * real / dt / (peak * 1e12) if peak == peak else None, **extra}

    tokens, _ = tokenize(model, texts)
    lengths = tokens.lengths
    real = int(lengths.sum())
    seq = float((lengths.astype(np.float64) ** 2).sum() / max(real, 1))  # token-weighted attention length
    rows.append(row("sentence-transformers encode (fp16, batch 256; best of 2 passes)", dt_st, real, seq,
                    seconds_passes=[round(x, 3) for x in times]))
    variants = [("leafkd capture path (packed, bf16)", {"packed": True}),
                ("leafkd capture path (padded, bf16)", {"packed": False})]
    if compile:
        variants.append(("leafkd capture path (packed, bf16, torch.compile)", {"packed": True, "compile": True}))
    for name, kw in variants:
        try:
            encode(model, texts[:4096], device=device, **kw)  # warm-up (and compilation)
            sync()
            t = time.perf_counter()
            ours = encode(model, texts, device=device, **kw)  # tokenisation included, pipelined
            sync()
            dt = time.perf_counter() - t
        except Exception as e:  # a variant that fails is reported, not fatal
            rows.append({"section": f"capture {label}", "method": name, "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        batches = plan_batches(lengths, budget)
        padded = sum(int(lengths[b].max()) * len(b) for b in batches)
        cos = float(np.mean(np.sum(ref * ours, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(ours, axis=1))))
        rows.append(row(name, dt, real, seq, ratio=dt_st / dt, cosine_to_st_output=cos,
                        padding_fraction=0.0 if kw["packed"] else 1 - real / padded))
    rows += bench_capture_command(model_path, texts, device, label, dt_st, row, real, seq,
                                  model=model if compile else None)
    # The device-side ceiling: the packed forward alone over batches already on the GPU (no tokenisation,
    # no host copies), to show how much of the end-to-end time is host work.
    if device.type == "cuda":
        forward = PackedForward(model)
        ready = [pack(tokens, b).to(device) for b in plan_batches(lengths, budget)]
        with torch.inference_mode():
            for p in ready[:2]:
                forward(p)
            sync()
            t = time.perf_counter()
            for p in ready:
                forward(p)
            sync()
        dt = time.perf_counter() - t
        rows.append(row("packed forward only (batches on the GPU)", dt, real, seq, ratio=dt_st / dt))
        del ready, forward
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def bench_capture_command(model_path: str, texts: list[str], device: torch.device, label: str, dt_st: float, row,
                          real: int, seq: float, model=None) -> list[dict]:
    """What users run: `leafkd.capture` into a fresh store (compile auto, store writes overlapped), and the
    `leafkd capture` command as a process (start-up and model load included), both end to end. With `model` (the
    bench's loaded teacher, its compiled forward warm): also the store path at steady state, compiled, as a
    capture large enough for auto-compile (AUTO_COMPILE_TEXTS) runs once the compilation is done."""
    import subprocess
    import sys
    import tempfile

    from leafkd import capture
    from leafkd.data.sources import load_corpus

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "texts.txt"
        src.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
        corpus = load_corpus([str(src)])
        sync()
        t = time.perf_counter()
        capture(model_path, corpus, Path(tmp) / "store", show_progress=False, device=str(device))
        sync()
        dt = time.perf_counter() - t
        rows.append(row("leafkd.capture into the store (compile auto)", dt, real, seq, ratio=dt_st / dt))
        if model is not None:
            sync()
            t = time.perf_counter()
            capture(model_path, corpus, Path(tmp) / "store-warm", show_progress=False, device=str(device),
                    model=model, compile=True)
            sync()
            dt = time.perf_counter() - t
            rows.append(row("leafkd.capture into the store (model loaded, compiled, warm)", dt, real, seq,
                            ratio=dt_st / dt))
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "leafkd", "capture", "--teacher", model_path, "--data", str(src),
                               "--out", str(Path(tmp) / "cli-store"), "--quiet"], capture_output=True, text=True)
        dt = time.perf_counter() - t
        if done.returncode != 0:
            rows.append({"section": f"capture {label}", "method": "leafkd capture (command)",
                         "error": done.stderr.strip().splitlines()[-1][:300] if done.stderr.strip() else "failed"})
        else:
            rows.append(row("leafkd capture (command: start-up, load, capture, store)", dt, real, seq,
                            ratio=dt_st / dt))
    return rows


def naive_train(student, texts: list[str], teacher: np.ndarray, train_idx: np.ndarray, steps: int, batch: int,
                cfg, device: torch.device, seed: int) -> tuple[dict, object]:
    """The plain loop a user writes first: tokenise per batch, pad to longest, fp32 + bf16 autocast, AdamW."""
    from leafkd.training.optim import lr_factor, param_groups

    tok = student.tokenizer
    max_len = student.max_seq_length
    opt = torch.optim.AdamW(param_groups(student, cfg), betas=(0.9, 0.999), eps=1e-8)
    base = [g["lr"] for g in opt.param_groups]
    student.train()
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(train_idx) for _ in range(math.ceil(steps * batch / len(train_idx)) + 1)])
    real_tokens = padded_tokens = 0
    warm = 5
    t0 = None
    for step in range(steps):
        if step == warm:
            sync()
            t0 = time.perf_counter()
            real_tokens = padded_tokens = 0
        idx = order[step * batch : (step + 1) * batch]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        real_tokens += int(enc["attention_mask"].sum())
        padded_tokens += enc["attention_mask"].numel()
        feats = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
        target = torch.from_numpy(teacher[idx].astype(np.float32)).to(device)
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * lr_factor(step, steps, cfg.warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            emb = student(feats)["sentence_embedding"]
        loss = (emb.float() - target).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
        opt.step()
    sync()
    dt = time.perf_counter() - t0
    timed = steps - warm
    return {"samples_per_s": timed * batch / dt, "real_tokens_per_s": real_tokens / dt,
            "padding_fraction": 1 - real_tokens / max(padded_tokens, 1)}, student


def bench_training(args, device: torch.device, peak: float, out: Path) -> list[dict]:
    from leafkd import build_student, capture, load_config, train
    from leafkd.student.warm_start import warm_start
    from leafkd.training.data import prepare_data
    from leafkd.training.optim import set_dropout

    train_dir = Path(args.data_dir) / "train"
    sources = [str(train_dir / f) for f in ("questions.tsv", "wordnet_examples.txt", "wiki_paragraphs.jsonl",
                                            "wiki_summaries.jsonl")] + [str(p) for p in sorted((train_dir / "sentences").glob("*.txt"))]
    work = out / "work"
    store_dir = work / "teacher-vectors"
    corpus = load_corpus(sources, args.train_texts, seed=0)
    t = time.perf_counter()
    store = capture(args.teacher, corpus, store_dir, show_progress=False, device=str(device))
    capture_s = time.perf_counter() - t
    rows = [{"section": "capture mixed corpus into the store", "method": "leafkd capture (teacher, bf16, store writes)",
             "texts": store.count, "seconds": capture_s, "texts_per_s": store.count / capture_s}]
    common = dict(teacher=args.teacher, student=args.student, data=sources, max_texts=args.train_texts,
                  vectors=str(store_dir), heldout=2000, batch_size=args.batch, max_steps=args.steps, lr=2e-4,
                  projection_lr=1e-3, eval_every=0, checkpoint_every=0, log_every=10, progress=False, plot=False,
                  device=str(device), resume=False)
    results: dict[str, tuple] = {}
    variants = [("leafkd train (packed; defaults: compiled, CUDA graphs)", "run", {"packed": "true"})]
    if device.type == "cuda":  # texts packed into rows, row attention (opt-in: --packed-attention rows)
        variants.append(("leafkd train (packed, compiled, CUDA graphs; row attention)", "run-rows",
                         {"packed": "true", "packed_attention": "rows"}))
    if args.no_graphs_train:
        variants.append(("leafkd train (packed, compiled, no CUDA graphs)", "run-nographs",
                         {"packed": "true", "cuda_graphs": "false"}))
    if args.eager_train:
        variants.append(("leafkd train (packed, eager)", "run-eager", {"packed": "true", "compile": "false"}))
    if args.padded_train:
        variants.append(("leafkd train (padded, length-grouped)", "run-padded", {"packed": "false"}))
    if args.big_batch:  # throughput at a batch the naive loop is not run at (not part of the ratio)
        variants.append((f"leafkd train (packed, torch.compile, batch {args.big_batch}; no naive counterpart)",
                         "run-big", {"packed": "true", "compile": True, "batch_size": args.big_batch}))
    for label, folder, extra in variants:
        cfg = load_config(None, output=str(work / folder), **{**common, **extra})
        t = time.perf_counter()
        try:
            res = train(cfg)
        except Exception as e:  # a variant that fails is reported, not fatal
            rows.append({"section": f"training (batch {args.batch}, {args.steps} steps)", "method": label,
                         "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        wall = time.perf_counter() - t
        recs = [json.loads(l) for l in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
        tr = [r for r in recs if r["type"] == "train"][1:]  # skip the first window (warm-up)
        sps = float(np.median([r["samples_per_s"] for r in tr]))
        tps = float(np.median([r["tokens_per_s"] for r in tr]))
        graphs = res.get("cuda_graphs")
        graphs = (f"{graphs['graphs']} graphs, {graphs['replays']} replays, {graphs['eager_steps']} eager"
                  + (f"; off: {graphs['disabled']}" if graphs["disabled"] else "")) if graphs else "off"
        results[label] = (sps, tps, res["final"]["heldout_cos_mean"], wall, cfg.batch_size, graphs)
    # The naive loop, from the same initialisation (same data split, same ridge warm start).
    cfg = load_config(None, output=str(work / "naive"), **common)
    data = prepare_data(cfg, Path(cfg.output))
    student = build_student(args.student, data.teacher.shape[1], projection="auto", normalize=True)
    set_dropout(student, cfg.dropout)
    student.to(device)
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(data.train_idx, size=min(len(data.train_idx), cfg.ridge_samples), replace=False))
    warm_start(student, [data.texts[i] for i in sample], data.teacher[sample].astype(np.float32), alpha=cfg.ridge_alpha)
    t = time.perf_counter()
    naive_stats, student = naive_train(student, data.texts, data.teacher, data.train_idx, args.steps, args.batch, cfg, device, 0)
    naive_wall = time.perf_counter() - t
    student.eval()
    held = [data.texts[i] for i in data.heldout_idx]
    tokens, _ = tokenize(student, held)
    naive_cos = heldout_alignment(encode_tokens(student, tokens, device=device), data.teacher[data.heldout_idx].astype(np.float32))["heldout_cos_mean"]
    n_params, layers, hidden, _ = param_count(student)
    lengths = tokenize(student, data.texts)[0].lengths
    fpt = flops_per_token(n_params, layers, hidden, float(lengths.mean()), train=True)
    proj_flops = 6 * hidden * data.teacher.shape[1]  # per sample, forward + backward of the projection
    rows.append({"section": f"training (batch {args.batch}, {args.steps} steps)", "method": "naive loop",
                 "samples_per_s": naive_stats["samples_per_s"], "real_tokens_per_s": naive_stats["real_tokens_per_s"],
                 "padding_fraction": naive_stats["padding_fraction"], "heldout_cos": naive_cos, "seconds": naive_wall,
                 "mfu": (fpt * naive_stats["real_tokens_per_s"] + proj_flops * naive_stats["samples_per_s"]) / (peak * 1e12) if peak == peak else None})
    for label, (sps, tps, cos, wall, batch, graphs) in results.items():
        same = batch == args.batch  # ratios and cosine differences only at the naive loop's batch size
        rows.append({"section": f"training (batch {batch}, {args.steps} steps)", "method": label,
                     "samples_per_s": sps, "real_tokens_per_s": tps, "heldout_cos": cos, "seconds": wall,
                     "ratio": sps / naive_stats["samples_per_s"] if same else None, "cuda_graphs": graphs,
                     "heldout_cos_diff_vs_naive": cos - naive_cos if same else None,
                     "mfu": (fpt * tps + proj_flops * sps) / (peak * 1e12) if peak == peak else None})
    if args.profile:
        default = results.get("leafkd train (packed; defaults: compiled, CUDA graphs)")
        rows += profile_training(common, work, device, 1000 * args.batch / default[0] if default else float("nan"))
    return rows


KERNEL_KINDS = [  # (kind, substrings of a CUDA kernel's name), first match wins
    ("attention (flash)", ("flash", "fmha", "attention")),
    ("matmul (cuBLAS/CUTLASS)", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk")),
    ("optimizer (fused AdamW, grad norm)", ("adam", "multi_tensor", "foreach", "norm_kernel")),
    ("compiled elementwise/reductions (Triton)", ("triton",)),
    ("copies and fills", ("memcpy", "memset", "copy", "fill", "cat", "index")),
    ("other elementwise/reductions (eager)", ("elementwise", "reduce", "vectorized", "unrolled")),
]


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other")


def profile_training(common: dict, work: Path, device: torch.device, step_ms: float, wait: int = 40,
                     active: int = 30) -> list[dict]:
    """Where a training step's time goes: torch.profiler over `active` steady-state steps of `leafkd train` (packed,
    compiled, CUDA graphs off: a replayed graph hides its kernels from the profiler), GPU kernel time by kind per
    step, as a share of `step_ms` (the unprofiled default step, CUDA graphs on; the profiler slows the host, so the
    profiled steps' own wall time is only recorded); the rest of `step_ms` is time the GPU waits for the host. The
    step count is patched in through the TrainStep class so the profiler's schedule advances once per step."""
    if device.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile, schedule

    from leafkd import load_config, train
    from leafkd.training import steps as steps_module

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=wait, warmup=5, active=active, repeat=1))
    marks: list[float] = []
    original = steps_module.TrainStep.__call__

    def stepped(self, batches, stats):
        position = original(self, batches, stats)
        prof.step()
        if prof.step_num in (wait + 5, wait + 5 + active):  # the active window's edges
            torch.cuda.synchronize()
            marks.append(time.perf_counter())
        return position

    cfg = load_config(None, output=str(work / "run-profile"), **{**common, "max_steps": wait + active + 10,
                                                                  "packed": "true", "cuda_graphs": "false"})
    steps_module.TrainStep.__call__ = stepped  # type: ignore[method-assign]
    try:
        with prof:
            train(cfg)
    finally:
        steps_module.TrainStep.__call__ = original  # type: ignore[method-assign]
    kernels: dict[str, float] = {}
    by_kind: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0) or 0
        if us <= 0 or str(getattr(event, "device_type", "")).endswith("CPU"):
            continue
        if getattr(event, "is_user_annotation", False) or event.key.startswith("ProfilerStep") or "#" in event.key:
            continue  # GPU-side ranges of annotations (the profiler's step, Optimizer.step#...), not kernels
        kernels[event.key] = kernels.get(event.key, 0) + us
        by_kind[kernel_kind(event.key)] = by_kind.get(kernel_kind(event.key), 0) + us
    window_ms = 1000 * (marks[1] - marks[0]) / active if len(marks) == 2 else float("nan")
    busy_ms = sum(by_kind.values()) / 1000 / active
    section = f"training step profile (batch {common['batch_size']}; GPU kernel ms per step, share of the default step)"
    ranked = sorted(by_kind.items(), key=lambda kv: -kv[1])
    rows = [{"section": section, "method": kind, "ms_per_step": us / 1000 / active,
             "share_of_step": us / 1000 / active / step_ms} for kind, us in ranked]
    rows.append({"section": section, "method": "GPU waiting for the host (default step - kernel time)",
                 "ms_per_step": step_ms - busy_ms, "share_of_step": 1 - busy_ms / step_ms})
    rows.append({"section": section, "method": "default step (CUDA graphs, unprofiled)", "ms_per_step": step_ms,
                 "share_of_step": 1.0})
    rows.append({"section": section, "method": "profiled step (graphs off, profiler overhead; not a speed)",
                 "ms_per_step": window_ms})
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:15]
    (work.parent / "profile_top_kernels.json").write_text(json.dumps(
        [{"kernel": k, "kind": kernel_kind(k), "ms_per_step": us / 1000 / active} for k, us in top], indent=2))
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if v != v:
            return ""
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--data-dir", default=os.environ.get("LEAFKD_DATA", "../shared/data"))
    p.add_argument("--out", default="eval/results/bench_gpu")
    p.add_argument("--short", type=int, default=100000, help="short texts for the capture benchmark")
    p.add_argument("--passages", type=int, default=15000,
                   help="passages for the capture benchmark (15,650 exist; more repeat them)")
    p.add_argument("--train-texts", type=int, default=200000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--compile", action="store_true", help="also time capture under torch.compile")
    p.add_argument("--eager-train", action="store_true", help="also time packed training without torch.compile")
    p.add_argument("--no-graphs-train", action="store_true", help="also time compiled packed training without CUDA graphs")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--padded-train", action="store_true", help="also time training with padded, length-grouped batches")
    p.add_argument("--big-batch", type=int, default=0, help="also time compiled packed training at this batch size")
    p.add_argument("--skip-capture", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="also profile training steps (GPU kernel time by kind, GPU idle share) with torch.profiler")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak(device)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {gpu}; measured bf16 matmul: {peak:.0f} TFLOP/s", flush=True)
    from leafkd.runtime.packed import varlen_attention

    attention = "flash varlen" if varlen_attention() is not None and device.type == "cuda" else "padded SDPA"
    print(f"packed attention for BERT students: {attention}", flush=True)
    rows: list[dict] = []
    cols = ["section", "method", "texts_per_s", "samples_per_s", "real_tokens_per_s", "ratio", "padding_fraction",
            "mfu", "heldout_cos", "heldout_cos_diff_vs_naive", "cosine_to_st_output", "cuda_graphs", "seconds",
            "ms_per_step", "share_of_step", "error"]

    def save() -> str:
        # Written after every section, so a run cut short still leaves what it measured.
        lines = [f"GPU: {gpu}; bf16 matmul {peak:.0f} TFLOP/s; torch {torch.__version__}; packed attention "
                 f"(BERT): {attention}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            lines.append("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
        table = "\n".join(lines)
        (out / "bench.json").write_text(json.dumps({"gpu": gpu, "peak_tflops": peak, "attention": attention,
                                                    "args": vars(args), "rows": rows}, indent=2))
        (out / "bench.md").write_text(table + "\n")
        return table

    if not args.skip_capture:
        short, passages = texts_from(Path(args.data_dir), args.short, args.passages)
        for label, texts in (("short texts", short), ("passages", passages)):
            new = bench_capture(args.teacher, texts, device, label, peak, compile=args.compile)
            rows += new
            for r in new:
                print(json.dumps(r), flush=True)
            save()
    if not args.skip_training:
        rows += bench_training(args, device, peak, out)
    print(save())

if __name__ == "__main__":
    main()
