"""Teacher-built FAISS indexes on disk: build, save, load (checksummed), add and delete documents.

An index folder ``indexes/<name>/`` holds

- ``manifest.json``: teacher fingerprint, dimension, metric, factory string, counts, dates, the names of the
  current data files and their sha256 checksums;
- ``index.<gen>.faiss``: the FAISS index (inner product on L2-normalised vectors);
- ``docs.<gen>.jsonl``: the document store, one ``[id, title, text]`` row per line, in row order;
- ``keys.<gen>.npy``: the FAISS label of each row (only for indexes that store labels, i.e. IVF).

The FAISS factory string is the one vocabulary for index types (``Flat``, ``IVF4096,Flat``, ``HNSW32``,
``IVF4096,PQ64``, ``SQ8``, ...). Every write is atomic: a build happens in a temporary folder that is renamed
into place, and add/delete write new ``<gen+1>`` files first and then swap the manifest, so a failed or
interrupted update leaves the previous index loadable.

How FAISS labels map to document rows (``manifest["labels"]``):

- ``keys``: indexes that take explicit ids (IVF family) get a unique, increasing int64 key per document; rows are
  kept in key order so a label is found by binary search. Deletion removes the vectors from FAISS.
- ``positions``: every other index labels vectors by insertion position, which equals the row. Deletion uses
  ``remove_ids`` where FAISS compacts in order (Flat, SQ, PQ, LSH); where it cannot (HNSW), the row is kept as a
  tombstone (id ``null``, text blanked) and filtered out at search time.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from leafkd.atomic import atomic_dir, atomic_path, sha256_file, write_json, write_npy
from leafkd.data import corpus_file, iter_jsonl, join_title
from leafkd.errors import LeafkdError

FORMAT = "leafkd-index/1"
MANIFEST = "manifest.json"
DEFAULT_INDEXES_DIR = Path(os.environ.get("LEAFKD_INDEXES", "indexes"))
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Documents embedded per step of a build: bounds memory and is the unit a resumed build restarts from.
BUILD_CHUNK = 100_000


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError:
        raise LeafkdError("FAISS is not installed: pip install 'leafkd[cpu]' (faiss-cpu) or 'leafkd[gpu]'") from None
    return faiss


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    faiss = _faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:
        return 0


def faiss_build_name() -> str:
    faiss = _faiss()
    kind = "faiss-gpu" if hasattr(faiss, "StandardGpuResources") else "faiss-cpu"
    return f"{kind} {getattr(faiss, '__version__', '?')}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def normalize(x: np.ndarray) -> np.ndarray:
    """Float32, C-contiguous, L2-normalised rows (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, np.maximum(norms, 1e-12), out=x)
    return x


# ----------------------------------------------------------------------------------------------- documents


@dataclass
class Document:
    id: str
    title: str
    text: str


def read_documents(path: str | Path, id_start: int = 0, taken: set[str] | frozenset = frozenset()) -> list[Document]:
    """Documents of a BEIR folder / ``corpus.jsonl``, a ``.jsonl`` (``_id``/``id``, ``title``, ``text``) or a ``.txt``.

    Documents without an id get the next free number from ``id_start`` (skipping ``taken`` ids); empty documents
    are dropped.
    """
    counter = [id_start]

    def new_id() -> str:
        while str(counter[0]) in taken:
            counter[0] += 1
        counter[0] += 1
        return str(counter[0] - 1)

    path = corpus_file(path)
    docs: list[Document] = []
    try:
        if path.suffix == ".jsonl":
            for lineno, obj in iter_jsonl(path):
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise LeafkdError(f"{path}:{lineno}: no string 'text' field")
                raw_id = obj.get("_id", obj.get("id"))
                doc_id = str(raw_id) if raw_id is not None else new_id()
                title = obj.get("title") if isinstance(obj.get("title"), str) else ""
                if not (title.strip() or obj["text"].strip()):
                    continue
                docs.append(Document(doc_id, title, obj["text"]))
        elif path.suffix in (".txt", ""):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        docs.append(Document(new_id(), "", line.strip()))
        else:
            raise LeafkdError(f"{path}: unknown corpus format {path.suffix!r} (use a BEIR folder, .jsonl or .txt)")
    except UnicodeDecodeError as e:
        raise LeafkdError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not docs:
        raise LeafkdError(f"{path}: no documents")
    seen: set[str] = set()
    dups = [d.id for d in docs if d.id in seen or seen.add(d.id)]
    if dups:
        raise LeafkdError(f"{path}: duplicate document ids ({', '.join(dups[:5])}{', ...' if len(dups) > 5 else ''})")
    return docs


