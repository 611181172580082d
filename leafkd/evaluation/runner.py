"""A whole evaluation run: tasks and models loaded, every mode scored, provenance recorded (`run_evaluation`)."""

from __future__ import annotations

import datetime
import logging
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from leafkd.data.paths import data_dir as find_data_dir
from leafkd.errors import LeafkdError
from leafkd.evaluation.diagnostics import alignment_diagnostics
from leafkd.evaluation.embedders import Mode, ModelSet, fit_ridge_map, load_models, parse_modes, ridge_texts
from leafkd.evaluation.engines import evaluate, resolve_engine
from leafkd.evaluation.tasks import DEFAULT_TASKS, TaskData, load_tasks, resolve_tasks

logger = logging.getLogger(__name__)

# The checkout this module runs from (leafkd/evaluation/runner.py -> the repository root), for `git_commit`.
REPO_ROOT = Path(__file__).resolve().parents[2]


def git_commit(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """The code's commit and whether the working tree has changes (None outside a git checkout)."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha or None, "dirty": bool(dirty) if sha else None}


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for pkg in ("leafkd", "mteb", "sentence-transformers", "transformers", "torch", "pytrec_eval-terrier"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    if out["leafkd"] is None:
        import leafkd

        out["leafkd"] = leafkd.__version__
    return out


def _available_modes(models: ModelSet, ridge: bool) -> list[Mode]:
    """Every mode the loaded models allow (``ridge`` only when asked for)."""
    modes = [m for m, model in ((Mode.TEACHER, models.teacher), (Mode.STUDENT, models.student)) if model is not None]
    if models.teacher is not None and models.student is not None:
        modes.append(Mode.ASYMMETRIC)
    if models.base is not None:
        modes.append(Mode.BASE)
        if ridge and models.teacher is not None:
            modes.append(Mode.RIDGE)
    return modes


def _fit_ridge(models: ModelSet, data_dir: Path | None, n: int, alpha: float) -> dict[str, Any]:
    """Fit ``models.ridge`` (base -> teacher) on `n` training texts; what results.json records of the fit."""
    if models.base is None or models.teacher is None:
        raise LeafkdError("mode 'ridge' needs a base model (--base, or 'base' in the student's leafkd.json) "
                          "and a teacher")
    t0 = time.perf_counter()
    texts = ridge_texts(data_dir, n)  # a missing data folder is an error here
    assert data_dir is not None
    models.ridge = fit_ridge_map(models.base, models.teacher, texts, alpha)
    info = {"alpha": alpha, "texts": len(texts), "source": str(data_dir / "train"), "seed": 0,
            "fit_r2": models.ridge.fit_r2, "seconds": round(time.perf_counter() - t0, 2)}
    logger.info(f"ridge map fitted on {len(texts)} training texts (R^2 {models.ridge.fit_r2:.3f}, "
                f"{info['seconds']:.0f}s)")
    return info


def run_evaluation(*, teacher: str | Path | None = None, student: str | Path | None = None,
                   base: str | Path | None = None, modes: Sequence[str] | None = None,
                   tasks: Sequence[str] = DEFAULT_TASKS, data_dir: str | Path | None = None,
                   engine: str | None = None, ridge: bool = False, ridge_n: int = 20000, ridge_alpha: float = 1e-2,
                   with_alignment: bool = False, device: str | None = None, batch_tokens: int | None = None,
                   teacher_query_prompt: str | None = None, student_query_prompt: str | None = None,
                   ignore_identical_ids: bool = True, progress: bool = False) -> dict[str, Any]:
    """Load data and models, score every mode on every task (plus alignment diagnostics); a JSON-ready dict.

    `modes`: names of `Mode`s (default: every mode the models allow; ``ridge`` with `ridge`). `ridge_alpha` is the
    relative ridge penalty of `fit_ridge_map`. Progress is logged (``leafkd.evaluation`` loggers, level INFO).
    """
    root = find_data_dir(data_dir, required=False)
    wanted = parse_modes(modes) if modes is not None else None
    if wanted is not None and not wanted:
        raise LeafkdError("no modes given")
    datas = load_tasks(resolve_tasks(tasks, root))  # data errors surface before any model loads
    models = load_models(teacher, student, base, teacher_query_prompt=teacher_query_prompt,
                         student_query_prompt=student_query_prompt, device=device, batch_tokens=batch_tokens,
                         progress=progress, use_base=wanted is None or bool({Mode.BASE, Mode.RIDGE} & set(wanted)))
    return evaluate_models(models, datas, modes=wanted, engine=engine, data_dir=root, ridge=ridge, ridge_n=ridge_n,
                           ridge_alpha=ridge_alpha, with_alignment=with_alignment, device=device,
                           ignore_identical_ids=ignore_identical_ids)


def evaluate_models(models: ModelSet, datas: Sequence[TaskData], *, modes: Sequence[Mode] | None = None,
                    engine: str | None = None, data_dir: Path | None = None, ridge: bool = False,
                    ridge_n: int = 20000, ridge_alpha: float = 1e-2, with_alignment: bool = False,
                    device: str | None = None, ignore_identical_ids: bool = True) -> dict[str, Any]:
    """Score loaded models on loaded tasks: the results dict of `run_evaluation` (its report's input)."""
    started = time.time()
    resolved_engine = resolve_engine(engine)
    run_modes = list(modes) if modes is not None else _available_modes(models, ridge)
    ridge_info = _fit_ridge(models, data_dir, ridge_n, ridge_alpha) if Mode.RIDGE in run_modes else None
    rows = evaluate(models.embedders(run_modes), datas, resolved_engine, ignore_identical_ids=ignore_identical_ids)
    commit = git_commit()
    for row in rows:
        row.update({"teacher": models.info.get("teacher", {}).get("path"),
                    "teacher_fingerprint": models.info.get("teacher", {}).get("fingerprint"),
                    "student": models.info.get("student", {}).get("path"),
                    "base": models.info.get("base", {}).get("path"), "data": str(data_dir), "commit": commit["sha"]})
    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "engine": resolved_engine.value,
        "commit": commit,
        "versions": _versions(),
        "device": device or ("cuda" if _cuda() else "cpu"),
        "data_dir": str(data_dir),
        "models": models.info,
        "tasks": [{"key": d.spec.key, "name": d.name, "kind": d.spec.kind, "path": str(d.spec.path),
                   "metric": d.spec.metric, "size": d.size()} for d in datas],
        "modes": [m.value for m in run_modes],
        "ignore_identical_ids": ignore_identical_ids,
        "ridge": ridge_info,
        "rows": rows,
        "alignment": alignment_diagnostics(models, datas, ignore_identical_ids=ignore_identical_ids)
        if with_alignment else None,
        "seconds": round(time.time() - started, 1),
    }


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


