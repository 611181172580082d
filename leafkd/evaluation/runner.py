"""A whole evaluation run: tasks and models loaded, every mode scored, provenance recorded (`run_evaluation`)."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from leafkd.data.paths import data_dir as find_data_dir
from leafkd.errors import LeafkdError
from leafkd.evaluation.diagnostics import alignment_diagnostics
from leafkd.evaluation.embedders import MODES, fit_ridge_map, load_models, ridge_texts
from leafkd.evaluation.engines import evaluate, resolve_engine
from leafkd.evaluation.tasks import DEFAULT_TASKS, load_tasks, resolve_tasks

csv.field_size_limit(sys.maxsize)


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


def run_evaluation(*, teacher: str | Path | None = None, student: str | Path | None = None,
                   base: str | Path | None = None, modes: Sequence[str] | None = None,
                   tasks: Sequence[str] = DEFAULT_TASKS, data_dir: str | Path | None = None,
                   engine: str | None = None, ridge: bool = False, ridge_n: int = 20000, ridge_alpha: float = 1.0,
                   with_alignment: bool = False, device: str | None = None, batch_tokens: int | None = None,
                   teacher_query_prompt: str | None = None, student_query_prompt: str | None = None,
                   ignore_identical_ids: bool = True, progress: bool = False,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Load data and models, score every mode on every task (plus alignment diagnostics); a JSON-ready dict."""
    started = time.time()
    data_dir = find_data_dir(data_dir, required=False)
    engine = resolve_engine(engine)
    if modes is not None:
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise LeafkdError(f"unknown mode {bad[0]!r} (known: {', '.join(MODES)})")
        if not modes:
            raise LeafkdError("no modes given")
    specs = resolve_tasks(tasks, data_dir)
    datas = load_tasks(specs)  # data errors surface before any model loads
    want_base = modes is None or any(m in ("base", "ridge") for m in modes)
    models = load_models(teacher, student, base, teacher_query_prompt=teacher_query_prompt,
                         student_query_prompt=student_query_prompt, device=device, batch_tokens=batch_tokens,
                         progress=progress, use_base=want_base)
    if modes is None:
        have = {"teacher": models.teacher, "student": models.student, "base": models.base}
        modes = [m for m in ("teacher", "student") if have[m] is not None]
        if models.teacher is not None and models.student is not None:
            modes.append("asymmetric")
        if models.base is not None:
            modes.append("base")
            if ridge and models.teacher is not None:
                modes.append("ridge")
    ridge_info = None
    if "ridge" in modes:
        if models.base is None or models.teacher is None:
            raise LeafkdError("mode 'ridge' needs a base model (--base, or 'base' in the student's leafkd.json) "
                              "and a teacher")
        t0 = time.perf_counter()
        texts = ridge_texts(data_dir, ridge_n)
        models.ridge = fit_ridge_map(models.base, models.teacher, texts, ridge_alpha)
        ridge_info = {"alpha": ridge_alpha, "texts": len(texts), "source": str(data_dir / "train"), "seed": 0,
                      "fit_r2": models.ridge.fit_r2, "seconds": round(time.perf_counter() - t0, 2)}
        if log:
            log(f"ridge map fitted on {len(texts)} training texts (R^2 {models.ridge.fit_r2:.3f}, "
                f"{ridge_info['seconds']:.0f}s)")
    embedders = models.embedders(modes)
    rows = evaluate(embedders, datas, engine, ignore_identical_ids=ignore_identical_ids, log=log)
    commit = git_commit()
    teacher_path = models.info.get("teacher", {}).get("path")
    student_path = models.info.get("student", {}).get("path")
    for row in rows:
        row.update({"teacher": teacher_path, "teacher_fingerprint": models.info.get("teacher", {}).get("fingerprint"),
                    "student": student_path, "base": models.info.get("base", {}).get("path"),
                    "data": str(data_dir), "commit": commit["sha"]})
    align = alignment_diagnostics(models, datas, ignore_identical_ids=ignore_identical_ids, log=log) if with_alignment else None
    import datetime as _dt

    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "engine": engine,
        "commit": commit,
        "versions": _versions(),
        "device": device or ("cuda" if _cuda() else "cpu"),
        "data_dir": str(data_dir),
        "models": models.info,
        "tasks": [{"key": d.spec.key, "name": d.name, "kind": d.spec.kind, "path": str(d.spec.path),
                   "metric": d.spec.metric, "size": d.size()} for d in datas],
        "modes": list(modes),
        "ignore_identical_ids": ignore_identical_ids,
        "ridge": ridge_info,
        "rows": rows,
        "alignment": align,
        "seconds": round(time.time() - started, 1),
    }


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover
        return False