def _write_docs(path: Path, ids: Sequence[str | None], titles: Sequence[str], texts: Sequence[str]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in zip(ids, titles, texts):
                f.write(json.dumps(row, ensure_ascii=False))
                f.write("\n")


def _read_docs(path: Path) -> tuple[list[str | None], list[str], list[str]]:
    ids: list[str | None] = []
    titles: list[str] = []
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                i, t, x = json.loads(line)
            except (ValueError, TypeError):
                raise LeafkdError(f"{path}:{lineno}: not a document row") from None
            ids.append(i)
            titles.append(t)
            texts.append(x)
    return ids, titles, texts


# ----------------------------------------------------------------------------------------------- FAISS helpers


def _make_index(factory: str, dim: int):
    faiss = _faiss()
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except Exception as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise LeafkdError(f"FAISS cannot make index {factory!r} for {dim}-d vectors ({msg})") from None


def _ivf_nlist(index) -> int | None:
    faiss = _faiss()
    try:
        ivf = faiss.extract_index_ivf(index)
    except Exception:
        return None
    return int(ivf.nlist) if ivf is not None else None


def apply_search_params(index, params: dict[str, Any] | None, gpu: bool = False) -> None:
    """Set search-time knobs (``nprobe``, ``efSearch``, ...) where the index has them."""
    if not params:
        return
    faiss = _faiss()
    space = faiss.GpuParameterSpace() if gpu and hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    for key, value in params.items():
        try:
            space.set_index_parameter(index, key, value)
        except Exception:
            pass  # a knob the index does not have (nprobe on a flat index) is not an error


def default_search_params(factory: str) -> dict[str, Any]:
    # FAISS defaults (nprobe=1, efSearch=16) trade far too much recall for speed at retrieval sizes.
    params: dict[str, Any] = {}
    if "IVF" in factory:
        params["nprobe"] = 32
    if "HNSW" in factory:
        params["efSearch"] = 128
    return params


class _GpuRes:
    """One StandardGpuResources per process and device (they hold scratch memory and streams).

    ``LEAFKD_FAISS_TEMP_MB`` sets the scratch ("temp") memory: flat search tiles the distance matrix to fit it,
    so more scratch means fewer, larger GEMM + k-selection passes on big indexes.
    """

    _res: dict[int, Any] = {}

    @classmethod
    def get(cls, device: int = 0):
        if device not in cls._res:
            res = _faiss().StandardGpuResources()
            temp_mb = os.environ.get("LEAFKD_FAISS_TEMP_MB")
            if temp_mb:
                res.setTempMemory(int(float(temp_mb) * 2**20))
            cls._res[device] = res
        return cls._res[device]


def _env_flag(name: str) -> bool | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    return v.lower() not in ("0", "false", "no", "off")


def gpu_cloner_options(fp16: bool = False, use_cuvs: bool | None = None, multiple: bool = False):
    """Cloner options for `index_to_gpu`: float16 storage (``fp16``: half the memory; the flat GEMM runs on fp16
    tensor cores) and, where this FAISS build has cuVS, whether to use it (``None``: FAISS's default, or
    ``LEAFKD_FAISS_CUVS=0/1``)."""
    faiss = _faiss()
    co = faiss.GpuMultipleClonerOptions() if multiple else faiss.GpuClonerOptions()
    co.useFloat16 = bool(fp16)
    if use_cuvs is None:
        use_cuvs = _env_flag("LEAFKD_FAISS_CUVS")
    if use_cuvs is not None and hasattr(co, "use_cuvs"):
        co.use_cuvs = bool(use_cuvs)
    return co


def index_to_gpu(index, fp16: bool = False, shards: int = 1, use_cuvs: bool | None = None, res=None):
    """Clone a CPU index to one GPU, or shard it over ``shards`` GPUs (``-1``: all). Raises if unsupported."""
    faiss = _faiss()
    ngpu = gpu_count()
    if ngpu == 0:
        raise LeafkdError("no GPU visible to FAISS (faiss-cpu, or no CUDA device)")
    if shards == 1 or ngpu == 1:
        co = gpu_cloner_options(fp16, use_cuvs)
        return faiss.index_cpu_to_gpu(res if res is not None else _GpuRes.get(0), 0, index, co)
    co = gpu_cloner_options(fp16, use_cuvs, multiple=True)
    co.shard = True  # split the vectors over the GPUs (IndexShards); queries go to all of them
    n = ngpu if shards < 0 else min(shards, ngpu)
    return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=n)


