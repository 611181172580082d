"""FAISS helpers: GPU resources and cloning, index factory, training and search parameters.

The FAISS factory string is the one vocabulary for index types (``Flat``, ``IVF4096,Flat``, ``HNSW32``,
``IVF4096,PQ64``, ``SQ8``, ...). That FAISS is installed is checked when `leafkd.retrieval` is imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import faiss
import numpy as np

from leafkd.errors import LeafkdError

logger = logging.getLogger(__name__)


def faiss_error(e: BaseException) -> str:
    """A FAISS exception as one line: FAISS puts the reason on the last line of its message."""
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:
        return 0


def faiss_build_name() -> str:
    kind = "faiss-gpu" if hasattr(faiss, "StandardGpuResources") else "faiss-cpu"
    return f"{kind} {getattr(faiss, '__version__', '?')}"


def make_index(factory: str, dim: int):
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except Exception as e:
        raise LeafkdError(f"FAISS cannot make index {factory!r} for {dim}-d vectors ({faiss_error(e)})") from None


def ivf_nlist(index) -> int | None:
    try:
        ivf = faiss.extract_index_ivf(index)
    except Exception:
        return None
    return int(ivf.nlist) if ivf is not None else None


# Search-time knobs whose valid values FAISS does not check itself: with nprobe <= 0 every IVF search fails, with
# efSearch <= 0 HNSW returns nothing, and huge values overflow FAISS's int fields.
_PARAM_RANGES: dict[str, tuple[float, bool]] = {  # name -> (minimum, integer only)
    "nprobe": (1, True), "efSearch": (1, True), "quantizer_efSearch": (1, True), "quantizer_nprobe": (1, True),
    "max_codes": (0, True), "k_factor": (1, False), "k_factor_rf": (1, False),
}
_PARAM_MAX = 2**31 - 1


def search_param_problem(key: str, value: Any) -> str | None:
    """Why ``value`` is not a valid value of search parameter ``key`` (None when it is)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        return f"search parameter {key}={value!r}: must be a finite number"
    low, integer = _PARAM_RANGES.get(key, (-_PARAM_MAX, False))
    if integer and not float(value).is_integer():
        return f"search parameter {key}={value}: must be an integer"
    if not low <= value <= _PARAM_MAX:
        return f"search parameter {key}={value}: must be between {low} and {_PARAM_MAX}"
    return None


def check_search_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """``params`` if every value is valid for its knob (see `search_param_problem`), else a one-line error."""
    for key, value in (params or {}).items():
        problem = search_param_problem(str(key), value)
        if problem:
            raise LeafkdError(problem)
    return dict(params or {})


def apply_search_params(index, params: dict[str, Any] | None, gpu: bool = False, strict: bool = False) -> None:
    """Set search-time knobs (``nprobe``, ``efSearch``, ...) where the index has them.

    A value FAISS would accept and then fail on (``nprobe=-5``) is a one-line `LeafkdError`. A knob the index does
    not have (``nprobe`` on a flat index) is skipped, or an error with ``strict`` (what a user asked for at build).
    """
    if not params:
        return
    check_search_params(params)
    space = faiss.GpuParameterSpace() if gpu and hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
    for key, value in params.items():
        try:
            space.set_index_parameter(index, key, value)
        except Exception:
            if strict:
                raise LeafkdError(f"search parameter {key}: this index type has no such knob") from None


def probe_search(index) -> None:
    """One search of a zero vector, so search parameters FAISS rejects fail here, as a one-line error."""
    if index.ntotal == 0:
        return
    try:
        index.search(np.zeros((1, index.d), dtype=np.float32), 1)
    except Exception as e:
        raise LeafkdError(f"FAISS cannot search this index with its search parameters ({faiss_error(e)})") from None


def default_search_params(factory: str) -> dict[str, Any]:
    # FAISS defaults (nprobe=1, efSearch=16) trade far too much recall for speed at retrieval sizes.
    params: dict[str, Any] = {}
    if "IVF" in factory:
        params["nprobe"] = 32
    if "HNSW" in factory:
        params["efSearch"] = 128
    return params


