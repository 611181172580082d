"""Evaluation harness: local MTEB-style tasks, asymmetric encoders, baselines and alignment diagnostics.

Tasks are read from local files (BEIR folders for retrieval, TSV pairs for STS), never from the hub. Each
evaluation *mode* is an `Embedder` that turns texts into vectors for a role (``"query"`` or ``"document"``):

- ``teacher``: the teacher encodes everything (queries with the teacher's query prompt);
- ``student``: the distilled student encodes everything;
- ``asymmetric``: the student encodes queries, the teacher encodes documents (LEAF's serving setup);
- ``base``: the student's base model before distillation, on its own;
- ``ridge``: the base model's vectors through a closed-form ridge map into the teacher's space (queries),
  teacher documents.

STS tasks score ``sentence1`` in the query role and ``sentence2`` in the document role, without prompts: for a
symmetric mode this is plain MTEB STS; for ``asymmetric``/``ridge`` it measures student-to-teacher similarity.

Two engines compute the same numbers: ``mteb`` (the reference: custom `AbsTaskRetrieval`/`AbsTaskSTS` tasks with
``load_data`` reading local files, run with ``cache=None``) and ``fast`` (exact cosine search in numpy and
pytrec_eval, or the built-in nDCG when pytrec_eval is missing), which needs no mteb. Both draw vectors from one
in-memory `EmbeddingCache`, so the teacher's document vectors are computed once per run and shared between
modes and engines.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from leafkd.data import join_title, read_beir
from leafkd.errors import LeafkdError

csv.field_size_limit(sys.maxsize)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODES = ("teacher", "student", "asymmetric", "base", "ridge")
ENGINES = ("mteb", "fast")
TRUNCATE_DIMS = (512, 256, 128, 64)
QUANTIZATIONS = ("float32", "int8", "binary")

# Published MTEB scores (x100) that the harness must reproduce within 0.5 points.
PUBLISHED = {
    "all-MiniLM-L6-v2": {"STSBenchmark": 82.03, "SciFact": 64.51},
    "all-mpnet-base-v2": {"STSBenchmark": 83.42, "SciFact": 65.57},
}


# --------------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives and how to read it."""

    key: str
    name: str
    kind: str  # "retrieval" or "sts"
    path: Path
    split: str = "test"  # qrels split (retrieval) or split-column value to keep (STS; "" keeps all rows)
    score_column: str = "score"
    score_range: tuple[float, float] = (0.0, 5.0)

    @property
    def metric(self) -> str:
        return "ndcg_at_10" if self.kind == "retrieval" else "cosine_spearman"


# Built-in tasks, relative to the data folder.
KNOWN_TASKS: dict[str, dict[str, Any]] = {
    "scifact": {"name": "SciFact", "kind": "retrieval", "path": "beir/scifact"},
    "cranfield": {"name": "Cranfield", "kind": "retrieval", "path": "classic/cranfield"},
    "npl": {"name": "NPL", "kind": "retrieval", "path": "classic/npl"},
    "stsb": {"name": "STSBenchmark", "kind": "sts", "path": "sts/stsbenchmark/test.tsv", "split": ""},
    "sickr": {"name": "SICK-R", "kind": "sts", "path": "sts/sick/sick_r.tsv", "split": "TEST",
              "score_column": "relatedness_score", "score_range": (1.0, 5.0)},
}
DEFAULT_TASKS = tuple(KNOWN_TASKS)