def _train(index, vectors: np.ndarray, use_gpu: bool, log) -> str:
    """Train a trainable index; on a GPU the k-means runs there. Returns where it ran."""
    faiss = _faiss()
    nlist = _ivf_nlist(index)
    if nlist is not None and len(vectors) < nlist:
        raise LeafkdError(f"IVF with {nlist} lists needs at least {nlist} documents to train, the corpus has "
                          f"{len(vectors)}; use fewer lists (e.g. IVF{max(1, int(4 * np.sqrt(len(vectors))))},Flat) or Flat")
    # Train on a sample: k-means quality saturates long before millions of points.
    cap = max(256 * (nlist or 1), 100_000)
    if len(vectors) > cap:
        pick = np.sort(np.random.default_rng(0).choice(len(vectors), size=cap, replace=False))
        vectors = vectors[pick]
    where = "cpu"
    if use_gpu and nlist is not None:
        try:
            ivf = faiss.extract_index_ivf(index)
            # The documented way to put IVF k-means on the GPU for any IVF variant.
            ivf.clustering_index = faiss.index_cpu_to_gpu(_GpuRes.get(0), 0, faiss.IndexFlatIP(ivf.d))
            where = "gpu"
        except Exception as e:
            log(f"note: IVF training on the GPU is not available ({e}); training on the CPU")
    t0 = time.perf_counter()
    try:
        index.train(vectors)
    except Exception as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise LeafkdError(f"FAISS could not train the index ({msg})") from None
    finally:
        if where == "gpu":
            with contextlib.suppress(Exception):
                faiss.extract_index_ivf(index).clustering_index = None
    log(f"trained on {len(vectors)} vectors on the {where.upper()} in {time.perf_counter() - t0:.1f}s")
    return where


def _add(index, vectors: np.ndarray, keys: np.ndarray | None) -> None:
    if keys is not None:
        index.add_with_ids(vectors, keys.astype(np.int64))
    else:
        index.add(vectors)


def _supports_ids(index) -> bool:
    """Whether the index stores explicit labels (IVF family) -- probed on an empty clone so nothing is touched."""
    faiss = _faiss()
    try:
        probe = faiss.clone_index(index)
        if not probe.is_trained:
            return _ivf_nlist(index) is not None
        probe.add_with_ids(np.zeros((1, index.d), dtype=np.float32), np.array([7], dtype=np.int64))
        return True
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------- the index


@dataclass
class IndexInfo:
    """What `leafkd index info` shows."""

    path: Path
    manifest: dict

    def summary(self) -> str:
        m = self.manifest
        size = sum((self.path / f).stat().st_size for f in m["files"].values() if (self.path / f).exists())
        lines = [
            f"index      {self.path}",
            f"factory    {m['factory']} ({m['dim']}-d, {m['metric']}, labels by {m['labels']})",
            f"documents  {m['count']} live, {m['tombstones']} deleted-in-place",
            f"teacher    {m.get('teacher')} (fingerprint {m['teacher_fingerprint'][:16]}...)",
            f"built with {m.get('built_with')}; created {m.get('created')}, updated {m.get('updated')}",
            f"on disk    {size / 2**20:.1f} MiB (generation {m['generation']})",
        ]
        if m.get("search_params"):
            lines.append(f"search     {m['search_params']}")
        return "\n".join(lines)


@dataclass
class Hit:
    """One search result."""

    id: str
    score: float
    title: str
    text: str

    def to_dict(self, include_text: bool = True) -> dict:
        d: dict[str, Any] = {"id": self.id, "score": self.score}
        if include_text:
            d["title"] = self.title
            d["text"] = self.text
        return d


