"""Building an index: embed a corpus with the teacher (resumable) and fill a FAISS index, written atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leafkd.atomic import atomic_dir, write_json, write_npy
from leafkd.data.documents import Document, check_unique_ids, join_title, read_documents
from leafkd.errors import LeafkdError
from leafkd.retrieval.faiss_utils import (
    add_vectors,
    apply_search_params,
    check_search_params,
    default_search_params,
    faiss_build_name,
    gpu_count,
    make_index,
    probe_search,
    supports_ids,
    train_index,
)
from leafkd.retrieval.manifest import (
    DEFAULT_INDEXES_DIR,
    FORMAT,
    MANIFEST,
    NAME_RE,
    check_indexes_dir,
    index_path,
    read_manifest,
    utc_now,
    writer_lock,
)
from leafkd.retrieval.segments import write_new_index
from leafkd.vectors import normalize

logger = logging.getLogger(__name__)

# Documents embedded per step of a build: bounds memory and is the unit a resumed build restarts from.
BUILD_CHUNK = 100_000


def embed_documents(model, docs: Sequence[Document], *, prompt: str | None = None, device: str | None = None,
                    work_dir: Path | None = None, show_progress: bool = False) -> np.ndarray:
    """Teacher embeddings of documents (title + text), normalised; chunks are cached in ``work_dir`` to resume."""
    from leafkd.runtime.encode import encode

    texts = [join_title(d.title, d.text) for d in docs]
    out = np.empty((len(texts), 0), dtype=np.float32)
    parts = []
    for c, start in enumerate(range(0, len(texts), BUILD_CHUNK)):
        cache = work_dir / f"chunk{c:05d}.npy" if work_dir is not None else None
        if cache is not None and cache.exists():
            parts.append(np.load(cache))
            continue
        vecs = encode(model, texts[start : start + BUILD_CHUNK], prompt=prompt, device=device,
                      show_progress=show_progress, desc=f"embed {start}+")
        vecs = normalize(vecs)
        if cache is not None:
            write_npy(cache, vecs)
        parts.append(vecs)
    if parts:
        out = np.concatenate(parts)
    return out


@dataclass
class CorpusVectors:
    """The teacher vectors of a corpus and the teacher they come from."""

    vectors: np.ndarray  # normalised, one row per document
    teacher: str  # what the manifest names as the teacher
    fingerprint: str
    # fingerprint -> capture settings ({"prompt", "normalize"}) that students of this teacher may record
    variants: dict[str, dict] = field(default_factory=dict)
    work_dir: Path | None = None  # the resumable embedding cache, removed once the index is written


def precomputed_vectors(vectors: np.ndarray | str | Path, docs: Sequence[Document], factory: str,
                        teacher: str | Path | None, teacher_fingerprint: str | None) -> CorpusVectors:
    """Vectors of a black-box teacher (an array, or a .npy file in corpus order)."""
    from leafkd.models import blackbox_fingerprint

    vec_path = Path(vectors) if isinstance(vectors, (str, Path)) else None
    arr = np.load(vec_path) if vec_path is not None else np.asarray(vectors)
    if arr.ndim != 2 or len(arr) != len(docs):
        raise LeafkdError(f"vectors have shape {arr.shape}, expected ({len(docs)}, dim)")
    if teacher_fingerprint is None:
        if vec_path is None:
            raise LeafkdError("precomputed vectors given as an array need teacher_fingerprint")
        teacher_fingerprint = blackbox_fingerprint(vec_path)
    name = str(teacher) if teacher is not None else f"blackbox:{vec_path.name if vec_path else 'array'}"
    make_index(factory, arr.shape[1])  # a bad factory string fails before any work
    return CorpusVectors(normalize(arr), name, teacher_fingerprint)


def teacher_identity(teacher: str | Path | None, teacher_fingerprint: str | None, prompts: Sequence[str | None]
                     ) -> tuple[Path | None, str, dict[str, dict]]:
    """(model folder or None, fingerprint, accepted fingerprint variants) of the teacher that embeds the corpus."""
    from leafkd.models import fingerprint, resolve_model

    tpath = resolve_model(teacher) if teacher is not None else None
    variants: dict[str, dict] = {}
    if teacher_fingerprint is None:
        if tpath is None:
            raise LeafkdError("an in-memory teacher model needs teacher_fingerprint")
        teacher_fingerprint = fingerprint(tpath)
        # Students record the fingerprint of the teacher *as captured* (leafkd.capture folds the capture
        # prompt and normalisation into it), so every plausible capture setting of this teacher is accepted.
        for p in dict.fromkeys([None, *prompts]):
            for norm in (False, True):
                variants[fingerprint(tpath, prompt=p, normalize=norm)] = {"prompt": p, "normalize": norm}
    return tpath, teacher_fingerprint, variants


def teacher_vectors(docs: Sequence[Document], folder: Path, factory: str, *, teacher: str | Path | None, model,
                    teacher_fingerprint: str | None, doc_prompt: str | None, query_prompt: str | None,
                    device: str | None, show_progress: bool) -> CorpusVectors:
    """Embed the corpus with the teacher (a folder, or an in-memory model with its fingerprint), resumably."""
    from leafkd.models import embedding_dimension, load_model

    if teacher is None and model is None:
        raise LeafkdError("a teacher model (or precomputed vectors) is needed to build an index")
    tpath, teacher_fingerprint, variants = teacher_identity(teacher, teacher_fingerprint, [doc_prompt, query_prompt])
    if model is None:
        import torch

        model = load_model(tpath, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))  # type: ignore[arg-type]
    make_index(factory, embedding_dimension(model))  # fail before embedding
    # A resumable work folder keyed by what determines the vectors.
    h = hashlib.sha256(json.dumps([teacher_fingerprint, doc_prompt, len(docs), docs[0].id, docs[-1].id,
                                   BUILD_CHUNK]).encode()).hexdigest()[:12]
    work = folder.parent / f".{folder.name}.embed-{h}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    emb = embed_documents(model, docs, prompt=doc_prompt, device=device, work_dir=work, show_progress=show_progress)
    logger.info("embedded %d documents in %.1fs on %s", len(docs), time.perf_counter() - t0, model.device)
    name = str(tpath) if tpath is not None else "in-memory model"
    return CorpusVectors(emb, name, teacher_fingerprint, variants, work)


def populate(factory: str, vectors: np.ndarray, use_gpu: bool) -> tuple[Any, str, np.ndarray | None, str]:
    """Make, train and fill a CPU index; returns (index, label mode, keys or None, where it was trained)."""
    index = make_index(factory, vectors.shape[1])
    where = "cpu"
    if not index.is_trained:
        where = train_index(index, vectors, use_gpu)
    ids_mode = supports_ids(index)
    keys = np.arange(len(vectors), dtype=np.int64) if ids_mode else None
    add_vectors(index, vectors, keys)
    return index, ("keys" if ids_mode else "positions"), keys, where


def new_manifest(name: str, corpus: CorpusVectors, count: int, *, factory: str, labels: str, built_with: str,
                 doc_prompt: str | None, query_prompt: str | None, search_params: dict | None, fp16: bool) -> dict:
    """The manifest of a freshly built index (generation 1; files and checksums are added when written)."""
    params = default_search_params(factory)
    params.update(search_params or {})
    return {
        "format": FORMAT,
        "name": name,
        "teacher": corpus.teacher,
        "teacher_fingerprint": corpus.fingerprint,
        "teacher_fingerprints": corpus.variants or {corpus.fingerprint: {}},
        "dim": int(corpus.vectors.shape[1]),
        "metric": "inner_product",
        "normalized": True,
        "factory": factory,
        "labels": labels,
        "count": count,
        "rows": count,
        "tombstones": 0,
        "next_key": count,
        "doc_prompt": doc_prompt,
        "query_prompt": query_prompt,
        "search_params": params,
        "fp16": bool(fp16),
        "built_with": built_with,
        "created": utc_now(),
        "generation": 1,
    }


def check_target(folder: Path, overwrite: bool) -> None:
    """Refuse a build that would replace anything but an existing leafkd index, and that only with ``overwrite``:
    never another folder, a file, or a symbolic link (nor the folder it points at)."""
    if not NAME_RE.match(folder.name):
        raise LeafkdError(f"index name {folder.name!r}: use letters, digits, '.', '_' or '-' (not a path)")
    check_indexes_dir(folder.parent)
    if folder.is_symlink():
        raise LeafkdError(f"{folder} is a symbolic link; leafkd builds and replaces only real index folders "
                          "(remove the link, or build where it points)")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise LeafkdError(f"{folder} exists and is not a folder; leafkd will not replace it")
    try:
        read_manifest(folder)
    except LeafkdError as e:
        raise LeafkdError(f"{folder} exists and is not a readable leafkd index ({e}); leafkd replaces only its own "
                          "index folders, even with --overwrite") from None
    if not overwrite:
        raise LeafkdError(f"{folder}: an index already exists (use `leafkd index add`, or --overwrite to rebuild)")


def read_corpus(folder: Path, corpus: str | Path | Sequence[Document], overwrite: bool) -> list[Document]:
    """The documents to index, after checking the index name and that no index would be replaced by accident."""
    check_target(folder, overwrite)
    docs = list(corpus) if not isinstance(corpus, (str, Path)) else read_documents(corpus)
    check_unique_ids(docs, corpus if isinstance(corpus, (str, Path)) else "documents")
    if not docs:
        raise LeafkdError("no documents to index")
    return docs


def remove_embed_caches(folder: Path) -> None:
    """Drop every resumable embedding cache of this index name (stale once an index of that name is written)."""
    pattern = re.compile(rf"^\.{re.escape(folder.name)}\.embed-[0-9a-f]{{12}}$")
    for p in folder.parent.iterdir():
        if pattern.match(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


def build_index(name_or_path: str | Path, corpus: str | Path | Sequence[Document], *, teacher: str | Path | None = None,
                model=None, vectors: np.ndarray | str | Path | None = None, factory: str = "Flat",
                indexes_dir: str | Path = DEFAULT_INDEXES_DIR, gpu: bool | None = None, fp16: bool = False,
                doc_prompt: str | None = None, query_prompt: str | None = None, search_params: dict | None = None,
                teacher_fingerprint: str | None = None, overwrite: bool = False, device: str | None = None,
                show_progress: bool = False) -> Path:
    """Embed a corpus with the teacher and build ``indexes/<name>/`` atomically; returns the folder.

    ``vectors`` (array or .npy path, one row per document in corpus order) replaces the teacher for black-box
    teachers; then ``teacher_fingerprint`` defaults to `leafkd.models.blackbox_fingerprint` of the file.
    ``gpu=None`` uses a GPU when FAISS sees one. ``fp16`` marks the index to be searched in float16 on GPUs.
    """
    folder = index_path(name_or_path, indexes_dir)
    check_search_params(search_params)  # before any embedding
    docs = read_corpus(folder, corpus, overwrite)
    use_gpu = gpu_count() > 0 if gpu is None else bool(gpu)
    if use_gpu and gpu_count() == 0:
        raise LeafkdError("--gpu asked, but FAISS sees no GPU (is faiss-gpu installed and CUDA visible?)")
    if vectors is not None:
        embedded = precomputed_vectors(vectors, docs, factory, teacher, teacher_fingerprint)
    else:
        embedded = teacher_vectors(docs, folder, factory, teacher=teacher, model=model,
                                   teacher_fingerprint=teacher_fingerprint, doc_prompt=doc_prompt,
                                   query_prompt=query_prompt, device=device, show_progress=show_progress)
    t0 = time.perf_counter()
    index, labels, keys, where = populate(factory, embedded.vectors, use_gpu)
    apply_search_params(index, default_search_params(factory))
    apply_search_params(index, search_params, strict=True)  # what the user asked for must exist and work
    probe_search(index)
    built_with = faiss_build_name() + (f" (trained on {where.upper()})" if where != "cpu" or use_gpu else "")
    logger.info("built %s over %d vectors in %.1fs with %s", factory, index.ntotal, time.perf_counter() - t0,
                built_with)
    manifest = new_manifest(folder.name, embedded, len(docs), factory=factory, labels=labels, built_with=built_with,
                            doc_prompt=doc_prompt, query_prompt=query_prompt, search_params=search_params, fp16=fp16)
    with writer_lock(folder):
        check_target(folder, overwrite)  # again: another process may have made it while we embedded
        with atomic_dir(folder) as tmp:  # issue 20: base + keys + SQLite document store (leafkd.retrieval.segments)
            write_json(tmp / MANIFEST, write_new_index(tmp, manifest, index, docs, keys))
        remove_embed_caches(folder)
    return folder
