"""The index's teacher inside the server: it embeds documents for ``POST /documents`` and for ``/v1/embeddings``
with ``input_type: document``, so that added documents land in the index's vector space."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from leafkd.data.documents import Document
from leafkd.errors import LeafkdError
from leafkd.retrieval.backend import SearchIndex
from leafkd.retrieval.build import embed_documents
from leafkd.retrieval.retriever import refuse_mismatch


class DocumentEncoder:
    """A loaded teacher model, its fingerprint and the index's document prompt; one embedding call at a time."""

    def __init__(self, model, *, fingerprint: str, name: str, prompt: str | None, device: str) -> None:
        self.model = model
        self.fingerprint = fingerprint
        self.name = name
        self.prompt = prompt
        self.device = device
        self.lock = threading.Lock()

    @classmethod
    def load(cls, index: SearchIndex, teacher: str | Path | None = None, *, device: str | None = None,
             allow_fingerprint_mismatch: bool = False) -> DocumentEncoder:
        """The teacher recorded in the index (or ``teacher``), refused unless it is the model that built it."""
        from leafkd.models import fingerprint, load_model, resolve_model

        src = teacher if teacher is not None else index.manifest.get("teacher")
        if src is None:
            raise LeafkdError("the index records no teacher; pass --teacher to embed documents")
        try:
            path = resolve_model(str(src))
        except LeafkdError:
            whose = "the index's teacher" if teacher is None else "--teacher"
            raise LeafkdError(f"{whose} {str(src)!r} is not a model folder here"
                              f"{'; pass --teacher' if teacher is None else ''}") from None
        fp = fingerprint(path)
        if not index.accepts_fingerprint(fp):
            refuse_mismatch(f"the teacher {path} (fingerprint {fp[:12]}) is not the model that built the index "
                            f"(fingerprint {index.teacher_fingerprint[:12]})", allow_fingerprint_mismatch,
                            "; documents it embeds would land in another vector space")
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(load_model(path, device=dev), fingerprint=fp, name=str(path),
                   prompt=index.manifest.get("doc_prompt"), device=dev)

    def embed(self, docs: Sequence[Document]) -> np.ndarray:
        """Normalised float32 vectors of the documents (title + text), as the index's build embedded them."""
        with self.lock:
            return embed_documents(self.model, docs, prompt=self.prompt, device=self.device)

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the teacher reads for these texts (truncated at its maximum length)."""
        tok = self.model.tokenizer
        enc = tok(list(texts), truncation=True, max_length=getattr(self.model, "max_seq_length", None))
        return sum(len(ids) for ids in enc["input_ids"])