@dataclass
class DocIndex:
    """A loaded index: the FAISS index, the document store and the manifest."""

    path: Path | None
    manifest: dict
    index: Any  # faiss.Index (CPU copy; `search_index` may be a GPU clone)
    ids: list[str | None]
    titles: list[str]
    texts: list[str]
    keys: np.ndarray | None = None
    search_index: Any = None
    device: str = "cpu"
    _row_of_id: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.search_index is None:
            self.search_index = self.index
        self._row_of_id = {d: r for r, d in enumerate(self.ids) if d is not None}

    # -- facts
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def count(self) -> int:
        return len(self._row_of_id)

    @property
    def teacher_fingerprint(self) -> str:
        return str(self.manifest["teacher_fingerprint"])

    def accepts_fingerprint(self, fp: str | None) -> bool:
        """Whether vectors from a teacher with fingerprint ``fp`` (any capture prompt/normalisation) share this space."""
        return fp is not None and (fp == self.teacher_fingerprint or fp in self.manifest.get("teacher_fingerprints", {}))

    def nbytes(self) -> int:
        """Bytes of the index file (a good proxy for its memory)."""
        if self.path is None:
            return 0
        f = self.path / self.manifest["files"]["index"]
        return f.stat().st_size if f.exists() else 0

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._row_of_id

    def document(self, doc_id: str) -> Document:
        r = self._row_of_id[doc_id]
        return Document(doc_id, self.titles[r], self.texts[r])

    # -- device
    def to_gpu(self, fp16: bool = False, shards: int = 1) -> "DocIndex":
        """Search on the GPU(s) from now on; the CPU copy stays for saving. Raises LeafkdError if impossible."""
        try:
            gpu = index_to_gpu(self.index, fp16=fp16, shards=shards)
        except LeafkdError:
            raise
        except Exception as e:
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise LeafkdError(f"index {self.manifest['factory']!r} cannot move to the GPU ({msg})") from None
        apply_search_params(gpu, self.manifest.get("search_params"), gpu=True)
        self.search_index = gpu
        n = gpu_count() if shards < 0 else min(max(shards, 1), gpu_count())
        self.device = f"gpu x{n}" + (" fp16" if fp16 else "")
        return self

    # -- search
    def search(self, queries: np.ndarray, top_k: int) -> tuple[list[list[int]], list[list[float]]]:
        """Rows and inner-product scores of the ``top_k`` nearest live documents of each (normalised) query."""
        queries = normalize(np.atleast_2d(queries))
        if queries.shape[1] != self.dim:
            raise LeafkdError(f"query vectors are {queries.shape[1]}-d, the index is {self.dim}-d")
        ntotal = int(self.search_index.ntotal)
        tomb = int(self.manifest.get("tombstones", 0))
        k = min(top_k + tomb, ntotal)  # over-fetch past tombstones so top_k live rows remain
        if k <= 0 or len(queries) == 0:
            return [[] for _ in range(len(queries))], [[] for _ in range(len(queries))]
        # FAISS GPU indexes cap k (2048); a deeper search runs on the CPU copy.
        engine = self.search_index if k <= 2048 or self.search_index is self.index else self.index
        scores, labels = engine.search(queries, k)
        if self.manifest["labels"] == "keys":
            pos = np.searchsorted(self.keys, labels)
            pos = np.minimum(pos, len(self.keys) - 1)
            rows = np.where((labels >= 0) & (self.keys[pos] == labels), pos, -1)
        else:
            rows = labels
        out_rows, out_scores = [], []
        for r_row, s_row in zip(rows.tolist(), scores.tolist()):
            rr, ss = [], []
            for r, s in zip(r_row, s_row):
                if r < 0 or self.ids[r] is None:
                    continue
                rr.append(r)
                ss.append(float(s))
                if len(rr) == top_k:
                    break
            out_rows.append(rr)
            out_scores.append(ss)
        return out_rows, out_scores

    def hits(self, queries: np.ndarray, top_k: int) -> list[list[Hit]]:
        rows, scores = self.search(queries, top_k)
        return [[Hit(self.ids[r], s, self.titles[r], self.texts[r]) for r, s in zip(rr, ss)]  # type: ignore[arg-type]
                for rr, ss in zip(rows, scores)]


# ----------------------------------------------------------------------------------------------- paths, locks


