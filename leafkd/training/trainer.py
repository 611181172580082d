"""Training a student into the teacher's space (`train-embedder`).

One run: read the corpus, capture the teacher's vectors (or open a store / black-box vectors), hold out a
deterministic set of texts, build the student and warm-start its projection with ridge regression (step 0
is the linear-map baseline), then minimise the configured losses with AdamW, warm-up and cosine decay.
Checkpoints are whole-state (model, optimiser, schedule, data position, RNG) and written atomically, so a
killed run resumes where it stopped and reaches the same weights as an uninterrupted one.

Speed (the GPU path): batches are packed and prefetched (leafkd.training.loader); teacher vectors live on the
device and are gathered by index; bf16 autocast and fused AdamW on CUDA; the packed forward under
`torch.compile`, and the whole step replayed as CUDA graphs where possible (leafkd.training.steps).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leafkd import __version__ as leafkd_version
from leafkd import atomic
from leafkd.errors import LeafkdError
from leafkd.models import resolve_model
from leafkd.runtime import distributed as dist_
from leafkd.runtime.devices import autocast_dtype, pick_device, use_deterministic_kernels
from leafkd.runtime.encode import encode_tokens
from leafkd.runtime.graphs import GraphedTrainStep, bucket_rows, bucket_tokens, fixed_width
from leafkd.runtime.tokens import Tokenized, tokenize
from leafkd.student.info import write_student_info
from leafkd.student.warm_start import warm_start
from leafkd.training.alignment import heldout_alignment
from leafkd.training.batches import LengthGroupedBatches
from leafkd.training.checkpoints import list_checkpoints, rng_state, save_checkpoint, seed_everything, set_rng_state
from leafkd.training.config import SelectMode, TrainConfig, TriState, validate
from leafkd.training.data import bank_rows, prepare_data
from leafkd.training.loader import BatchLoader
from leafkd.training.metrics_log import MetricsLog, plot_curves
from leafkd.training.model_setup import make_student, teacher_settings, training_forward, use_packed, use_rows
from leafkd.training.optim import lr_factor, make_loss, param_groups, set_dropout
from leafkd.training.selection import Selector
from leafkd.training.steps import StepStats, TrainStep, graphs_unsupported

logger = logging.getLogger(__name__)


def evaluate_student(model, tokens: Tokenized, teacher: np.ndarray, device: torch.device) -> dict[str, float]:
    """Alignment of the student's vectors of `tokens` to the teacher's (`teacher`, row-aligned)."""
    if dist_.world_size() > 1:
        # Distributed: each rank embeds a contiguous slice of the held-out texts; the slices are gathered on
        # every rank (no rank idles while another evaluates) and the metrics computed on the whole set.
        lo, hi = dist_.split_range(len(tokens))
        local = encode_tokens(model, tokens.take(np.arange(lo, hi)), device=device)
        assert local is not None
        return heldout_alignment(dist_.gather_rows(local), teacher.astype(np.float32))
    vecs = encode_tokens(model, tokens, device=device)
    assert vecs is not None
    return heldout_alignment(vecs, teacher.astype(np.float32))


class Trainer:
    """One training run of a TrainConfig: everything is set up on construction; `run()` trains and saves."""

    def __init__(self, cfg: TrainConfig):
        started = time.perf_counter()
        validate(cfg)
        self.cfg = cfg
        dist_.init_from_env(cfg.device)
        self.world, self.is_main = dist_.world_size(), dist_.is_main()
        self.device = pick_device(cfg.device)
        if cfg.cuda_graphs == TriState.TRUE:  # fail before any work (the student-dependent check comes later)
            why_not = graphs_unsupported(cfg, self.device, self.world)
            if why_not is not None:
                raise LeafkdError(f"--cuda-graphs true: {why_not}")
        self.out = Path(cfg.output)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.deterministic:
            use_deterministic_kernels()
        seed_everything(cfg.seed)
        self.data = prepare_data(cfg, self.out)
        self.setup_student()
        self.setup_sampler()
        self.setup_loss()
        state = self.load_checkpoint()
        self.setup_weights(state)
        self.setup_optimiser(state)
        self.setup_step()
        if state is None:
            baseline = self.evaluate()
            self.metrics.write({"type": "baseline", "step": 0, "name": "ridge", **baseline})
        # Where a run's time goes (the capture inside the set-up is counted apart): summary.json and metrics.jsonl.
        setup = time.perf_counter() - started
        self.seconds = {"capture": self.data.capture_seconds, "setup": setup - self.data.capture_seconds}

    # -- setup, in the order a resumed run must repeat (each part may draw from the seeded RNGs) ----------------
    def setup_student(self) -> None:
        """The teacher's settings, the student, and every text tokenised once."""
        data, cfg = self.data, self.cfg
        self.teacher_dim = data.teacher.shape[1]
        self.teacher = teacher_settings(cfg, data.teacher, data.teacher_meta.get("teacher"))
        self.student = make_student(cfg, self.teacher_dim, self.teacher)
        self.tokens, truncated = tokenize(self.student, data.texts)
        self.heldout_tokens = self.tokens.take(data.heldout_idx)
        logger.info(f"{len(data.texts)} texts ({len(data.train_idx)} train, {len(data.heldout_idx)} held out), "
                    f"teacher dim {self.teacher_dim}, {truncated} texts truncated to {self.student.max_seq_length} "
                    "tokens")

    def setup_sampler(self) -> None:
        """Data selection's teacher-only part (drops, clusters, dedup), the batch sampler and the step count."""
        cfg, data = self.cfg, self.data
        self.selector = None
        if cfg.select != SelectMode.NONE or cfg.drop_degenerate:
            # Teacher-only part of the selection (drops, clusters, dedup); the pool replaces the training texts.
            self.selector = Selector(cfg, data.texts, data.teacher, data.train_idx, data.weights, self.tokens.lengths,
                                     self.out, self.device)
            data.train_idx, data.weights = self.selector.initial()
        self.packed = use_packed(cfg, self.student)
        self.sampler = LengthGroupedBatches(data.train_idx, data.weights, self.tokens.lengths, cfg.batch_size,
                                            cfg.seed, group=not self.packed)
        steps_per_epoch = max(1, self.sampler.expected_batches() // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))

    def setup_loss(self) -> None:
        """The ridge fit's texts (also LELP's sample of teacher vectors), the bank and the combined loss."""
        cfg, data = self.cfg, self.data
        rng = np.random.default_rng(cfg.seed)
        size = min(len(data.train_idx), max(cfg.ridge_samples, 1))
        self.ridge_idx = np.sort(rng.choice(data.train_idx, size=size, replace=False))
        bank = None
        if cfg.bank > 0:
            rows = bank_rows(cfg, data)
            bank = data.teacher[rows].astype(np.float32)
            named = " and ".join(name for name, on in (("--bank-data", cfg.bank_data), ("--bank-from-adapt",
                                 cfg.bank_from_adapt)) if on) or "sample of the training texts"
            logger.info(f"bank loss: {len(rows)} teacher vectors ({named})")
        self.loss_fn = make_loss(cfg, data.teacher[self.ridge_idx].astype(np.float32), bank)

    def load_checkpoint(self) -> dict | None:
        """The latest checkpoint's state when resuming (its weights loaded into the student); else None (a fresh
        run clears old checkpoints)."""
        cfg, out = self.cfg, self.out
        ckpts = list_checkpoints(out) if cfg.resume else []
        if not ckpts:
            if not cfg.resume and self.is_main and (out / "checkpoints").exists():
                shutil.rmtree(out / "checkpoints")
            return None
        state = torch.load(ckpts[-1] / "state.pt", map_location="cpu", weights_only=False)
        if state["result_key"] != cfg.result_key():
            raise LeafkdError(f"{out} holds a run with other settings; use --no-resume or another --output")
        self.student.load_state_dict(state["model"])
        logger.info(f"resuming from {ckpts[-1].name}")
        return state

    def setup_weights(self, state: dict | None) -> None:
        """The student on its device: the ridge warm start and the first selection, or the checkpoint's."""
        data = self.data
        self.student.to(self.device)
        self.loss_fn.to(self.device)
        if state is None:
            # Step 0 is the ridge map: the baseline a trained student must beat.
            warm_start(self.student, [data.texts[i] for i in self.ridge_idx],
                       data.teacher[self.ridge_idx].astype(np.float32), alpha=self.cfg.ridge_alpha)
        if self.selector is not None:
            # Score the pool with the warm-started student and select (or restore the checkpoint's selection).
            if state is None:  # the ridge fit's texts look easy: they are not scored
                self.selector.start(self.student, self.tokens, self.sampler, exclude=self.ridge_idx)
            else:
                self.selector.load_state_dict(state.get("selection"), self.sampler)
        self.student.train()
        set_dropout(self.student, self.cfg.dropout)

    def setup_optimiser(self, state: dict | None) -> None:
        """AdamW (fused on CUDA), the data position and RNGs of a resumed run, and the metrics log."""
        self.optimizer = torch.optim.AdamW(param_groups(self.student, self.cfg), betas=(0.9, 0.999), eps=1e-8,
                                           fused=self.device.type == "cuda")
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.step_count, self.epoch, self.position = 0, 0, 0
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.step_count, self.epoch, self.position = state["step"], state["epoch"], state["position"]
            set_rng_state(state["rng"])
        resume_step = self.step_count if state is not None else None
        self.metrics = MetricsLog(self.out / "metrics.jsonl", resume_step=resume_step, readonly=not self.is_main)
        if state is None:
            self.metrics.records.clear()
            if self.is_main:
                atomic.write_text(self.out / "metrics.jsonl", "")

    def setup_step(self) -> None:
        """The training step (eager, or replayed as CUDA graphs) and the batches it draws."""
        cfg, device, lengths = self.cfg, self.device, self.tokens.lengths
        teacher_dev = torch.from_numpy(np.ascontiguousarray(self.data.teacher)).to(device)
        autocast = autocast_dtype(cfg.precision, device)
        forward, ddp = training_forward(cfg, self.student, self.packed, device)
        pad_id = self.student.tokenizer.pad_token_id or 0
        self.graphed: GraphedTrainStep | None = None
        graph_shapes: dict[str, Any] = {}
        train_lengths = lengths[self.data.train_idx]
        if cfg.cuda_graphs != TriState.FALSE:
            why_not = graphs_unsupported(cfg, device, self.world, self.packed, forward if self.packed else None,
                                         autocast)
            if why_not is None:
                width = fixed_width(train_lengths)
                graph_shapes = {"bucket": bucket_tokens(float(train_lengths.mean()) * cfg.batch_size, width),
                                "width": width, "filler_id": pad_id}
                self.graphed = GraphedTrainStep(forward, self.loss_fn, list(self.student.parameters()), teacher_dev,
                                                autocast)
            elif cfg.cuda_graphs == TriState.TRUE:
                raise LeafkdError(f"--cuda-graphs true: {why_not}")
        if use_rows(cfg, self.packed):
            # Rows as wide as the longest training text (no text is ever split), their count bucketed: few shapes.
            width = fixed_width(train_lengths)
            rows = bucket_rows(float(train_lengths.mean()) * cfg.batch_size, width)
            graph_shapes = {"filler_id": pad_id, **graph_shapes, "width": width, "bucket": rows * width, "rows": True}
        self.train_step = TrainStep(cfg, self.student, forward, self.loss_fn, self.optimizer, teacher_dev, device,
                                    autocast=autocast, packed=self.packed, graphed=self.graphed, ddp=ddp)
        selector = self.selector
        self.loader = BatchLoader(self.sampler, self.tokens, packed=self.packed, pad_id=pad_id, device=device,
                                  graph_shapes=graph_shapes, global_keys=self.world > 1 and cfg.relational > 0,
                                  on_new_epoch=(lambda: selector.new_epoch(self.sampler)) if selector else None)

    # -- training ---------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to the last step, then save the model (see `finish`)."""
        bar = None
        if self.cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step_count, desc="train", unit="step", smoothing=0.05)
        batches = self.loader.stream(self.epoch, self.position)
        self.stats = StepStats(self.device)
        started = time.perf_counter()
        try:
            while self.step_count < self.total_steps:
                record = self.step(batches)
                if bar is not None:
                    bar.update(1)
                    if record is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4g}", sps=f"{record['samples_per_s']:.0f}")
        finally:
            if bar is not None:
                bar.close()
        self.seconds["steps"] = time.perf_counter() - started  # the loop, its evaluations and checkpoints included
        return self.finish()

    def step(self, batches: Iterator) -> dict[str, Any] | None:
        """One optimiser step and what is due after it (selection refresh, log record, evaluation, checkpoint);
        returns the log record when one was written."""
        cfg = self.cfg
        factor = lr_factor(self.step_count, self.total_steps, cfg.warmup)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self.epoch, self.position = self.train_step(batches, self.stats)
        self.step_count += 1
        step, last = self.step_count, self.step_count == self.total_steps
        if self.selector is not None and not last:
            self.selector.maybe_refresh(step, self.student, self.tokens)
        record = None
        if step % cfg.log_every == 0 or last:
            record = self.stats.record(step, self.epoch, self.optimizer.param_groups[0]["lr"], self.world)
            self.metrics.write(record)
        if cfg.eval_every and step % cfg.eval_every == 0 and not last:
            self.evaluate()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not last:
            self.checkpoint()
        return record

    def evaluate(self) -> dict[str, float]:
        """Held-out alignment now (recorded in metrics.jsonl); the student goes back to training mode."""
        self.student.eval()
        result = evaluate_student(self.student, self.heldout_tokens, self.data.teacher[self.data.heldout_idx],
                                  self.device)
        self.student.train()
        set_dropout(self.student, self.cfg.dropout)
        self.metrics.write({"type": "eval", "step": self.step_count, **result})
        logger.info(f"step {self.step_count}: held-out cos {result['heldout_cos_mean']:.4f} "
                    f"(p5 {result['heldout_cos_p5']:.4f}), top-10 agreement {result['top10_agreement']:.3f}")
        return result

    def checkpoint(self) -> None:
        """The whole state (model, optimiser, data position, RNGs, selection), written atomically by rank 0."""
        cfg = self.cfg
        save_checkpoint(self.out, {"step": self.step_count, "epoch": self.epoch, "position": self.position,
                                   "model": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                                   "rng": rng_state(), "result_key": cfg.result_key(), "config": asdict(cfg),
                                   "selection": self.selector.state_dict() if self.selector is not None else None},
                        cfg.keep_checkpoints)

    # -- the end ----------------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Final evaluation and fit, the model folder (with leafkd.json), the last checkpoint and the curves."""
        started = time.perf_counter()
        graph_stats = self.release_graphs()
        final = self.evaluate()
        train_fit = self.training_fit()
        baseline = next((r for r in self.metrics.records if r.get("type") == "baseline"), None)
        ridge = {k: baseline[k] for k in final} if baseline else None
        model_dir = self.out / "model"
        if self.is_main:
            with atomic.atomic_dir(model_dir) as tmp:
                self.student.to("cpu").save(str(tmp))
                write_student_info(tmp, self.student_info(final, ridge, train_fit))
        self.checkpoint()
        if self.cfg.plot and self.is_main:
            plot_curves(self.metrics.records, self.out / "curves.png")
        dist_.barrier()  # the others return once rank 0 has written the model
        self.seconds["finish"] = time.perf_counter() - started
        self.metrics.write({"type": "timing", "step": self.step_count, **self.seconds})
        logger.info("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return {"model": str(model_dir), "final": final, "ridge_baseline": ridge, "steps": self.step_count,
                "train_fit": train_fit, "cuda_graphs": graph_stats, "seconds": dict(self.seconds)}

    def release_graphs(self) -> dict[str, Any] | None:
        """The CUDA graphs' counts (None without graphs); their memory pool is freed for the final evaluation."""
        if self.graphed is None:
            return None
        stats = self.graphed.stats()
        logger.info(f"CUDA graphs: {stats['graphs']} captured, {stats['replays']} replays, {stats['eager_steps']} "
                    "eager steps" + (f"; off after a failed capture: {stats['disabled']}" if stats["disabled"] else ""))
        self.graphed = self.train_step.graphed = None
        return stats

    def training_fit(self) -> dict[str, Any]:
        """The held-out metrics on as many training texts (a seeded sample): a gap to the held-out numbers is
        overfitting; both low is what the student cannot fit at all (capacity), which more data or steps will not
        fix."""
        data = self.data
        fit_n = min(len(data.heldout_idx), len(data.train_idx))
        fit_idx = np.sort(np.random.default_rng(self.cfg.seed).choice(data.train_idx, fit_n, replace=False))
        self.student.eval()
        fit = evaluate_student(self.student, self.tokens.take(fit_idx), data.teacher[fit_idx], self.device)
        train_fit = {"cos_mean": fit["heldout_cos_mean"], "cos_p5": fit["heldout_cos_p5"], "texts": len(fit_idx)}
        self.metrics.write({"type": "train_fit", "step": self.step_count, **train_fit})
        logger.info(f"training texts ({len(fit_idx)} sampled): cos {train_fit['cos_mean']:.4f} "
                    f"(p5 {train_fit['cos_p5']:.4f})")
        return train_fit

    def student_info(self, final: dict, ridge: dict | None, train_fit: dict) -> dict[str, Any]:
        """The model folder's leafkd.json: teacher, base, losses, data, config and metrics."""
        cfg, data = self.cfg, self.data
        return {
            "leafkd_version": leafkd_version,
            "teacher": self.teacher.path,
            "teacher_fingerprint": data.fingerprint,
            "teacher_dim": self.teacher_dim,
            "student_dim": self.teacher_dim,
            "base": str(resolve_model(cfg.student)),
            "base_layers": cfg.student_layers,
            "normalize": self.teacher.normalize,
            "query_prompt": self.teacher.query_prompt,
            "losses": dict(self.loss_fn.weights),
            "data": cfg.data,
            "texts": len(data.texts),
            "heldout": len(data.heldout_idx),
            "steps": self.step_count,
            "config": asdict(cfg),
            "result_key": cfg.result_key(),  # what decides the weights: a run with the same key can reuse this model
            "metrics": {"final": final, "ridge_baseline": ridge, "train_fit": train_fit},
            "selection": self.selector.summary_for_model() if self.selector is not None else None,
        }


@contextmanager
def _reports_from_main_rank() -> Iterator[None]:
    """Under torchrun only rank 0 reports: the other ranks' leafkd records below warnings are dropped."""
    root = logging.getLogger("leafkd")
    level = root.level
    if not dist_.is_main():
        root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) training; returns the final held-out metrics and the model folder.

    Under `torchrun` (WORLD_SIZE > 1): DistributedDataParallel, each rank takes a contiguous slice of every
    global batch (see leafkd.runtime.distributed.local_batch); rank 0 logs, checkpoints and saves the model.
    """
    validate(cfg)
    dist_.init_from_env(cfg.device)
    with _reports_from_main_rank():
        return Trainer(cfg).run()