def default_data_dir() -> Path:
    """``$LEAFKD_DATA``, else ``../shared/data`` next to the repository."""
    import os

    env = os.environ.get("LEAFKD_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def resolve_tasks(names: Iterable[str], data_dir: str | Path | None = None) -> list[TaskSpec]:
    """Task specs from short names (``scifact``...), BEIR folders, or STS ``.tsv`` files."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    specs: list[TaskSpec] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        key = name.lower()
        if key in KNOWN_TASKS:
            info = dict(KNOWN_TASKS[key])
            specs.append(TaskSpec(key=key, name=info.pop("name"), kind=info.pop("kind"),
                                  path=data_dir / info.pop("path"), **info))
            continue
        path = Path(name)
        if path.suffix == ".tsv":
            specs.append(TaskSpec(key=path.stem, name=path.stem, kind="sts", path=path, split=""))
        elif path.is_dir() or "/" in name:
            specs.append(TaskSpec(key=path.name, name=path.name, kind="retrieval", path=path))
        else:
            raise LeafkdError(f"unknown task {name!r} (known: {', '.join(KNOWN_TASKS)}; or a BEIR folder or "
                              f"an STS .tsv file)")
    if not specs:
        raise LeafkdError("no tasks given")
    if len({s.name for s in specs}) != len(specs):
        raise LeafkdError("a task is named twice: " + ", ".join(s.name for s in specs))
    return specs


@dataclass
class RetrievalData:
    """A retrieval task in memory: documents (title + text joined), judged queries, graded qrels."""

    spec: TaskSpec
    doc_ids: list[str]
    doc_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]

    @property
    def name(self) -> str:
        return self.spec.name

    def size(self) -> dict[str, int]:
        return {"documents": len(self.doc_ids), "queries": len(self.query_ids),
                "judgements": sum(len(v) for v in self.qrels.values())}


@dataclass
class STSData:
    """An STS task in memory: sentence pairs with gold similarity scores."""

    spec: TaskSpec
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray

    @property
    def name(self) -> str:
        return self.spec.name

    def size(self) -> dict[str, int]:
        return {"pairs": len(self.sentences1)}


TaskData = RetrievalData | STSData


def read_sts(spec: TaskSpec) -> STSData:
    """Read a TSV of pairs with a header (``sentence1``, ``sentence2``, a score column, optional ``split``)."""
    path = spec.path
    if not path.is_file():
        raise LeafkdError(f"{path}: no such file")
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header is None:
                raise LeafkdError(f"{path}: empty file")
            need = ["sentence1", "sentence2", spec.score_column] + (["split"] if spec.split else [])
            missing = [c for c in need if c not in header]
            if missing:
                raise LeafkdError(f"{path}:1: no column {missing[0]!r} in the header (columns: {', '.join(header)})")
            idx = [header.index(c) for c in need]
            for lineno, row in enumerate(reader, 2):
                if not row or row == [""]:
                    continue
                if len(row) != len(header):
                    raise LeafkdError(f"{path}:{lineno}: expected {len(header)} tab-separated columns, got {len(row)}")
                if spec.split and row[idx[3]] != spec.split:
                    continue
                try:
                    score = float(row[idx[2]])
                except ValueError:
                    raise LeafkdError(f"{path}:{lineno}: score {row[idx[2]]!r} is not a number") from None
                if not math.isfinite(score):
                    raise LeafkdError(f"{path}:{lineno}: score {row[idx[2]]!r} is not finite")
                s1.append(row[idx[0]])
                s2.append(row[idx[1]])
                scores.append(score)
    except UnicodeDecodeError as e:
        raise LeafkdError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if len(scores) < 2:
        where = f" in split {spec.split}" if spec.split else ""
        raise LeafkdError(f"{path}: fewer than 2 sentence pairs{where}")
    return STSData(spec, s1, s2, np.asarray(scores, dtype=np.float64))


def load_task(spec: TaskSpec) -> TaskData:
    """Read one task's data; any problem is a one-line `LeafkdError` naming the file."""
    if spec.kind == "sts":
        return read_sts(spec)
    rs = read_beir(spec.path, spec.split)
    doc_ids = list(rs.corpus)
    doc_texts = [join_title(d.get("title"), d.get("text", "")) for d in rs.corpus.values()]
    query_ids = list(rs.queries)
    return RetrievalData(spec, doc_ids, doc_texts, query_ids, [rs.queries[q] for q in query_ids], rs.qrels)


def load_tasks(specs: Sequence[TaskSpec]) -> list[TaskData]:
    return [load_task(s) for s in specs]


# --------------------------------------------------------------------------------------------------- encoders


class EmbeddingCache:
    """Vectors per (model key, prompt, text), kept in memory for the length of a run."""

    def __init__(self) -> None:
        self._store: dict[tuple[str, str | None], dict[str, np.ndarray]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str | None], texts: Sequence[str],
            compute: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """Vectors of `texts` (in order), computing only those not seen before, once each."""
        store = self._store.setdefault(key, {})
        missing = list(dict.fromkeys(t for t in texts if t not in store))
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        if missing:
            vecs = np.asarray(compute(missing), dtype=np.float32)
            for t, v in zip(missing, vecs):
                store[t] = v
        if not texts:
            dim = next(iter(store.values())).shape[0] if store else 0
            return np.zeros((0, dim), dtype=np.float32)
        return np.stack([store[t] for t in texts])

    def clear(self) -> None:
        self._store.clear()


class Embedder:
    """Texts to vectors for a role: ``"query"``, ``"document"`` or None (symmetric use)."""

    name: str = "embedder"

    def embed(self, texts: Sequence[str], role: str | None = None, prompts: bool = True) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Which model encodes queries and which encodes documents."""
        raise NotImplementedError


def _clean_prompt(p: Any) -> str | None:
    return p if isinstance(p, str) and p else None


class ModelEmbedder(Embedder):
    """A SentenceTransformer folder encoded with `leafkd.encode.encode`, with optional role prompts."""

    def __init__(self, model, path: str | Path, *, name: str | None = None, query_prompt: str | None = None,
                 document_prompt: str | None = None, batch_tokens: int | None = None, device: str | None = None,
                 cache: EmbeddingCache | None = None, progress: bool = False) -> None:
        self.model = model
        self.path = Path(path)
        self.name = name or self.path.name
        self.query_prompt = _clean_prompt(query_prompt)
        self.document_prompt = _clean_prompt(document_prompt)
        self.batch_tokens = batch_tokens
        self.device = device
        self.cache = cache if cache is not None else EmbeddingCache()
        self.progress = progress
        self.key = str(self.path.resolve())

    @property
    def dim(self) -> int:
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    def prompt_for(self, role: str | None, prompts: bool = True) -> str | None:
        if not prompts:
            return None
        return {"query": self.query_prompt, "document": self.document_prompt}.get(role or "")

    def embed(self, texts: Sequence[str], role: str | None = None, prompts: bool = True) -> np.ndarray:
        from leafkd.encode import encode

        prompt = self.prompt_for(role, prompts)

        def compute(missing: list[str]) -> np.ndarray:
            return encode(self.model, missing, prompt=prompt, batch_tokens=self.batch_tokens, device=self.device,
                          show_progress=self.progress, desc=f"{self.name} {role or 'text'}")

        return self.cache.get((self.key, prompt), list(texts), compute)

    def describe(self) -> dict[str, Any]:
        return {"query": str(self.path), "document": str(self.path), "query_prompt": self.query_prompt,
                "document_prompt": self.document_prompt}


class AsymmetricEmbedder(Embedder):
    """Queries through one embedder, documents through another (role None goes to the query side)."""

    def __init__(self, query: Embedder, document: Embedder, name: str = "asymmetric") -> None:
        self.query = query
        self.document = document
        self.name = name

    def embed(self, texts: Sequence[str], role: str | None = None, prompts: bool = True) -> np.ndarray:
        side = self.document if role == "document" else self.query
        return side.embed(texts, role, prompts)

    def describe(self) -> dict[str, Any]:
        q, d = self.query.describe(), self.document.describe()
        return {"query": q["query"], "document": d["document"], "query_prompt": q.get("query_prompt"),
                "document_prompt": d.get("document_prompt")}


@dataclass
class RidgeMap:
    """y = x @ W + b: a linear map from one embedding space into another."""

    W: np.ndarray
    b: np.ndarray
    alpha: float
    n_texts: int
    fit_r2: float | None = None

    def apply(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) @ self.W + self.b).astype(np.float32)


class LinearMapEmbedder(Embedder):
    """Another embedder's vectors mapped through a `RidgeMap`."""

    def __init__(self, inner: Embedder, ridge: RidgeMap, name: str = "ridge") -> None:
        self.inner = inner
        self.ridge = ridge
        self.name = name

    def embed(self, texts: Sequence[str], role: str | None = None, prompts: bool = True) -> np.ndarray:
        return self.ridge.apply(self.inner.embed(texts, role, prompts))

    def describe(self) -> dict[str, Any]:
        d = dict(self.inner.describe())
        d["query"] = f"ridge({d['query']})"
        d["document"] = f"ridge({d['document']})"
        return d


def _vectors_of(source, texts: Sequence[str], batch_tokens: int | None, device: str | None) -> np.ndarray:
    if isinstance(source, np.ndarray):
        if source.shape[0] != len(texts):
            raise LeafkdError(f"teacher vectors: {source.shape[0]} rows for {len(texts)} texts")
        return source
    if isinstance(source, Embedder):
        return source.embed(texts, None, prompts=False)
    from leafkd.encode import encode

    return encode(source, list(texts), batch_tokens=batch_tokens, device=device)


def fit_ridge_map(base_model, teacher, texts: Sequence[str], alpha: float = 1.0, *,
                  batch_tokens: int | None = None, device: str | None = None) -> RidgeMap:
    """Closed-form ridge regression from the base student's vectors to the teacher's on `texts`.

    `base_model` and `teacher` are SentenceTransformer models or `Embedder`s; `teacher` may also be an array of
    precomputed teacher vectors, one row per text. W = (Xc'Xc + alpha I)^-1 Xc'Yc, b = mean(Y) - mean(X) W.
    """
    if len(texts) < 2:
        raise LeafkdError("the ridge map needs at least 2 training texts")
    X = _vectors_of(base_model, texts, batch_tokens, device).astype(np.float64)
    Y = _vectors_of(teacher, texts, batch_tokens, device).astype(np.float64)
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    A = Xc.T @ Xc
    A[np.diag_indices_from(A)] += alpha
    W = np.linalg.solve(A, Xc.T @ Yc)
    b = my - mx @ W
    resid = Yc - Xc @ W
    r2 = 1.0 - float((resid ** 2).sum() / max((Yc ** 2).sum(), 1e-12))
    return RidgeMap(W, b, float(alpha), len(texts), r2)


def ridge_texts(data_dir: str | Path | None = None, n: int = 20000, seed: int = 0) -> list[str]:
    """A seeded sample of `n` unlabeled training texts from ``DATA/train`` (never evaluation data)."""
    from leafkd.data import load_corpus

    train = (Path(data_dir) if data_dir is not None else default_data_dir()) / "train"
    if not train.is_dir():
        raise LeafkdError(f"{train}: no such folder (the ridge baseline fits on unlabeled training text)")
    sources: list[str] = []
    for p in sorted(train.rglob("*")):
        if p.suffix == ".txt":
            sources.append(str(p))
        elif p.name == "questions.tsv":
            sources.append(f"{p}#text")
        elif p.name == "wordnet_glosses.tsv":
            sources.append(f"{p}#3")
        elif p.suffix == ".jsonl":
            sources.append(str(p))
    if not sources:
        raise LeafkdError(f"{train}: no training texts")
    return load_corpus(sources, max_texts=n, seed=seed).texts


# --------------------------------------------------------------------------------------------------- models


def read_leafkd_json(folder: str | Path) -> dict[str, Any]:
    """A student folder's ``leafkd.json`` ({} when absent)."""
    path = Path(folder) / "leafkd.json"
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LeafkdError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(obj, dict):
        raise LeafkdError(f"{path}: not a JSON object")
    return obj


def _resolve_relative(value: str | None, folder: Path) -> str | None:
    """A path recorded in leafkd.json: as written if it exists, else relative to the student folder."""
    if not value:
        return None
    p = Path(value)
    if p.exists() or p.is_absolute():
        return str(p)
    alt = folder / p
    return str(alt) if alt.exists() else str(p)


def _model_prompts(model) -> dict[str, str]:
    prompts = getattr(model, "prompts", None) or {}
    return {k: v for k, v in prompts.items() if isinstance(v, str) and v}


@dataclass
class ModelSet:
    """The models of one evaluation run and the embedders for each mode."""

    teacher: ModelEmbedder | None = None
    student: ModelEmbedder | None = None
    base: ModelEmbedder | None = None
    ridge: RidgeMap | None = None
    info: dict[str, Any] = field(default_factory=dict)
    cache: EmbeddingCache = field(default_factory=EmbeddingCache)

    def embedders(self, modes: Sequence[str]) -> dict[str, Embedder]:
        out: dict[str, Embedder] = {}
        need = {"teacher": ["teacher"], "student": ["student"], "asymmetric": ["student", "teacher"],
                "base": ["base"], "ridge": ["base", "teacher"]}
        for mode in modes:
            if mode not in need:
                raise LeafkdError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
            lacking = [m for m in need[mode] if getattr(self, m) is None]
            if lacking:
                raise LeafkdError(f"mode {mode!r} needs a {' and a '.join(lacking)} model (give --{lacking[0]})")
            if mode == "teacher":
                out[mode] = self.teacher
            elif mode == "student":
                out[mode] = self.student
            elif mode == "asymmetric":
                out[mode] = AsymmetricEmbedder(self.student, self.teacher, "asymmetric")
            elif mode == "base":
                out[mode] = self.base
            elif mode == "ridge":
                if self.ridge is None:
                    raise LeafkdError("mode 'ridge' needs a fitted ridge map (fit_ridge_map)")
                out[mode] = AsymmetricEmbedder(LinearMapEmbedder(self.base, self.ridge), self.teacher, "ridge")
        return out


def load_models(teacher: str | Path | None = None, student: str | Path | None = None, base: str | Path | None = None,
                *, teacher_query_prompt: str | None = None, student_query_prompt: str | None = None,
                device: str | None = None, batch_tokens: int | None = None, progress: bool = False,
                use_base: bool = True) -> ModelSet:
    """Load teacher/student/base; a student's ``leafkd.json`` supplies the teacher, base and query prompt.

    Prompts: the teacher's query prompt is `teacher_query_prompt`, else leafkd.json's ``query_prompt``, else the
    teacher's own ``prompts["query"]``; the student (and base) use their own ``prompts`` (training stores the query
    prompt there) unless `student_query_prompt` is given ("" for none). STS never uses prompts.
    """
    from leafkd.models import fingerprint, load_model, resolve_model

    cache = EmbeddingCache()
    info: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    student_path = None
    if student is not None:
        student_path = resolve_model(student)
        meta = read_leafkd_json(student_path)
        if teacher is None:
            teacher = _resolve_relative(meta.get("teacher"), student_path)
        if base is None and use_base:
            base = _resolve_relative(meta.get("base"), student_path)
    if teacher is None and student is None:
        raise LeafkdError("give a --teacher or a --student model")
    ms = ModelSet(cache=cache, info=info)

    def load(path) -> tuple[Any, Path]:
        p = resolve_model(path)
        return load_model(p, device=device), p

    if teacher is not None:
        model, p = load(teacher)
        prompts = _model_prompts(model)
        tq = teacher_query_prompt if teacher_query_prompt is not None else meta.get("query_prompt", prompts.get("query"))
        td = prompts.get("document") or prompts.get("passage")
        ms.teacher = ModelEmbedder(model, p, name="teacher", query_prompt=tq, document_prompt=td,
                                   batch_tokens=batch_tokens, device=device, cache=cache, progress=progress)
        info["teacher"] = {"path": str(p), "fingerprint": meta.get("teacher_fingerprint") or fingerprint(p),
                           "query_prompt": ms.teacher.query_prompt, "document_prompt": td, "dim": ms.teacher.dim,
                           "max_seq_length": int(model.max_seq_length or 0)}
    if student_path is not None:
        model = load_model(student_path, device=device)
        sprompts = _model_prompts(model)
        sq = student_query_prompt if student_query_prompt is not None else sprompts.get("query")
        ms.student = ModelEmbedder(model, student_path, name="student", query_prompt=sq,
                                   document_prompt=sprompts.get("document") or sprompts.get("passage"),
                                   batch_tokens=batch_tokens, device=device, cache=cache, progress=progress)
        info["student"] = {"path": str(student_path), "fingerprint": fingerprint(student_path),
                           "query_prompt": ms.student.query_prompt, "dim": ms.student.dim,
                           "max_seq_length": int(model.max_seq_length or 0),
                           "leafkd_json": meta or None}
        if ms.teacher is not None and ms.teacher.dim != ms.student.dim:
            raise LeafkdError(f"{student_path}: the student emits {ms.student.dim}-d vectors, the teacher "
                              f"{ms.teacher.dim}-d; asymmetric retrieval needs the same space")
    if base is not None and use_base:
        model, p = load(base)
        prompts = _model_prompts(model)
        ms.base = ModelEmbedder(model, p, name="base", query_prompt=prompts.get("query"),
                                document_prompt=prompts.get("document") or prompts.get("passage"),
                                batch_tokens=batch_tokens, device=device, cache=cache, progress=progress)
        info["base"] = {"path": str(p), "fingerprint": fingerprint(p), "dim": ms.base.dim,
                        "max_seq_length": int(model.max_seq_length or 0)}
    return ms


# --------------------------------------------------------------------------------------------------- scoring


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def search(Q: np.ndarray, D: np.ndarray, query_ids: Sequence[str], doc_ids: Sequence[str], top_k: int = 100,
           ignore_identical_ids: bool = True, chunk: int = 1024,
           score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """Exact search: the `top_k` documents per query by cosine (or `score_fn(Q_chunk, D)`), as a run dict.

    With `ignore_identical_ids`, a document whose id equals the query's is never returned (BEIR's rule).
    """
    if score_fn is None:
        Qn, Dn = normalize(Q), normalize(D)
        score_fn = lambda q, d: q @ d.T  # noqa: E731
    else:
        Qn, Dn = Q, D
    doc_index = {d: i for i, d in enumerate(doc_ids)}
    k = min(top_k, len(doc_ids))
    run: dict[str, dict[str, float]] = {}
    for start in range(0, len(query_ids), chunk):
        S = np.asarray(score_fn(Qn[start:start + chunk], Dn), dtype=np.float32)
        if ignore_identical_ids:
            for r, qid in enumerate(query_ids[start:start + chunk]):
                j = doc_index.get(qid)
                if j is not None:
                    S[r, j] = -np.inf
        kk = min(k + 1, S.shape[1]) if ignore_identical_ids else k  # one spare for an excluded id
        part = np.argpartition(-S, kk - 1, axis=1)[:, :kk] if kk < S.shape[1] else np.tile(np.arange(S.shape[1]), (len(S), 1))
        for r, qid in enumerate(query_ids[start:start + chunk]):
            cand = part[r]
            cand = cand[np.isfinite(S[r, cand])]
            order = sorted(cand.tolist(), key=lambda j: (-float(S[r, j]), _neg_str(doc_ids[j])))[:k]
            run[qid] = {doc_ids[j]: float(S[r, j]) for j in order}
    return run


class _neg_str(str):
    """A string that sorts in reverse (trec_eval breaks score ties by document id, descending)."""

    def __lt__(self, other):  # type: ignore[override]
        return str.__gt__(self, other)


def ndcg_at_k(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]], k: int = 10) -> dict[str, float]:
    """Per-query nDCG@k exactly as trec_eval's ``ndcg_cut_k`` (linear gains, ties by doc id descending)."""
    out: dict[str, float] = {}
    for qid, rels in qrels.items():
        if qid not in run:
            continue
        ranked = sorted(run[qid].items(), key=lambda kv: (-kv[1], _neg_str(kv[0])))[:k]
        dcg = sum(max(rels.get(d, 0), 0) / math.log2(i + 2) for i, (d, _) in enumerate(ranked))
        ideal = sorted((g for g in rels.values() if g > 0), reverse=True)[:k]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        out[qid] = dcg / idcg if idcg > 0 else 0.0
    return out