def index_path(name_or_path: str | Path, indexes_dir: str | Path = DEFAULT_INDEXES_DIR) -> Path:
    """An index folder from a path (holding manifest.json) or a name under ``indexes_dir``."""
    p = Path(name_or_path)
    if (p / MANIFEST).exists() or p.is_absolute() or len(p.parts) > 1 or str(name_or_path).startswith("."):
        return p
    return Path(indexes_dir) / p


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """Exclusive writer lock on an index folder, so two updates never interleave."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.parent / f".{folder.name}.lock"
    with open(lock, "a+") as f:
        try:
            import fcntl

            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LeafkdError(f"{folder}: another leafkd process is writing this index") from None
        except ImportError:  # not POSIX: no lock
            pass
        yield


def _save_generation(folder: Path, gen: int, index, ids, titles, texts, keys: np.ndarray | None) -> dict[str, str]:
    """Write the data files of generation ``gen`` (each atomically) and return {role: filename}."""
    faiss = _faiss()
    files = {"index": f"index.{gen}.faiss", "docs": f"docs.{gen}.jsonl"}
    with atomic_path(folder / files["index"]) as tmp:
        faiss.write_index(index, str(tmp))
    _write_docs(folder / files["docs"], ids, titles, texts)
    if keys is not None:
        files["keys"] = f"keys.{gen}.npy"
        write_npy(folder / files["keys"], keys.astype(np.int64))
    return files


def _finish_manifest(folder: Path, manifest: dict, files: dict[str, str]) -> dict:
    manifest = dict(manifest)
    manifest["files"] = files
    manifest["checksums"] = {f: sha256_file(folder / f) for f in files.values()}
    manifest["updated"] = _now()
    return manifest


def _remove_stale(folder: Path, manifest: dict) -> None:
    """Drop data files of other generations (left by a completed swap or an interrupted update)."""
    keep = set(manifest["files"].values()) | {MANIFEST}
    for f in folder.iterdir():
        if f.is_file() and f.name not in keep and re.match(r"^(index|docs|keys)\.\d+\.", f.name):
            with contextlib.suppress(OSError):
                f.unlink()


# ----------------------------------------------------------------------------------------------- build


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def embed_documents(model, docs: Sequence[Document], *, prompt: str | None = None, device: str | None = None,
                    work_dir: Path | None = None, show_progress: bool = False, log=_log_default) -> np.ndarray:
    """Teacher embeddings of documents (title + text), normalised; chunks are cached in ``work_dir`` to resume."""
    from leafkd.encode import encode

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


def _populate(factory: str, vectors: np.ndarray, use_gpu: bool, fp16: bool, log) -> tuple[Any, str, np.ndarray | None, str]:
    """Make, train and fill a CPU index; returns (index, label mode, keys or None, where it was built)."""
    index = _make_index(factory, vectors.shape[1])
    where = "cpu"
    if not index.is_trained:
        where = _train(index, vectors, use_gpu, log)
    ids_mode = _supports_ids(index)
    keys = np.arange(len(vectors), dtype=np.int64) if ids_mode else None
    _add(index, vectors, keys)
    return index, ("keys" if ids_mode else "positions"), keys, where


def build_index(name_or_path: str | Path, corpus: str | Path | Sequence[Document], *, teacher: str | Path | None = None,
                model=None, vectors: np.ndarray | str | Path | None = None, factory: str = "Flat",
                indexes_dir: str | Path = DEFAULT_INDEXES_DIR, gpu: bool | None = None, fp16: bool = False,
                doc_prompt: str | None = None, query_prompt: str | None = None, search_params: dict | None = None,
                teacher_fingerprint: str | None = None, overwrite: bool = False, device: str | None = None,
                show_progress: bool = False, log=_log_default) -> Path:
    """Embed a corpus with the teacher and build ``indexes/<name>/`` atomically; returns the folder.

    ``vectors`` (array or .npy path, one row per document in corpus order) replaces the teacher for black-box
    teachers; then ``teacher_fingerprint`` defaults to `leafkd.models.blackbox_fingerprint` of the file.
    ``gpu=None`` uses a GPU when FAISS sees one. ``fp16`` marks the index to be searched in float16 on GPUs.
    """
    from leafkd.models import blackbox_fingerprint, fingerprint, load_model, resolve_model

    folder = index_path(name_or_path, indexes_dir)
    if not _NAME_RE.match(folder.name):
        raise LeafkdError(f"index name {folder.name!r}: use letters, digits, '.', '_' or '-'")
    if (folder / MANIFEST).exists() and not overwrite:
        raise LeafkdError(f"{folder}: an index already exists (use `leafkd index add`, or --overwrite to rebuild)")
    docs = list(corpus) if not isinstance(corpus, (str, Path)) else read_documents(corpus)
    if not docs:
        raise LeafkdError("no documents to index")
    use_gpu = gpu_count() > 0 if gpu is None else bool(gpu)
    if use_gpu and gpu_count() == 0:
        raise LeafkdError("--gpu asked, but FAISS sees no GPU (is faiss-gpu installed and CUDA visible?)")
    teacher_name = None
    variants: dict[str, dict] = {}
    if vectors is not None:
        vec_path = Path(vectors) if isinstance(vectors, (str, Path)) else None
        arr = np.load(vec_path) if vec_path is not None else np.asarray(vectors)
        if arr.ndim != 2 or len(arr) != len(docs):
            raise LeafkdError(f"vectors have shape {arr.shape}, expected ({len(docs)}, dim)")
        if teacher_fingerprint is None:
            if vec_path is None:
                raise LeafkdError("precomputed vectors given as an array need teacher_fingerprint")
            teacher_fingerprint = blackbox_fingerprint(vec_path)
        teacher_name = str(teacher) if teacher is not None else f"blackbox:{vec_path.name if vec_path else 'array'}"
        _make_index(factory, arr.shape[1])  # a bad factory string fails before any work
        emb = normalize(arr)
        work = None
    else:
        if teacher is None and model is None:
            raise LeafkdError("a teacher model (or precomputed vectors) is needed to build an index")
        tpath = resolve_model(teacher) if teacher is not None else None
        if teacher_fingerprint is None:
            if tpath is None:
                raise LeafkdError("an in-memory teacher model needs teacher_fingerprint")
            teacher_fingerprint = fingerprint(tpath)
            # Students record the fingerprint of the teacher *as captured* (leafkd.capture folds the capture
            # prompt and normalisation into it), so every plausible capture setting of this teacher is accepted.
            for p in dict.fromkeys([None, doc_prompt, query_prompt]):
                for norm in (False, True):
                    variants[fingerprint(tpath, prompt=p, normalize=norm)] = {"prompt": p, "normalize": norm}
        teacher_name = str(tpath) if tpath is not None else "in-memory model"
        if model is None:
            import torch

            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = load_model(tpath, device=dev)
        _make_index(factory, int(model.get_sentence_embedding_dimension() or 0))  # fail before embedding
        # A resumable work folder keyed by what determines the vectors.
        h = hashlib.sha256(json.dumps([teacher_fingerprint, doc_prompt, len(docs), docs[0].id, docs[-1].id,
                                       BUILD_CHUNK]).encode()).hexdigest()[:12]
        work = folder.parent / f".{folder.name}.embed-{h}"
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        emb = embed_documents(model, docs, prompt=doc_prompt, device=device, work_dir=work,
                              show_progress=show_progress, log=log)
        log(f"embedded {len(docs)} documents in {time.perf_counter() - t0:.1f}s on {model.device}")

    t0 = time.perf_counter()
    index, labels, keys, where = _populate(factory, emb, use_gpu, fp16, log)
    built_with = faiss_build_name() + (f" (trained on {where.upper()})" if where != "cpu" or use_gpu else "")
    log(f"built {factory} over {index.ntotal} vectors in {time.perf_counter() - t0:.1f}s with {built_with}")
    params = default_search_params(factory)
    params.update(search_params or {})
    manifest = {
        "format": FORMAT,
        "name": folder.name,
        "teacher": teacher_name,
        "teacher_fingerprint": teacher_fingerprint,
        "teacher_fingerprints": variants or {teacher_fingerprint: {}},
        "dim": int(emb.shape[1]),
        "metric": "inner_product",
        "normalized": True,
        "factory": factory,
        "labels": labels,
        "count": len(docs),
        "rows": len(docs),
        "tombstones": 0,
        "next_key": len(docs),
        "doc_prompt": doc_prompt,
        "query_prompt": query_prompt,
        "search_params": params,
        "fp16": bool(fp16),
        "built_with": built_with,
        "created": _now(),
        "generation": 1,
    }
    with _lock(folder):
        with atomic_dir(folder) as tmp:
            files = _save_generation(tmp, 1, index, [d.id for d in docs], [d.title for d in docs],
                                     [d.text for d in docs], keys)
            write_json(tmp / MANIFEST, _finish_manifest(tmp, manifest, files))
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------------------------- load


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise LeafkdError(f"{folder}: no such index folder")
    path = folder / MANIFEST
    if not path.exists():
        raise LeafkdError(f"{folder}: not an index folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise LeafkdError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LeafkdError(f"{path}: not a {FORMAT} manifest")
    for key in ("teacher_fingerprint", "dim", "factory", "labels", "files", "checksums", "generation"):
        if key not in manifest:
            raise LeafkdError(f"{path}: manifest has no {key!r}")
    return manifest


def verify_index(folder: str | Path, manifest: dict | None = None) -> dict:
    """Check every data file exists and matches its checksum; returns the manifest."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    for role, name in manifest["files"].items():
        f = folder / name
        if not f.exists():
            raise LeafkdError(f"{folder}: the {role} file {name} is missing; the index is incomplete (rebuild it)")
        want = manifest["checksums"].get(name)
        if want is None:
            raise LeafkdError(f"{folder}: the manifest has no checksum for {name}")
        got = sha256_file(f)
        if got != want:
            raise LeafkdError(f"{folder}: checksum mismatch for {name} (sha256 {got[:12]}, manifest {want[:12]}): "
                              "the file is corrupted or was changed outside leafkd")
    return manifest