class GpuResources:
    """One StandardGpuResources per process and device (they hold scratch memory and streams).

    ``LEAFKD_FAISS_TEMP_MB`` sets the scratch ("temp") memory: flat search tiles the distance matrix to fit it,
    so more scratch means fewer, larger GEMM + k-selection passes on big indexes.
    """

    _res: dict[int, Any] = {}

    @classmethod
    def get(cls, device: int = 0):
        if device not in cls._res:
            res = faiss.StandardGpuResources()
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
    co = faiss.GpuMultipleClonerOptions() if multiple else faiss.GpuClonerOptions()
    co.useFloat16 = bool(fp16)
    if use_cuvs is None:
        use_cuvs = _env_flag("LEAFKD_FAISS_CUVS")
    if use_cuvs is not None and hasattr(co, "use_cuvs"):
        co.use_cuvs = bool(use_cuvs)
    return co


def index_to_gpu(index, fp16: bool = False, shards: int = 1, use_cuvs: bool | None = None, res=None):
    """Clone a CPU index to one GPU, or shard it over ``shards`` GPUs (``-1``: all). Raises if unsupported."""
    ngpu = gpu_count()
    if ngpu == 0:
        raise LeafkdError("no GPU visible to FAISS (faiss-cpu, or no CUDA device)")
    if shards == 1 or ngpu == 1:
        co = gpu_cloner_options(fp16, use_cuvs)
        return faiss.index_cpu_to_gpu(res if res is not None else GpuResources.get(0), 0, index, co)
    co = gpu_cloner_options(fp16, use_cuvs, multiple=True)
    co.shard = True  # split the vectors over the GPUs (IndexShards); queries go to all of them
    n = ngpu if shards < 0 else min(shards, ngpu)
    return faiss.index_cpu_to_all_gpus(index, co=co, ngpu=n)


def train_index(index, vectors: np.ndarray, use_gpu: bool) -> str:
    """Train a trainable index; on a GPU the k-means runs there. Returns where it ran."""
    nlist = ivf_nlist(index)
    if nlist is not None and len(vectors) < nlist:
        suggest = max(1, int(4 * np.sqrt(len(vectors))))
        raise LeafkdError(f"IVF with {nlist} lists needs at least {nlist} documents to train, the corpus has "
                          f"{len(vectors)}; use fewer lists (e.g. IVF{suggest},Flat) or Flat")
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
            ivf.clustering_index = faiss.index_cpu_to_gpu(GpuResources.get(0), 0, faiss.IndexFlatIP(ivf.d))
            where = "gpu"
        except Exception as e:
            logger.warning("note: IVF training on the GPU is not available (%s); training on the CPU", e)
    t0 = time.perf_counter()
    try:
        index.train(vectors)
    except Exception as e:
        raise LeafkdError(f"FAISS could not train the index ({faiss_error(e)})") from None
    finally:
        if where == "gpu":
            with contextlib.suppress(Exception):
                faiss.extract_index_ivf(index).clustering_index = None  # type: ignore[assignment]  # SWIG: nullptr
    logger.info("trained on %d vectors on the %s in %.1fs", len(vectors), where.upper(), time.perf_counter() - t0)
    return where


def add_vectors(index, vectors: np.ndarray, keys: np.ndarray | None) -> None:
    if keys is not None:
        index.add_with_ids(vectors, keys.astype(np.int64))
    else:
        index.add(vectors)


def supports_ids(index) -> bool:
    """Whether the index stores explicit labels (IVF family) -- probed on an empty clone so nothing is touched."""
    try:
        probe = faiss.clone_index(index)
        if not probe.is_trained:
            return ivf_nlist(index) is not None
        probe.add_with_ids(np.zeros((1, index.d), dtype=np.float32), np.array([7], dtype=np.int64))
        return True
    except Exception:
        return False


