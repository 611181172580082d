"""The ONNX query encoder: a student's exported graph (`leafkd export --onnx`) run by onnxruntime on the CPU.

A drop-in for `QueryEncoder` (same call, same vectors up to the export's measured cosine): the Rust tokenizer
saved with the export, one ``session.run`` per length group (per text for the int8 graph, whose dynamic
activation quantisation would otherwise mix the texts of a batch), unit-length float32 vectors out.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leafkd.choices import Choice
from leafkd.errors import LeafkdError
from leafkd.retrieval.query_encoder import length_groups
from leafkd.student.onnx import FOLDER, read_export, session
from leafkd.vectors import normalize


class QueryBackend(Choice):
    """What runs the query encoder."""

    TORCH = "torch"  # the student in torch (CPU or GPU; CUDA graphs on GPU)
    ONNX = "onnx"  # the student's ONNX export in onnxruntime, CPU (the int8 graph when exported)


class OnnxQueryEncoder:
    """Embeds queries with a student's ONNX export; vectors come back float32 and L2-normalised.

    - `folder`: an export folder, or a student folder holding one (``leafkd-onnx/``).
    - `int8`: use the int8 graph (None: when the export has one).
    - `threads`: onnxruntime intra-op threads (1 by default: a single query gains nothing from more, and spinning
      thread pools slow each other down on a shared machine).
    """

    device = "cpu"

    def __init__(self, folder: str | Path, *, prompt: str | None = None, int8: bool | None = None, threads: int = 1,
                 name: str = "", warmup: bool = True) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        if not (folder / "onnx.json").is_file() and (folder / FOLDER / "onnx.json").is_file():
            folder = folder / FOLDER
        meta = read_export(folder)
        files = meta["files"]
        if int8 is None:
            int8 = "int8" in files
        kind = "int8" if int8 else "fp32"
        if kind not in files:
            raise LeafkdError(f"{folder}: no {kind} graph (export again with --int8)")
        self.folder, self.prompt, self.threads = folder, prompt or None, int(threads)
        self.dtype = "int8" if int8 else "float32"
        self.name = f"{name or folder} (onnx {self.dtype})"
        self.dim = int(meta["dim"])
        self.lower = bool(meta.get("lower", False))
        self.cosine_to_torch = meta.get("cosine_min", {}).get(kind)
        self._session = session(folder / files[kind], threads=self.threads)
        self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._lock = threading.Lock()  # one run at a time: the session's thread pool is sized for one
        self.warm = False
        if warmup:
            self.warmup()

    # facts shared with QueryEncoder (Retriever.info reads them)
    fast = True
    cuda_graphs = 0
    graph_error = None

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (prompt prepended, lower-cased when the student does, truncated)."""
        texts = [(self.prompt or "") + t for t in texts]
        if self.lower:
            texts = [t.lower() for t in texts]
        return [e.ids or [0] for e in self._tokenizer.encode_batch(texts)]

    def _run(self, token_ids: list[list[int]]) -> np.ndarray:
        width = max(len(t) for t in token_ids)
        ids = np.zeros((len(token_ids), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, t in enumerate(token_ids):
            ids[r, : len(t)] = t
            mask[r, : len(t)] = 1
        return self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    def warmup(self, freeze_gc: bool = False) -> None:
        """One run, so no request pays for the session's first call."""
        with self._lock:
            self._run([[0, 0, 0, 0]])
            self.warm = True
        if freeze_gc:
            gc.collect()
            gc.freeze()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        token_ids = self.tokenize(list(texts))
        # int8 graphs quantise activations per tensor, so a text's vector would depend on the batch it shares (its
        # neighbours' ranges, the padding): each text runs alone. fp32 graphs run groups of similar length.
        groups = [[i] for i in range(len(token_ids))] if self.dtype == "int8" or len(token_ids) == 1 else \
            length_groups([len(t) for t in token_ids])
        with self._lock:
            out = np.empty((len(token_ids), self.dim), dtype=np.float32)
            for group in groups:
                out[group] = self._run([token_ids[i] for i in group])
        return normalize(np.asarray(out, dtype=np.float32))