def load_index(name_or_path: str | Path, indexes_dir: str | Path = DEFAULT_INDEXES_DIR, *, verify: bool = True,
               gpu: bool | None = False, fp16: bool | None = None, shards: int = 1,
               search_params: dict | None = None) -> DocIndex:
    """Load an index folder (verifying checksums); ``gpu=True`` searches on the GPU(s), ``None``: if present."""
    faiss = _faiss()
    folder = index_path(name_or_path, indexes_dir)
    manifest = read_manifest(folder)
    if verify:
        verify_index(folder, manifest)
    else:
        for role, name in manifest["files"].items():
            if not (folder / name).exists():
                raise LeafkdError(f"{folder}: the {role} file {name} is missing; the index is incomplete")
    try:
        index = faiss.read_index(str(folder / manifest["files"]["index"]))
    except Exception as e:
        raise LeafkdError(f"{folder}: FAISS cannot read {manifest['files']['index']} ({str(e).strip()[:200]})") from None
    ids, titles, texts = _read_docs(folder / manifest["files"]["docs"])
    keys = np.load(folder / manifest["files"]["keys"]) if "keys" in manifest["files"] else None
    if manifest["labels"] == "keys":
        if keys is None or len(keys) != len(ids) or index.ntotal != len(ids):
            raise LeafkdError(f"{folder}: the index holds {index.ntotal} vectors but the store {len(ids)} documents")
    elif index.ntotal != len(ids):
        raise LeafkdError(f"{folder}: the index holds {index.ntotal} vectors but the store {len(ids)} rows")
    if index.d != int(manifest["dim"]):
        raise LeafkdError(f"{folder}: the index is {index.d}-d but the manifest says {manifest['dim']}")
    if search_params:
        manifest = {**manifest, "search_params": {**manifest.get("search_params", {}), **search_params}}
    apply_search_params(index, manifest.get("search_params"))
    doc_index = DocIndex(folder, manifest, index, ids, titles, texts, keys)
    want_gpu = gpu_count() > 0 if gpu is None else gpu
    if want_gpu:
        try:
            doc_index.to_gpu(fp16=manifest.get("fp16", False) if fp16 is None else fp16, shards=shards)
        except LeafkdError as e:
            if gpu:  # asked for explicitly
                raise
            print(f"note: searching on the CPU: {e}", file=sys.stderr)  # e.g. HNSW has no GPU version
    return doc_index