def recall_at_k(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]], k: int = 100) -> dict[str, float]:
    """Per-query recall@k over documents judged relevant (grade > 0)."""
    out: dict[str, float] = {}
    for qid, rels in qrels.items():
        if qid not in run:
            continue
        relevant = {d for d, g in rels.items() if g > 0}
        ranked = sorted(run[qid].items(), key=lambda kv: (-kv[1], _neg_str(kv[0])))[:k]
        out[qid] = len(relevant & {d for d, _ in ranked}) / len(relevant) if relevant else 0.0
    return out


def have_pytrec_eval() -> bool:
    return importlib.util.find_spec("pytrec_eval") is not None


def retrieval_metrics(qrels: Mapping[str, Mapping[str, int]], run: Mapping[str, Mapping[str, float]],
                      backend: str = "auto") -> dict[str, float]:
    """Mean nDCG@10 and recall@100 over judged queries, by pytrec_eval (``auto`` when installed) or built-in."""
    if backend == "auto":
        backend = "pytrec_eval" if have_pytrec_eval() else "builtin"
    qrels = {q: r for q, r in qrels.items() if r}
    if backend == "pytrec_eval":
        import pytrec_eval

        ev = pytrec_eval.RelevanceEvaluator({q: dict(r) for q, r in qrels.items()}, {"ndcg_cut.10", "recall.100"})
        per = ev.evaluate({q: dict(r) for q, r in run.items()})
        ndcg = [v["ndcg_cut_10"] for v in per.values()]
        rec = [v["recall_100"] for v in per.values()]
    else:
        ndcg = list(ndcg_at_k(qrels, run, 10).values())
        rec = list(recall_at_k(qrels, run, 100).values())
    return {"ndcg_at_10": float(np.mean(ndcg)) if ndcg else 0.0, "recall_at_100": float(np.mean(rec)) if rec else 0.0}


