"""Embedders for the evaluation modes: texts to vectors for a role (query or document).

- ``teacher``: the teacher encodes everything (queries with the teacher's query prompt);
- ``student``: the distilled student encodes everything;
- ``asymmetric``: the student encodes queries, the teacher encodes documents (LEAF's serving setup);
- ``base``: the student's base model before distillation, on its own;
- ``ridge``: the base model's vectors through a closed-form ridge map into the teacher's space (queries),
  teacher documents.

All draw vectors from one in-memory `EmbeddingCache`, so the teacher's document vectors are computed once per
run and shared between modes and engines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from leafkd.choices import Choice
from leafkd.data.paths import data_dir as find_data_dir
from leafkd.errors import LeafkdError
from leafkd.student.info import read_student_info


class Mode(Choice):
    """An evaluation row: which model encodes queries and which encodes documents (see the module docstring)."""

    TEACHER = "teacher"
    STUDENT = "student"
    ASYMMETRIC = "asymmetric"
    BASE = "base"
    RIDGE = "ridge"


def parse_modes(modes: Iterable[str]) -> list[Mode]:
    """`Mode`s from their names; an unknown name is a one-line `LeafkdError`."""
    return [Mode.parse(mode, "mode") for mode in modes]


# The models each mode encodes with, as `ModelSet` attributes.
MODE_MODELS = {Mode.TEACHER: ("teacher",), Mode.STUDENT: ("student",), Mode.ASYMMETRIC: ("student", "teacher"),
               Mode.BASE: ("base",), Mode.RIDGE: ("base", "teacher")}


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

    def put(self, key: tuple[str, str | None], texts: Sequence[str], vectors: np.ndarray) -> None:
        """Known vectors of `texts` (e.g. the teacher's, from a capture): later `get`s use them, computing none."""
        store = self._store.setdefault(key, {})
        for t, v in zip(texts, np.asarray(vectors, dtype=np.float32)):
            store[t] = v

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
    """A SentenceTransformer folder encoded with `leafkd.runtime.encode.encode`, with optional role prompts."""

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

    @property
    def max_seq_length(self) -> int:
        length = self.model.max_seq_length or 0
        return int(length) if length != float("inf") else 0  # a static student states no limit

    def prompt_for(self, role: str | None, prompts: bool = True) -> str | None:
        if not prompts:
            return None
        return {"query": self.query_prompt, "document": self.document_prompt}.get(role or "")

    def embed(self, texts: Sequence[str], role: str | None = None, prompts: bool = True) -> np.ndarray:
        from leafkd.runtime.encode import encode

        prompt = self.prompt_for(role, prompts)

        def compute(missing: list[str]) -> np.ndarray:
            return encode(self.model, missing, prompt=prompt, batch_tokens=self.batch_tokens, device=self.device,
                          show_progress=self.progress, desc=f"{self.name} {role or 'text'}")

        return self.cache.get((self.key, prompt), list(texts), compute)

    def prefill(self, texts: Sequence[str], vectors: np.ndarray, role: str | None = "document") -> None:
        """Vectors this model is known to give `texts` in `role` (computed elsewhere: never computed again)."""
        self.cache.put((self.key, self.prompt_for(role)), texts, vectors)

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
    """y = x @ W + b (W [dx, dy]): a linear map from one embedding space into another; `alpha` is relative."""

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
    from leafkd.runtime.encode import encode

    return encode(source, list(texts), batch_tokens=batch_tokens, device=device)


def fit_ridge_map(base_model, teacher, texts: Sequence[str], alpha: float = 1e-2, *,
                  batch_tokens: int | None = None, device: str | None = None) -> RidgeMap:
    """Ridge regression (`leafkd.vectors.ridge_fit`) from the base student's vectors to the teacher's on `texts`.

    `base_model` and `teacher` are SentenceTransformer models or `Embedder`s; `teacher` may also be an array of
    precomputed teacher vectors, one row per text. `alpha` is relative, as in training's projection warm start:
    the penalty is alpha times the mean eigenvalue of the centred Gram matrix of the base vectors.
    """
    from leafkd.vectors import ridge_fit  # here: importing this module (the CLI's parser does) loads no torch

    if len(texts) < 2:
        raise LeafkdError("the ridge map needs at least 2 training texts")
    X = _vectors_of(base_model, texts, batch_tokens, device).astype(np.float64)
    Y = _vectors_of(teacher, texts, batch_tokens, device).astype(np.float64)
    W, b = ridge_fit(X, Y, alpha)
    ridge = RidgeMap(W.T, b, float(alpha), len(texts))
    residual = Y - X @ ridge.W - ridge.b
    ridge.fit_r2 = 1.0 - float((residual ** 2).sum() / max(((Y - Y.mean(0)) ** 2).sum(), 1e-12))
    return ridge


def ridge_texts(data_dir: str | Path | None = None, n: int = 20000, seed: int = 0) -> list[str]:
    """A seeded sample of `n` unlabeled training texts from ``DATA/train`` (never evaluation data)."""
    from leafkd.data.sources import load_corpus

    root = find_data_dir(data_dir)
    assert root is not None  # required: a missing data folder raises LeafkdError
    train = root / "train"
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


def resolve_relative(value: str | None, folder: Path) -> str | None:
    """A path recorded in leafkd.json: as written if it exists, else relative to the student folder."""
    if not value:
        return None
    p = Path(value)
    if p.exists() or p.is_absolute():
        return str(p)
    alt = folder / p
    return str(alt) if alt.exists() else str(p)


def model_prompts(model) -> dict[str, str]:
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

    def embedders(self, modes: Iterable[str]) -> dict[str, Embedder]:
        """An embedder per mode, keyed by the mode's name; a mode whose models are missing is a `LeafkdError`."""
        out: dict[str, Embedder] = {}
        for mode in parse_modes(modes):
            models = [getattr(self, name) for name in MODE_MODELS[mode]]
            lacking = [name for name, m in zip(MODE_MODELS[mode], models) if m is None]
            if lacking:
                raise LeafkdError(f"mode {mode.value!r} needs a {' and a '.join(lacking)} model (give --{lacking[0]})")
            if mode is Mode.ASYMMETRIC:
                out[mode.value] = AsymmetricEmbedder(models[0], models[1], "asymmetric")
            elif mode is Mode.RIDGE:
                if self.ridge is None:
                    raise LeafkdError("mode 'ridge' needs a fitted ridge map (fit_ridge_map)")
                out[mode.value] = AsymmetricEmbedder(LinearMapEmbedder(models[0], self.ridge), models[1], "ridge")
            else:
                out[mode.value] = models[0]
        return out


def _open_model(path: str | Path, name: str, query_prompt: str | None = None, *, device: str | None,
                batch_tokens: int | None, cache: EmbeddingCache, progress: bool) -> ModelEmbedder:
    """Load a model folder as an embedder with its own saved prompts; `query_prompt` overrides ("" for none)."""
    from leafkd.models import resolve_model
    from leafkd.student.static import load_student

    folder = resolve_model(path)
    model = load_student(folder, device=device)  # any model; a static student as leafkd's encoders need it
    prompts = model_prompts(model)
    return ModelEmbedder(model, folder, name=name,
                         query_prompt=query_prompt if query_prompt is not None else prompts.get("query"),
                         document_prompt=prompts.get("document") or prompts.get("passage"),
                         batch_tokens=batch_tokens, device=device, cache=cache, progress=progress)


def load_models(teacher: str | Path | None = None, student: str | Path | None = None, base: str | Path | None = None,
                *, teacher_query_prompt: str | None = None, student_query_prompt: str | None = None,
                device: str | None = None, batch_tokens: int | None = None, progress: bool = False,
                use_base: bool = True) -> ModelSet:
    """Load teacher/student/base; a student's ``leafkd.json`` supplies the teacher, base and query prompt.

    Prompts: the teacher's query prompt is `teacher_query_prompt`, else leafkd.json's ``query_prompt`` (null: none),
    else the teacher's own ``prompts["query"]``; the student uses its own ``prompts`` (training stores the query
    prompt there) unless `student_query_prompt` is given ("" for none); the base uses its own. STS never uses
    prompts.
    """
    from leafkd.models import fingerprint, resolve_model

    meta: dict[str, Any] = {}
    student_path = None
    if student is not None:
        student_path = resolve_model(student)
        meta = read_student_info(student_path)
        if teacher is None:
            teacher = resolve_relative(meta.get("teacher"), student_path)
        if base is None and use_base:
            base = resolve_relative(meta.get("base"), student_path)
    if teacher is None and student is None:
        raise LeafkdError("give a --teacher or a --student model")
    ms = ModelSet()
    open_model = partial(_open_model, device=device, batch_tokens=batch_tokens, cache=ms.cache, progress=progress)
    if teacher is not None:
        if teacher_query_prompt is None and "query_prompt" in meta:
            teacher_query_prompt = meta["query_prompt"] or ""  # recorded at training; null means no prompt
        t = ms.teacher = open_model(teacher, "teacher", teacher_query_prompt)
        ms.info["teacher"] = {"path": str(t.path),
                              "fingerprint": meta.get("teacher_fingerprint") or fingerprint(t.path),
                              "query_prompt": t.query_prompt, "document_prompt": t.document_prompt, "dim": t.dim,
                              "max_seq_length": t.max_seq_length}
    if student_path is not None:
        s = ms.student = open_model(student_path, "student", student_query_prompt)
        ms.info["student"] = {"path": str(s.path), "fingerprint": fingerprint(s.path), "query_prompt": s.query_prompt,
                              "dim": s.dim, "max_seq_length": s.max_seq_length, "leafkd_json": meta or None}
        if ms.teacher is not None and ms.teacher.dim != s.dim:
            raise LeafkdError(f"{student_path}: the student emits {s.dim}-d vectors, the teacher "
                              f"{ms.teacher.dim}-d; asymmetric retrieval needs the same space")
    if base is not None and use_base:
        b = ms.base = open_model(base, "base")
        ms.info["base"] = {"path": str(b.path), "fingerprint": fingerprint(b.path), "dim": b.dim,
                           "max_seq_length": b.max_seq_length}
    return ms