def index_info(name_or_path: str | Path, indexes_dir: str | Path = DEFAULT_INDEXES_DIR) -> IndexInfo:
    folder = index_path(name_or_path, indexes_dir)
    return IndexInfo(folder, read_manifest(folder))


# ----------------------------------------------------------------------------------------------- add / delete


def _check_teacher(manifest: dict, teacher_fingerprint: str, allow_mismatch: bool) -> None:
    known = teacher_fingerprint == manifest["teacher_fingerprint"] or teacher_fingerprint in manifest.get("teacher_fingerprints", {})
    if not known and not allow_mismatch:
        raise LeafkdError(f"the teacher (fingerprint {teacher_fingerprint[:12]}) is not the one that built this index "
                          f"({manifest['teacher_fingerprint'][:12]}, {manifest.get('teacher')})")


def _commit(folder: Path, manifest: dict, index, ids, titles, texts, keys) -> dict:
    """Write generation+1 files, then swap the manifest: the old index stays valid until the last rename."""
    gen = int(manifest["generation"]) + 1
    files = _save_generation(folder, gen, index, ids, titles, texts, keys)
    manifest = _finish_manifest(folder, {**manifest, "generation": gen}, files)
    write_json(folder / MANIFEST, manifest)
    _remove_stale(folder, manifest)
    return manifest