def sts_metrics(a: np.ndarray, b: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Spearman and Pearson correlation of pairwise cosine similarity with the gold scores."""
    from scipy.stats import pearsonr, spearmanr

    cos = (normalize(a) * normalize(b)).sum(1).astype(np.float64)
    return {"cosine_spearman": float(spearmanr(gold, cos)[0]), "cosine_pearson": float(pearsonr(gold, cos)[0])}


def task_vectors(embedder: Embedder, data: TaskData) -> tuple[np.ndarray, np.ndarray]:
    """(query vectors, document vectors) of a retrieval task, or (sentence1, sentence2) vectors of an STS task."""
    if isinstance(data, RetrievalData):
        return embedder.embed(data.query_texts, "query"), embedder.embed(data.doc_texts, "document")
    return embedder.embed(data.sentences1, "query", prompts=False), embedder.embed(data.sentences2, "document", prompts=False)


def fast_evaluate_task(embedder: Embedder, data: TaskData, backend: str = "auto",
                       ignore_identical_ids: bool = True) -> dict[str, float]:
    """One task's metrics with the built-in engine."""
    a, b = task_vectors(embedder, data)
    if isinstance(data, RetrievalData):
        run = search(a, b, data.query_ids, data.doc_ids, top_k=100, ignore_identical_ids=ignore_identical_ids)
        return retrieval_metrics(data.qrels, run, backend)
    return sts_metrics(a, b, data.scores)


# --------------------------------------------------------------------------------------------------- mteb engine


def have_mteb() -> bool:
    return importlib.util.find_spec("mteb") is not None


def _task_metadata(data: TaskData):
    from mteb.abstasks.task_metadata import TaskMetadata

    retrieval = isinstance(data, RetrievalData)
    return TaskMetadata(
        name=data.name,
        description=f"Local {'BEIR retrieval' if retrieval else 'STS'} task read from {data.spec.path}.",
        dataset={"path": str(data.spec.path), "revision": "local"},
        type="Retrieval" if retrieval else "STS",
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score=data.spec.metric,
        date=None,
        domains=None,
        task_subtypes=None,
        license="not specified",
        annotations_creators=None,
        dialect=[],
        sample_creation="found",
        bibtex_citation="",
    )


def mteb_task(data: TaskData, ignore_identical_ids: bool = True):
    """An mteb task whose ``load_data`` fills its dataset from the already-read local files."""
    from datasets import Dataset

    if isinstance(data, RetrievalData):
        from mteb.abstasks.retrieval import AbsTaskRetrieval

        class LocalRetrieval(AbsTaskRetrieval):
            metadata = _task_metadata(data)

            def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
                if self.data_loaded:
                    return
                corpus = Dataset.from_dict({"id": data.doc_ids, "title": [""] * len(data.doc_ids),
                                            "text": data.doc_texts})
                queries = Dataset.from_dict({"id": data.query_ids, "text": data.query_texts})
                self.dataset = {"default": {"test": {"corpus": corpus, "queries": queries,
                                                     "relevant_docs": {q: dict(r) for q, r in data.qrels.items()},
                                                     "top_ranked": None}}}
                self.data_loaded = True

        task = LocalRetrieval()
        task.ignore_identical_ids = ignore_identical_ids
        return task

    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.types import PromptType

    class LocalSTS(AbsTaskSTS):
        metadata = _task_metadata(data)
        min_score = data.spec.score_range[0]
        max_score = data.spec.score_range[1]
        # Route sentence1 to the query side and sentence2 to the document side (matters only for asymmetric modes).
        input1_prompt_type = PromptType.query
        input2_prompt_type = PromptType.document

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            if self.data_loaded:
                return
            self.dataset = {"default": {"test": Dataset.from_dict({
                "sentence1": data.sentences1, "sentence2": data.sentences2, "score": data.scores.tolist()})}}
            self.data_loaded = True

    return LocalSTS()


def mteb_encoder(embedder: Embedder, name: str):
    """Wrap an `Embedder` as an mteb encoder that routes on ``prompt_type`` (query vs document)."""
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    class LeafkdEncoder(AbsEncoder):
        def __init__(self) -> None:
            self.embedder = embedder
            self.mteb_model_meta = ModelMeta.create_empty(
                overwrites={"name": f"leafkd/{name}", "similarity_fn_name": ScoringFunction.COSINE})

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            texts = [t for batch in inputs for t in batch["text"]]
            role = getattr(prompt_type, "value", prompt_type)
            return self.embedder.embed(texts, role, prompts=task_metadata.type != "STS")

    return LeafkdEncoder()


def mteb_evaluate(embedder: Embedder, datas: Sequence[TaskData], name: str = "model",
                  ignore_identical_ids: bool = True) -> dict[str, dict[str, float]]:
    """Run mteb (offline, ``cache=None``) on local tasks; returns {task name: metrics}."""
    import logging

    import datasets
    import mteb

    logging.getLogger("mteb").setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    tasks = [mteb_task(d, ignore_identical_ids) for d in datas]
    result = mteb.evaluate(mteb_encoder(embedder, name), tasks, cache=None, overwrite_strategy="always",
                           show_progress_bar=False, encode_kwargs={"batch_size": 64})
    if getattr(result, "exceptions", None):
        raise RuntimeError(f"mteb failed: {result.exceptions}")
    out: dict[str, dict[str, float]] = {}
    for tr in result.task_results:
        s = tr.scores["test"][0]
        keys = ("ndcg_at_10", "recall_at_100") if "ndcg_at_10" in s else ("cosine_spearman", "cosine_pearson")
        out[tr.task_name] = {k: float(s[k]) for k in keys}
    return out


# --------------------------------------------------------------------------------------------------- evaluate


def resolve_engine(engine: str | None) -> str:
    if engine in (None, "auto"):
        return "mteb" if have_mteb() else "fast"
    if engine not in ENGINES:
        raise LeafkdError(f"unknown engine {engine!r} (use mteb or fast)")
    if engine == "mteb" and not have_mteb():
        raise LeafkdError("engine 'mteb' needs mteb installed (pip install 'leafkd[eval]'), or use --engine fast")
    return engine


def evaluate(embedders: Mapping[str, Embedder], datas: Sequence[TaskData], engine: str | None = None, *,
             ignore_identical_ids: bool = True, backend: str = "auto",
             log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Score each mode on each task; one row per mode with ``scores`` (main metric), ``metrics`` and ``average``."""
    engine = resolve_engine(engine)
    rows = []
    for mode, emb in embedders.items():
        metrics: dict[str, dict[str, float]] = {}
        seconds: dict[str, float] = {}
        for data in datas:
            t0 = time.perf_counter()
            if engine == "fast":
                metrics[data.name] = fast_evaluate_task(emb, data, backend, ignore_identical_ids)
            else:
                metrics.update(mteb_evaluate(emb, [data], mode, ignore_identical_ids))
            seconds[data.name] = round(time.perf_counter() - t0, 2)
            if log:
                m = data.spec.metric
                log(f"{mode:<10} {data.name:<14} {m} {100 * metrics[data.name][m]:6.2f}  ({seconds[data.name]:.1f}s)")
        scores = {d.name: metrics[d.name][d.spec.metric] for d in datas}
        rows.append({"mode": mode, "encoders": emb.describe(), "engine": engine, "scores": scores,
                     "average": float(np.mean(list(scores.values()))), "metrics": metrics, "seconds": seconds})
    return rows


# --------------------------------------------------------------------------------------------------- alignment


def truncate(x: np.ndarray, dim: int) -> np.ndarray:
    """The first `dim` coordinates (Matryoshka truncation), renormalised."""
    return normalize(np.asarray(x)[:, :dim])


def int8_calibration(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension (minimum, step) for 256-level scalar quantisation, from calibration vectors."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = x.min(0), x.max(0)
    return lo, np.maximum(hi - lo, 1e-12) / 255.0


def quantize_int8(x: np.ndarray, calibration: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Per-dimension scalar quantisation to int8 (levels -128..127), ranges from `calibration` or `x`."""
    lo, step = calibration if calibration is not None else int8_calibration(x)
    q = np.rint((np.asarray(x, dtype=np.float32) - lo) / step) - 128
    return np.clip(q, -128, 127).astype(np.int8)


def dequantize_int8(q: np.ndarray, calibration: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    lo, step = calibration
    return ((q.astype(np.float32) + 128) * step + lo).astype(np.float32)


def quantize_binary(x: np.ndarray) -> np.ndarray:
    """Sign bits, packed 8 per byte (uint8, [n, ceil(dim/8)])."""
    return np.packbits(np.asarray(x) > 0, axis=1)


def hamming_similarity(a: np.ndarray, b: np.ndarray, dim: int) -> np.ndarray:
    """dim - 2 * Hamming distance between packed bit vectors (the dot product of the +-1 vectors)."""
    table = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.int32)
    out = np.empty((len(a), len(b)), dtype=np.float32)
    for i in range(len(a)):
        out[i] = dim - 2 * table[np.bitwise_xor(a[i][None, :], b)].sum(1)
    return out


def quantized_scores(Q: np.ndarray, D: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, Callable]:
    """Transformed (Q, D) and a score function for a quantisation kind (ranges calibrated on documents)."""
    if kind == "float32":
        return normalize(Q), normalize(D), lambda q, d: q @ d.T
    if kind == "int8":
        cal = int8_calibration(D)
        return (normalize(dequantize_int8(quantize_int8(Q, cal), cal)),
                normalize(dequantize_int8(quantize_int8(D, cal), cal)), lambda q, d: q @ d.T)
    if kind == "binary":
        dim = Q.shape[1]
        return quantize_binary(Q), quantize_binary(D), lambda q, d: hamming_similarity(q, d, dim)
    if kind == "binary_float_query":  # binary documents, float queries: q . sign(d)
        return normalize(Q), np.where(D > 0, 1.0, -1.0).astype(np.float32), lambda q, d: q @ d.T
    raise ValueError(f"unknown quantisation {kind!r}")


def _ndcg_of(Q: np.ndarray, D: np.ndarray, data: RetrievalData, kind: str = "float32",
             ignore_identical_ids: bool = True) -> float:
    q, d, fn = quantized_scores(Q, D, kind)
    run = search(q, d, data.query_ids, data.doc_ids, top_k=10, ignore_identical_ids=ignore_identical_ids, score_fn=fn)
    return retrieval_metrics(data.qrels, run)["ndcg_at_10"]


def cosine_summary(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Distribution of row-wise cosine similarity between two views of the same texts."""
    c = (normalize(a) * normalize(b)).sum(1)
    return {"n": int(len(c)), "mean": float(c.mean()), "p5": float(np.percentile(c, 5)),
            "median": float(np.median(c)), "min": float(c.min())}


def neighbour_agreement(Qa: np.ndarray, Qb: np.ndarray, D: np.ndarray, data: RetrievalData, k: int = 10,
                        ignore_identical_ids: bool = True) -> float:
    """Mean overlap (0..1) of the top-k documents retrieved for each query by two query encoders."""
    ra = search(Qa, D, data.query_ids, data.doc_ids, top_k=k, ignore_identical_ids=ignore_identical_ids)
    rb = search(Qb, D, data.query_ids, data.doc_ids, top_k=k, ignore_identical_ids=ignore_identical_ids)
    return float(np.mean([len(set(ra[q]) & set(rb[q])) / k for q in data.query_ids]))


def alignment(models: ModelSet, datas: Sequence[TaskData], *, max_docs: int = 2000, seed: int = 0,
              dims: Sequence[int] = TRUNCATE_DIMS, ignore_identical_ids: bool = True,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Student-vs-teacher diagnostics per task on held-out (evaluation) text.

    - ``cosine``: cos(student(x), teacher(x)) over queries and a sample of documents (retrieval) or sentences (STS);
    - ``top10_agreement``: overlap of the top-10 documents for student queries vs teacher queries (teacher documents);
    - ``truncation``: asymmetric and teacher nDCG@10 on the first 512/256/128/64 dimensions;
    - ``quantization``: asymmetric and teacher nDCG@10 with int8 / binary vectors (both sides), and binary documents
      scored against float queries.
    """
    if models.student is None or models.teacher is None:
        raise LeafkdError("--alignment needs both a student and a teacher")
    S, T = models.student, models.teacher
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {}
    for data in datas:
        t0 = time.perf_counter()
        res: dict[str, Any] = {}
        if isinstance(data, RetrievalData):
            Tq, Td = T.embed(data.query_texts, "query"), T.embed(data.doc_texts, "document")
            Sq = S.embed(data.query_texts, "query")
            idx = np.sort(rng.choice(len(data.doc_texts), size=min(max_docs, len(data.doc_texts)), replace=False))
            sample = [data.doc_texts[i] for i in idx]
            Sd = S.embed(sample, "document")
            res["cosine"] = {"queries": cosine_summary(Sq, Tq), "documents": cosine_summary(Sd, Td[idx])}
            agree = {"asymmetric": neighbour_agreement(Sq, Tq, Td, data, 10, ignore_identical_ids)}
            if models.ridge is not None and models.base is not None:
                Rq = LinearMapEmbedder(models.base, models.ridge).embed(data.query_texts, "query")
                agree["ridge"] = neighbour_agreement(Rq, Tq, Td, data, 10, ignore_identical_ids)
            res["top10_agreement"] = agree
            full = Td.shape[1]
            use_dims = [full] + [d for d in dims if d < full]
            res["truncation"] = {
                who: {str(d): _ndcg_of(truncate(Q, d), truncate(Td, d), data, "float32", ignore_identical_ids)
                      for d in use_dims}
                for who, Q in (("asymmetric", Sq), ("teacher", Tq))}
            res["quantization"] = {
                who: {k: _ndcg_of(Q, Td, data, k, ignore_identical_ids)
                      for k in ("float32", "int8", "binary", "binary_float_query")}
                for who, Q in (("asymmetric", Sq), ("teacher", Tq))}
        else:
            texts = list(dict.fromkeys(data.sentences1 + data.sentences2))
            idx = np.sort(rng.choice(len(texts), size=min(max_docs, len(texts)), replace=False))
            sample = [texts[i] for i in idx]
            res["cosine"] = {"sentences": cosine_summary(S.embed(sample, None, prompts=False),
                                                         T.embed(sample, None, prompts=False))}
        res["seconds"] = round(time.perf_counter() - t0, 2)
        out[data.name] = res
        if log:
            c = res["cosine"].get("queries") or res["cosine"]["sentences"]
            extra = f"  top10 {res['top10_agreement']['asymmetric']:.3f}" if "top10_agreement" in res else ""
            log(f"alignment  {data.name:<14} cos mean {c['mean']:.3f} p5 {c['p5']:.3f}{extra}")
    return out


# --------------------------------------------------------------------------------------------------- a whole run


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
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
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
    align = alignment(models, datas, ignore_identical_ids=ignore_identical_ids, log=log) if with_alignment else None
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
