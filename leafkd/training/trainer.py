"""Training a student into the teacher's space (`train-embedder`).

One run: read the corpus, capture the teacher's vectors (or open a store / black-box vectors), hold out a
deterministic set of texts, build the student and warm-start its projection with ridge regression (step 0
is the linear-map baseline), then minimise the configured losses with AdamW, warm-up and cosine decay.
Checkpoints are whole-state (model, optimiser, schedule, data position, RNG) and written atomically, so a
killed run resumes where it stopped and reaches the same weights as an uninterrupted one.

Speed (the GPU path): texts are tokenised once; batches are packed (no padding: texts concatenated, attention
per text, see leafkd.packed) by a background thread into pinned memory, so they can be drawn at random like a
naive loop's; teacher vectors live on the device and are gathered by index;
bf16 autocast and fused AdamW on CUDA; the packed forward under `torch.compile` on CUDA.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leafkd import atomic
from leafkd.errors import LeafkdError
from leafkd.models import resolve_model
from leafkd.runtime import distributed as dist_
from leafkd.runtime.devices import autocast_dtype, pick_device
from leafkd.runtime.encode import encode_tokens
from leafkd.runtime.graphs import GraphedTrainStep, bucket_tokens, fixed_width
from leafkd.runtime.packed import PackedForward, pack, unsupported_reason
from leafkd.runtime.packed import supported as packed_supported
from leafkd.runtime.prefetch import prefetch
from leafkd.runtime.tokens import Tokenized, pad_batch, tokenize
from leafkd.student.build import build_student
from leafkd.student.info import write_student_info
from leafkd.student.warm_start import warm_start
from leafkd.training.alignment import heldout_alignment
from leafkd.training.batches import LengthGroupedBatches
from leafkd.training.checkpoints import list_checkpoints, rng_state, save_checkpoint, seed_everything, set_rng_state
from leafkd.training.config import TrainConfig, validate
from leafkd.training.data import bank_rows, prepare_data
from leafkd.training.metrics_log import MetricsLog, plot_curves
from leafkd.training.optim import lr_factor, make_loss, param_groups, set_dropout


def graphs_unsupported(cfg: TrainConfig, device: torch.device, world: int, packed: bool = True, forward=None,
                        autocast: torch.dtype | None = None) -> str | None:
    """None when the training step can be replayed as CUDA graphs; otherwise why not (one line). Without
    `forward` only what the config and device decide is checked (before any work)."""
    if not packed or str(cfg.packed).lower() == "false":
        return "needs packed training"
    if device.type != "cuda":
        return f"needs a CUDA device, not {device.type}"
    if world > 1:
        return "one process only (DDP's gradient hooks are not captured)"
    if cfg.grad_accum != 1:
        return "needs grad_accum 1"
    if cfg.dropout > 0:
        return "needs dropout 0"
    if forward is None:
        return None
    inner = getattr(forward, "_orig_mod", forward)
    if autocast is None or inner._attention_kind(torch.empty(1, device=device, dtype=autocast)) != "varlen":
        return "needs flash attention over packed texts (BERT-style student, bf16/fp16)"
    return None


def evaluate_student(model, tokens: Tokenized, teacher: np.ndarray, device: torch.device) -> dict[str, float]:
    if dist_.world_size() > 1:
        # Distributed: each rank embeds a contiguous slice of the held-out texts; the slices are gathered on
        # every rank (no rank idles while another evaluates) and the metrics computed on the whole set.
        lo, hi = dist_.split_range(len(tokens))
        vecs = dist_.gather_rows(encode_tokens(model, tokens.take(np.arange(lo, hi)), device=device))
        return heldout_alignment(vecs, teacher.astype(np.float32))
    vecs = encode_tokens(model, tokens, device=device)
    return heldout_alignment(vecs, teacher.astype(np.float32))


def train(cfg: TrainConfig, log=print) -> dict:
    """Run (or resume) training; returns the final held-out metrics and the model folder.

    Under `torchrun` (WORLD_SIZE > 1): DistributedDataParallel, each rank takes a contiguous slice of every
    global batch (see leafkd.distributed.local_batch); rank 0 logs, checkpoints and saves the model.
    """
    validate(cfg)
    dist_.init_from_env(cfg.device)
    world, is_main = dist_.world_size(), dist_.is_main()
    if not is_main:
        log = lambda *a, **k: None  # noqa: E731
    device = pick_device(cfg.device)
    if str(cfg.cuda_graphs).lower() == "true":  # fail before any work (the student-dependent check comes later)
        why_not = graphs_unsupported(cfg, device, world)
        if why_not is not None:
            raise LeafkdError(f"--cuda-graphs true: {why_not}")
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    data = prepare_data(cfg, out, log)
    teacher_dim = data.teacher.shape[1]

    normalize = str(cfg.normalize).lower()
    teacher_model_meta: dict[str, Any] = {"teacher": data.teacher_meta.get("teacher")}
    query_prompt = cfg.query_prompt
    teacher_normalizes = None
    if cfg.teacher is not None:
        teacher_path = resolve_model(cfg.teacher)
        teacher_cfg_modules = json.loads((teacher_path / "modules.json").read_text()) if (teacher_path / "modules.json").exists() else []
        teacher_normalizes = any(m.get("type", "").endswith("Normalize") for m in teacher_cfg_modules)
        if query_prompt is None:
            st_cfg = teacher_path / "config_sentence_transformers.json"
            prompts = json.loads(st_cfg.read_text()).get("prompts", {}) if st_cfg.exists() else {}
            query_prompt = prompts.get("query") or None
        teacher_model_meta["teacher"] = str(teacher_path)
    if normalize == "auto":
        if teacher_normalizes is None:
            norms = np.linalg.norm(data.teacher[:1000].astype(np.float32), axis=1)
            teacher_normalizes = bool(np.allclose(norms, 1.0, atol=1e-2))
        use_norm = teacher_normalizes
    else:
        use_norm = normalize == "true"

    student = build_student(cfg.student, teacher_dim, layers=cfg.student_layers, normalize=use_norm,
                            projection=cfg.projection, max_seq_length=cfg.max_seq_length)
    if query_prompt:
        student.prompts = {**student.prompts, "query": query_prompt}
    set_dropout(student, cfg.dropout)
    tokens, truncated = tokenize(student, data.texts)
    lengths = tokens.lengths
    heldout_tokens = tokens.take(data.heldout_idx)
    heldout_teacher = data.teacher[data.heldout_idx]
    log(f"{len(data.texts)} texts ({len(data.train_idx)} train, {len(data.heldout_idx)} held out), "
        f"teacher dim {teacher_dim}, {truncated} texts truncated to {student.max_seq_length} tokens")

    selector = None
    if cfg.select != "none" or cfg.drop_degenerate:
        from leafkd.training.selection import Selector

        # Teacher-only part of the selection (drops, clusters, dedup); the pool replaces the training texts.
        selector = Selector(cfg, data.texts, data.teacher, data.train_idx, data.weights, lengths, out, log, device)
        data.train_idx, data.weights = selector.initial()
    packed = str(cfg.packed).lower() == "true" or (str(cfg.packed).lower() == "auto" and packed_supported(student))
    if str(cfg.packed).lower() == "true" and not packed_supported(student):
        raise LeafkdError(f"--packed true: {unsupported_reason(student)}")
    sampler = LengthGroupedBatches(data.train_idx, data.weights, lengths, cfg.batch_size, cfg.seed, group=not packed)
    micro_per_epoch = sampler.expected_batches()
    steps_per_epoch = max(1, micro_per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))

    rng = np.random.default_rng(cfg.seed)
    teacher_sample_idx = np.sort(rng.choice(data.train_idx, size=min(len(data.train_idx), max(cfg.ridge_samples, 1)), replace=False))
    bank = None
    if cfg.bank > 0:
        rows = bank_rows(cfg, data)
        bank = data.teacher[rows].astype(np.float32)
        log(f"bank loss: {len(rows)} teacher vectors ({'--bank-data' if cfg.bank_data else 'sample of the training texts'})")
    loss_fn = make_loss(cfg, data.teacher[teacher_sample_idx].astype(np.float32), bank)

    ckpts = list_checkpoints(out) if cfg.resume else []
    state = None
    if ckpts:
        state = torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=False)
        if state["result_key"] != cfg.result_key():
            raise LeafkdError(f"{out} holds a run with other settings; use --no-resume or another --output")
        student.load_state_dict(state["model"])
        log(f"resuming from {ckpts[-1].name}")
    elif not cfg.resume and is_main and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")

    student.to(device)
    loss_fn.to(device)
    if state is None:
        # Step 0 is the ridge map: the baseline a trained student must beat.
        warm_start(student, [data.texts[i] for i in teacher_sample_idx], data.teacher[teacher_sample_idx].astype(np.float32),
                   alpha=cfg.ridge_alpha)
    if selector is not None:
        # Score the pool with the warm-started student and select (or restore the checkpoint's selection).
        if state is None:
            selector.start(student, tokens, sampler, exclude=teacher_sample_idx)  # the ridge fit's texts look easy
        else:
            selector.load_state_dict(state.get("selection"), sampler)
    student.train()
    set_dropout(student, cfg.dropout)

    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(student, cfg), betas=(0.9, 0.999), eps=1e-8, fused=fused)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    step, epoch, position = 0, 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        set_rng_state(state["rng"])
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if state is not None else None, readonly=not is_main)
    if state is None:
        metrics.records.clear()
        if is_main:
            atomic.write_text(out / "metrics.jsonl", "")

    teacher_dev = torch.from_numpy(np.ascontiguousarray(data.teacher)).to(device)
    autocast = autocast_dtype(cfg.precision, device)
    forward = PackedForward(student) if packed else student
    ddp = None
    if world > 1:
        forward = ddp = dist_.wrap_ddp(forward, device)  # after the warm start: DDP broadcasts rank 0's weights
    compile_mode = str(cfg.compile).lower()
    if compile_mode == "true" or (compile_mode == "auto" and packed and device.type == "cuda"):
        forward = torch.compile(forward, dynamic=True)
    pad_id = student.tokenizer.pad_token_id or 0
    graphed, graph_shapes = None, {}
    graphs_mode = str(cfg.cuda_graphs).lower()
    if graphs_mode != "false":
        why_not = graphs_unsupported(cfg, device, world, packed, forward if packed else None, autocast)
        if why_not is None:
            width = fixed_width(lengths[data.train_idx])
            graph_shapes = {"bucket": bucket_tokens(float(lengths[data.train_idx].mean()) * cfg.batch_size, width),
                            "width": width, "filler_id": pad_id}
            graphed = GraphedTrainStep(forward, loss_fn, list(student.parameters()), teacher_dev, autocast)
        elif graphs_mode == "true":
            raise LeafkdError(f"--cuda-graphs true: {why_not}")

    def run_eval() -> dict:
        student.eval()
        result = evaluate_student(student, heldout_tokens, heldout_teacher, device)
        student.train()
        set_dropout(student, cfg.dropout)
        record = {"type": "eval", "step": step, **result}
        metrics.write(record)
        log(f"step {step}: held-out cos {result['heldout_cos_mean']:.4f} (p5 {result['heldout_cos_p5']:.4f}), "
            f"top-10 agreement {result['top10_agreement']:.3f}")
        return result

    if state is None:
        baseline = run_eval()
        baseline_record = {"type": "baseline", "step": 0, "name": "ridge", **baseline}
        metrics.write(baseline_record)
    bar = None
    if cfg.progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", smoothing=0.05)

    def batch_stream(start_epoch: int, start_pos: int):
        e, pos = start_epoch, start_pos
        while True:
            batches = sampler.epoch(e)
            todo = batches[pos:]

            def make(k: int, todo=todo) -> dict:
                full = todo[k]
                idx, weight = dist_.local_batch(full)  # this rank's slice of the global batch (all of it: 1 process)
                item = {"idx": torch.from_numpy(idx), "real_tokens": int(lengths[full].sum()), "n": len(full),
                        "weight": weight}
                if packed:
                    item["packed"] = pack(tokens, idx, **graph_shapes)
                else:
                    ids, mask = pad_batch(tokens, idx, pad_id)
                    item["ids"], item["mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
                if world > 1 and cfg.relational > 0:
                    item["full"] = torch.from_numpy(full)  # in-batch relations span the whole global batch
                if device.type == "cuda":
                    for key in ("idx", "ids", "mask", "packed"):
                        if key in item:
                            item[key] = item[key].pin_memory()
                return item

            for k, item in enumerate(prefetch(make, len(todo))):
                yield e, pos + k + 1, item
            e, pos = e + 1, 0
            if selector is not None:
                selector.new_epoch(sampler)  # a refresh's selection takes effect at an epoch boundary

    stream = batch_stream(epoch, position)
    skipped = 0
    skipped_dev = torch.zeros((), device=device)
    t_last, samples_since, tokens_since = time.perf_counter(), 0, 0
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    part_sums: dict[str, torch.Tensor] = {}
    try:
        while step < total_steps:
            factor = lr_factor(step, total_steps, cfg.warmup)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * factor
            if graphed is None:  # the graphs zero their static gradient buffers themselves
                optimizer.zero_grad(set_to_none=True)
            total = None
            for micro in range(cfg.grad_accum):
                epoch, position, item = next(stream)
                if ddp is not None:  # DDP's no_sync(): all-reduce the gradients only on the last micro-batch
                    ddp.require_backward_grad_sync = micro == cfg.grad_accum - 1
                if graphed is not None:
                    loss, parts = graphed(item["packed"], item["idx"])
                    total = loss
                    for name, value in parts.items():
                        part_sums[name] = part_sums.get(name, 0.0) + value
                    samples_since += item["n"]
                    tokens_since += item["real_tokens"]
                    continue
                target = teacher_dev[item["idx"].to(device, non_blocking=True)].float()
                with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                    if packed:
                        emb = forward(item["packed"].to(device))
                    else:
                        ids = item["ids"].to(device, non_blocking=True)
                        mask = item["mask"].to(device, non_blocking=True)
                        emb = forward({"input_ids": ids, "attention_mask": mask})["sentence_embedding"]
                keys = teacher_dev[item["full"].to(device, non_blocking=True)].float() if "full" in item else None
                loss, parts = loss_fn(emb.float(), target, keys)
                if item["weight"] != 1.0:  # distributed, uneven split: the mean over ranks is the global-batch mean
                    loss = loss * item["weight"]
                    parts = {name: value * item["weight"] for name, value in parts.items()}
                for name, value in parts.items():
                    part_sums[name] = part_sums.get(name, 0.0) + value / cfg.grad_accum
                (loss / cfg.grad_accum).backward()
                total = loss.detach() if total is None else total + loss.detach()
                samples_since += item["n"]
                tokens_since += item["real_tokens"]
            total = total / cfg.grad_accum
            if world > 1:  # the global batch's loss, so every rank makes the same skip decision
                total = dist_.all_reduce_sum(total) / world
            if fused:
                # NaN/inf guard without a host sync: fused AdamW skips the update on the device when `found_inf`
                # is set (the GradScaler protocol), so the CPU keeps queueing work; skips are counted at log time.
                found_inf = (~torch.isfinite(total)).float()
                if cfg.clip > 0:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
                optimizer.found_inf, optimizer.grad_scale = found_inf, None
                optimizer.step()
                skipped_dev += found_inf
                loss_sum += torch.nan_to_num(total) * (1 - found_inf)
                loss_count += 1 - found_inf
            elif not torch.isfinite(total):
                # NaN/inf guard: drop this step's update; stop if it keeps happening.
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
            else:
                if cfg.clip > 0:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip)
                optimizer.step()
                loss_sum += total
                loss_count += 1
            step += 1
            if selector is not None and step < total_steps:
                selector.maybe_refresh(step, student, tokens)
            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                skipped += int(skipped_dev)
                skipped_dev.zero_()
                if skipped > 20:
                    raise LeafkdError(f"training diverged: {skipped} steps with non-finite loss; lower --lr")
                loss_count = float(loss_count)
                if world > 1 and part_sums:
                    reduced = dist_.all_reduce_sum(torch.stack([torch.as_tensor(v, device=device).float()
                                                                for v in part_sums.values()])) / world
                    part_sums = dict(zip(part_sums, reduced))
                mean_loss = float(loss_sum / max(loss_count, 1))
                rec = {"type": "train", "step": step, "epoch": epoch, "loss": mean_loss,
                       "lr": optimizer.param_groups[0]["lr"], "samples_per_s": samples_since / (now - t_last),
                       "tokens_per_s": tokens_since / (now - t_last), "skipped_steps": skipped,
                       "loss_parts": {k: float(v) / max(loss_count, 1) for k, v in part_sums.items()}}
                metrics.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4g}", sps=f"{rec['samples_per_s']:.0f}")
                loss_sum.zero_()
                loss_count = 0
                part_sums.clear()
                t_last, samples_since, tokens_since = now, 0, 0
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                run_eval()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(out, {"step": step, "epoch": epoch, "position": position, "model": student.state_dict(),
                                      "optimizer": optimizer.state_dict(), "rng": rng_state(),
                                      "result_key": cfg.result_key(), "config": asdict(cfg),
                                      "selection": selector.state_dict() if selector is not None else None},
                                cfg.keep_checkpoints)
    finally:
        if bar is not None:
            bar.close()

    graph_stats = None
    if graphed is not None:
        graph_stats = graphed.stats()
        log(f"CUDA graphs: {graph_stats['graphs']} captured, {graph_stats['replays']} replays, "
            f"{graph_stats['eager_steps']} eager steps"
            + (f"; off after a failed capture: {graph_stats['disabled']}" if graph_stats["disabled"] else ""))
        graphed = None  # frees the graphs' memory pool before the final evaluation
    final = run_eval()
    # The same metrics on as many training texts (a seeded sample): a gap to the held-out numbers is overfitting;
    # both low is what the student cannot fit at all (capacity), which more data or steps will not fix.
    fit_n = min(len(data.heldout_idx), len(data.train_idx))
    fit_idx = np.sort(np.random.default_rng(cfg.seed).choice(data.train_idx, fit_n, replace=False))
    student.eval()
    fit = evaluate_student(student, tokens.take(fit_idx), data.teacher[fit_idx], device)
    train_fit = {"cos_mean": fit["heldout_cos_mean"], "cos_p5": fit["heldout_cos_p5"], "texts": len(fit_idx)}
    metrics.write({"type": "train_fit", "step": step, **train_fit})
    log(f"training texts ({len(fit_idx)} sampled): cos {train_fit['cos_mean']:.4f} (p5 {train_fit['cos_p5']:.4f})")
    baseline = next((r for r in metrics.records if r.get("type") == "baseline"), None)
    model_dir = out / "model"
    info = {
        "leafkd_version": __import__("leafkd").__version__,
        "teacher": teacher_model_meta["teacher"],
        "teacher_fingerprint": data.fingerprint,
        "teacher_dim": teacher_dim,
        "student_dim": teacher_dim,
        "base": str(resolve_model(cfg.student)),
        "base_layers": cfg.student_layers,
        "normalize": use_norm,
        "query_prompt": query_prompt,
        "losses": {k: v for k, v in loss_fn.weights.items()},
        "data": cfg.data,
        "texts": len(data.texts),
        "heldout": len(data.heldout_idx),
        "steps": step,
        "config": asdict(cfg),
        "metrics": {"final": final, "ridge_baseline": {k: baseline[k] for k in final} if baseline else None,
                    "train_fit": train_fit},
        "selection": selector.summary_for_model() if selector is not None else None,
    }
    if is_main:
        with atomic.atomic_dir(model_dir) as tmp:
            student.to("cpu").save(str(tmp))
            write_student_info(tmp, info)
    save_checkpoint(out, {"step": step, "epoch": epoch, "position": position, "model": student.state_dict(),
                          "optimizer": optimizer.state_dict(), "rng": rng_state(), "result_key": cfg.result_key(),
                          "config": asdict(cfg), "selection": selector.state_dict() if selector is not None else None},
                    cfg.keep_checkpoints)
    if cfg.plot and is_main:
        plot_curves(metrics.records, out / "curves.png")
    dist_.barrier()  # the others return once rank 0 has written the model
    return {"model": str(model_dir), "final": final, "ridge_baseline": info["metrics"]["ridge_baseline"], "steps": step,
            "train_fit": train_fit, "cuda_graphs": graph_stats}