def add_documents(name_or_path: str | Path, corpus: str | Path | Sequence[Document], *, teacher: str | Path | None = None,
                  model=None, vectors: np.ndarray | None = None, indexes_dir: str | Path = DEFAULT_INDEXES_DIR,
                  teacher_fingerprint: str | None = None, allow_fingerprint_mismatch: bool = False,
                  device: str | None = None, show_progress: bool = False, log=_log_default) -> dict:
    """Embed new documents with the index's teacher and add them; returns the new manifest.

    The teacher defaults to the one recorded in the manifest; its fingerprint must match the index's.
    """
    from leafkd.models import fingerprint, load_model, resolve_model

    folder = index_path(name_or_path, indexes_dir)
    with _lock(folder):
        current = load_index(folder)
        manifest = current.manifest
        start = int(manifest["next_key"])
        docs = list(corpus) if not isinstance(corpus, (str, Path)) else read_documents(corpus, id_start=start, taken=current._row_of_id.keys())
        clash = [d.id for d in docs if d.id in current]
        if clash:
            raise LeafkdError(f"{len(clash)} document id(s) already in the index ({', '.join(clash[:5])}); "
                              "delete them first to replace them")
        if vectors is not None:
            emb = normalize(np.asarray(vectors))
            if emb.shape != (len(docs), current.dim):
                raise LeafkdError(f"vectors have shape {emb.shape}, expected ({len(docs)}, {current.dim})")
            if teacher_fingerprint is None:
                raise LeafkdError("precomputed vectors need the teacher fingerprint they were made with")
            _check_teacher(manifest, teacher_fingerprint, allow_fingerprint_mismatch)
        else:
            if model is None:
                src = teacher if teacher is not None else manifest.get("teacher")
                try:
                    tpath = resolve_model(src)
                except LeafkdError:
                    raise LeafkdError(f"the index's teacher {src!r} is not a model folder here; pass --teacher") from None
                teacher_fingerprint = teacher_fingerprint or fingerprint(tpath)
                _check_teacher(manifest, teacher_fingerprint, allow_fingerprint_mismatch)
                import torch

                model = load_model(tpath, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
            else:
                if teacher_fingerprint is None:
                    raise LeafkdError("an in-memory teacher model needs teacher_fingerprint")
                _check_teacher(manifest, teacher_fingerprint, allow_fingerprint_mismatch)
            emb = embed_documents(model, docs, prompt=manifest.get("doc_prompt"), device=device,
                                  show_progress=show_progress, log=log)
        if emb.shape[1] != current.dim:
            raise LeafkdError(f"the teacher emits {emb.shape[1]}-d vectors, the index is {current.dim}-d")
        index = current.index
        keys = None
        if manifest["labels"] == "keys":
            new_keys = np.arange(start, start + len(docs), dtype=np.int64)
            _add(index, emb, new_keys)
            keys = np.concatenate([current.keys, new_keys])
        else:
            _add(index, emb, None)
        ids = current.ids + [d.id for d in docs]
        titles = current.titles + [d.title for d in docs]
        texts = current.texts + [d.text for d in docs]
        manifest = {**manifest, "count": current.count + len(docs), "rows": len(ids), "next_key": start + len(docs)}
        return _commit(folder, manifest, index, ids, titles, texts, keys)


def delete_documents(name_or_path: str | Path, doc_ids: Sequence[str], *, indexes_dir: str | Path = DEFAULT_INDEXES_DIR,
                     missing_ok: bool = False) -> dict:
    """Delete documents by id; returns the new manifest. Unknown ids are an error unless ``missing_ok``."""
    folder = index_path(name_or_path, indexes_dir)
    with _lock(folder):
        current = load_index(folder)
        manifest = current.manifest
        wanted = list(dict.fromkeys(str(d) for d in doc_ids))
        unknown = [d for d in wanted if d not in current]
        if unknown and not missing_ok:
            raise LeafkdError(f"{len(unknown)} id(s) not in the index: {', '.join(unknown[:5])}"
                              f"{', ...' if len(unknown) > 5 else ''}")
        rows = np.array(sorted(current._row_of_id[d] for d in wanted if d in current), dtype=np.int64)
        if len(rows) == 0:
            return manifest
        index = current.index
        ids, titles, texts, keys = list(current.ids), list(current.titles), list(current.texts), current.keys
        labels = keys[rows] if manifest["labels"] == "keys" else rows
        before = int(index.ntotal)
        try:
            removed = int(index.remove_ids(np.ascontiguousarray(labels, dtype=np.int64)))
        except RuntimeError:
            removed = -1  # this index type cannot remove vectors (HNSW): tombstone the rows instead
        if removed == len(rows) and index.ntotal == before - len(rows):
            keep = np.ones(len(ids), dtype=bool)
            keep[rows] = False
            ids = [x for x, k in zip(ids, keep) if k]
            titles = [x for x, k in zip(titles, keep) if k]
            texts = [x for x, k in zip(texts, keep) if k]
            if keys is not None:
                keys = keys[keep]
            tomb = int(manifest.get("tombstones", 0))
        elif removed in (-1, 0) and index.ntotal == before and manifest["labels"] == "positions":
            for r in rows.tolist():
                ids[r], titles[r], texts[r] = None, "", ""
            tomb = int(manifest.get("tombstones", 0)) + len(rows)
        else:  # the in-memory copy is now inconsistent; nothing was written, so the folder is intact
            raise LeafkdError(f"FAISS removed {removed} of {len(rows)} vectors from {manifest['factory']!r}; "
                              "the index on disk is unchanged")
        manifest = {**manifest, "count": current.count - len(rows), "rows": len(ids), "tombstones": tomb}
        return _commit(folder, manifest, index, ids, titles, texts, keys)
