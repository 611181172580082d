"""Building /search and /embed answers: bounded in size, and large ones built off the event loop.

Turning hits into JSON is pure Python work. A large answer built on the event loop (256 queries x top_k 1000
with texts took 23 s) stalls every other client; here its size is estimated first, an answer over the limit is
refused, and one over `INLINE_BYTES` is built in a worker thread while the loop keeps serving.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from leafkd.retrieval.index import Hit

# Answers up to this size (estimated) are built on the event loop: a thread hop costs more than they do.
INLINE_BYTES = 256 << 10
_HIT_OVERHEAD = 64  # JSON keys, score and punctuation of one hit
_FLOAT_BYTES = 12  # one rounded float32 and its comma


class ResponseTooLarge(Exception):
    """An answer over the server's ``max_response_bytes`` (a 422: the request asks for too much)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the answer would be about {size / 2**20:.1f} MiB, over this server's limit of "
                         f"{limit / 2**20:.1f} MiB: ask for fewer queries, a smaller top_k or include_text false")


def search_bytes(texts: Sequence[str], hits: Sequence[Sequence[Hit]], include_text: bool) -> int:
    """An estimate of a /search answer's size in bytes (characters; JSON escapes add little to real text)."""
    size = sum(len(q) + 32 for q in texts)
    for hs in hits:
        for h in hs:
            size += _HIT_OVERHEAD + len(h.id) + ((len(h.title) + len(h.text)) if include_text else 0)
    return size


# Items encoded per json.dumps call. One call is one C function that holds the GIL throughout: a whole 200 MB
# answer in one call would stall the event loop thread however the work is scheduled; small calls let it run.
_CHUNK = 128


def _json(value: Any) -> str:
    # as Starlette's JSONResponse renders it
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))


def _json_array(items: Sequence[Any], out: list[bytes]) -> None:
    """Append ``_json(list(items))`` to ``out`` as UTF-8 pieces, a chunk of items at a time (and encoded a chunk
    at a time: one encode or join of a whole 200 MB answer would hold the GIL as long as one json.dumps)."""
    out.append(b"[")
    for i in range(0, len(items), _CHUNK):
        out.append((("," if i else "") + _json(list(items[i : i + _CHUNK]))[1:-1]).encode("utf-8"))
    out.append(b"]")


def _tail(fields: dict[str, Any], t0: float) -> bytes:
    """The closing fields of an answer, ``took_ms`` last."""
    rest = "".join(f",{_json(k)}:{_json(v)}" for k, v in fields.items())
    return (rest + ',"took_ms":' + _json(round((time.perf_counter() - t0) * 1000, 3)) + "}").encode("utf-8")


def _render_search(texts: Sequence[str], hits: Sequence[Sequence[Hit]], include_text: bool, mode: str,
                   t0: float) -> bytes:
    out = [b'{"results":[']
    for i, (q, hs) in enumerate(zip(texts, hits)):
        out.append(("," if i else "").encode() + b'{"query":' + _json(q).encode("utf-8") + b',"hits":')
        _json_array([h.to_dict(include_text) for h in hs], out)
        out.append(b"}")
    out.append(b"]" + _tail({"mode": mode}, t0))
    return b"".join(out)


def _render_embed(vectors: np.ndarray, model: str, t0: float) -> bytes:
    out = [b'{"embeddings":']
    _json_array(np.round(vectors, 7).tolist(), out)
    out.append(_tail({"dim": int(vectors.shape[1]), "model": model}, t0))
    return b"".join(out)


async def _bounded(estimate: int, limit: int, render, *args) -> Response:
    if estimate > limit:
        raise ResponseTooLarge(estimate, limit)
    body = render(*args) if estimate <= INLINE_BYTES else await run_in_threadpool(render, *args)
    if len(body) > limit:
        raise ResponseTooLarge(len(body), limit)
    return Response(body, media_type="application/json")


async def search_response(texts: Sequence[str], hits: Sequence[Sequence[Hit]], include_text: bool, mode: str,
                          t0: float, limit: int) -> Response:
    """The /search answer, refused (`ResponseTooLarge`) when over ``limit`` bytes."""
    return await _bounded(search_bytes(texts, hits, include_text), limit, _render_search, texts, hits, include_text,
                          str(mode), t0)


async def embed_response(vectors: np.ndarray, model: str, t0: float, limit: int) -> Response:
    """The /embed answer, refused (`ResponseTooLarge`) when over ``limit`` bytes."""
    return await _bounded(int(vectors.size) * _FLOAT_BYTES + 128, limit, _render_embed, vectors, model, t0)


def _render_openai(vectors: np.ndarray, model: str, base64_floats: bool, tokens: int) -> bytes:
    if base64_floats:  # little-endian float32, as OpenAI sends it
        data: list[Any] = [base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")
                           for v in vectors]
    else:
        data = np.round(vectors.astype(np.float64), 7).tolist()
    out = [b'{"object":"list","data":[']
    for start in range(0, len(data), _CHUNK):
        items = [{"object": "embedding", "index": start + i, "embedding": e}
                 for i, e in enumerate(data[start : start + _CHUNK])]
        out.append((("," if start else "") + _json(items)[1:-1]).encode("utf-8"))
    out.append(b'],"model":' + _json(model).encode("utf-8") + b',"usage":'
               + _json({"prompt_tokens": tokens, "total_tokens": tokens}).encode("utf-8") + b"}")
    return b"".join(out)


async def openai_embeddings_response(vectors: np.ndarray, model: str, base64_floats: bool, tokens: int,
                                     limit: int) -> Response:
    """The ``/v1/embeddings`` answer in OpenAI's shape, refused (`ResponseTooLarge`) when over ``limit`` bytes."""
    per_float = 6 if base64_floats else _FLOAT_BYTES
    return await _bounded(int(vectors.size) * per_float + 64 * len(vectors) + 256, limit, _render_openai, vectors,
                          model, base64_floats, tokens)
