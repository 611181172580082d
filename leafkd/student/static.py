"""The static-embedding student: a token embedding table, mean pooling, a Dense projection when its dimension is not
the teacher's, and Normalize (model2vec's idea, trained into the teacher's space with the same losses).

The table starts from the base model itself: every vocabulary token is embedded by the base (its whole pipeline:
``[CLS] token [SEP]``, pooling, and its own Dense/Normalize), optionally PCA-reduced (`dim`), on the device the
run uses (seconds on a GPU; `vocab` distils only the first N token ids, for a quick CPU run).

The saved folder is sentence-transformers' own ``StaticEmbedding`` + ``Dense`` + ``Normalize``: plain
``SentenceTransformer(path)`` loads it. Its tokenizer carries no special-token template (StaticEmbedding encodes
without special tokens) and truncates at the student's max length, so leafkd's batching and
sentence-transformers' ``encode`` see the same tokens. Inside leafkd the model is a `StaticStudent`: the same
modules, plus what leafkd's tokenisation, padded batches and query encoder expect of a model (a Hugging Face
tokenizer view, a finite max length, a forward over ``input_ids`` + ``attention_mask``).
"""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from tokenizers import Tokenizer

from leafkd.errors import LeafkdError
from leafkd.models import embedding_dimension, load_model
from leafkd.runtime.devices import pick_device
from leafkd.runtime.tokens import max_seq_length as base_max_length
from leafkd.student.head import head_modules

try:
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
except ImportError:  # pragma: no cover - sentence-transformers < 6.1
    from sentence_transformers.models import StaticEmbedding  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 512  # a static table has no position limit; texts are cut here unless the tokenizer says
PAD_TOKENS = ("[PAD]", "<pad>", "<PAD>")
UNKNOWN_TOKENS = ("[UNK]", "<unk>", "<UNK>")


def is_static(model: Any) -> bool:
    """Whether a SentenceTransformer starts with a StaticEmbedding table."""
    try:
        return isinstance(model[0], StaticEmbedding)
    except (TypeError, IndexError, KeyError):
        return False


class StaticStudent(SentenceTransformer):
    """A SentenceTransformer whose first module is a StaticEmbedding, as leafkd's code uses models.

    - ``tokenizer`` is a Hugging Face fast-tokenizer view of the table's Rust tokenizer (``backend_tokenizer``,
      ``pad_token_id``, ``__call__``); the module keeps its own tokenizer, which is what gets saved.
    - ``max_seq_length`` is the tokenizer's truncation length (512 where it has none).
    - ``forward`` also takes padded ``input_ids`` + ``attention_mask`` (the mean over each row's real tokens,
      one ``embedding_bag`` call, no host sync); sentence-transformers' own ``input_ids`` + ``offsets`` work as
      before.
    """

    @property
    def table(self) -> Any:
        """The StaticEmbedding module (its ``embedding`` table and Rust ``tokenizer``)."""
        return self[0]

    @property
    def tokenizer(self) -> Any:
        view = self.__dict__.get("_leafkd_tokenizer_view")
        if view is None:
            view = self.__dict__["_leafkd_tokenizer_view"] = hf_tokenizer_view(self.table.tokenizer)
        return view

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self.table.tokenizer = getattr(value, "backend_tokenizer", value)
        self.__dict__.pop("_leafkd_tokenizer_view", None)

    @property
    def max_seq_length(self) -> int:
        truncation = self.table.tokenizer.truncation
        return int(truncation["max_length"]) if truncation else DEFAULT_MAX_TOKENS

    @max_seq_length.setter
    def max_seq_length(self, value: int) -> None:
        self.table.tokenizer.enable_truncation(int(value))
        self.__dict__.pop("_leafkd_tokenizer_view", None)

    def forward(self, input: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        if "offsets" in input or "attention_mask" not in input:
            return super().forward(input, **kwargs)
        weight = self.table.embedding.weight
        mask = input["attention_mask"].to(weight.dtype)
        summed = F.embedding_bag(input["input_ids"], weight, mode="sum", per_sample_weights=mask)
        features = dict(input)
        features["sentence_embedding"] = summed / mask.sum(dim=1, keepdim=True).clamp(min=1)
        for module in list(self)[1:]:
            features = module(features)
        return features


def as_static_student(model: SentenceTransformer) -> SentenceTransformer:
    """`model` as a `StaticStudent` when it starts with a StaticEmbedding (same object, same modules), else as is."""
    if is_static(model) and not isinstance(model, StaticStudent):
        model.__class__ = StaticStudent
    return model


def load_student(path: str | Path, device: str | None = None) -> SentenceTransformer:
    """Load a student (any SentenceTransformer folder) for leafkd's encoders: a static one as a `StaticStudent`."""
    return as_static_student(load_model(path, device=device))


# -- tokenizers -------------------------------------------------------------------------------------------------
def _find_token(tokenizer: Tokenizer, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if tokenizer.token_to_id(name) is not None), None)


def hf_tokenizer_view(tokenizer: Tokenizer):
    """A Hugging Face fast tokenizer over a copy of `tokenizer` (no special-token template, no padding)."""
    from transformers import PreTrainedTokenizerFast

    plain = without_template(tokenizer)
    pad = _find_token(plain, PAD_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=plain, **({"pad_token": pad} if pad else {}))


def without_template(tokenizer: Tokenizer, max_length: int | None = None) -> Tokenizer:
    """A copy of `tokenizer` that adds no special tokens and never pads (truncating at `max_length` when given)."""
    spec = json.loads(tokenizer.to_str())
    spec["post_processor"] = None
    copy = Tokenizer.from_str(json.dumps(spec))
    copy.no_padding()
    if max_length:
        copy.enable_truncation(int(max_length))
    return copy


# -- the table --------------------------------------------------------------------------------------------------
def _template(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the base puts around a text (``[CLS]`` / ``[SEP]``, ``<s>`` / ``</s>``).

    Read from a copy without padding: sentence-transformers' tokenizer.json files often pad to 128, and padding
    tokens are special too, so the padded template would make every vocabulary row 128 tokens long, all attended.
    """
    plain = Tokenizer.from_str(tokenizer.to_str())
    plain.no_padding()
    empty = plain.encode("", add_special_tokens=True)
    ids, special = empty.ids, empty.special_tokens_mask
    if not ids or not all(special):
        return [], []
    return ids[:1], ids[1:]


def vocabulary_table(base: SentenceTransformer, vocab: int | None = None, device: str | None = None) -> np.ndarray:
    """Each token id's vector as the base embeds the one-token text ``[CLS] token [SEP]`` (float32 [V, dim]).

    With `vocab`, only the first `vocab` ids are embedded (tokenizer ids run roughly by frequency); the others
    start as the unknown token's row.
    """
    rust: Tokenizer = base.tokenizer.backend_tokenizer
    size = rust.get_vocab_size(with_added_tokens=True)
    count = size if vocab is None else max(1, min(int(vocab), size))
    head, tail = _template(rust)
    ids = np.concatenate([np.tile(np.asarray(head, dtype=np.int32), (count, 1)),
                          np.arange(count, dtype=np.int32)[:, None],
                          np.tile(np.asarray(tail, dtype=np.int32), (count, 1))], axis=1)
    run_on = pick_device(device)
    table = _embed_rows(base, torch.from_numpy(ids.astype(np.int64)), run_on)
    if count < size:
        unk = _find_token(rust, UNKNOWN_TOKENS)
        unk_id = rust.token_to_id(unk) if unk else None
        fill = table[unk_id] if unk_id is not None and unk_id < count else table.mean(axis=0)
        table = np.concatenate([table, np.tile(fill, (size - count, 1))])
    logger.info(f"static table: {count} of {size} tokens embedded by the base on {run_on}")
    return table.astype(np.float32)


def _embed_rows(base: SentenceTransformer, ids: torch.Tensor, device: torch.device, rows: int = 2048) -> np.ndarray:
    """The base's sentence vectors of equal-length rows of token ids (no padding: one plain batch per chunk)."""
    base.to(device).eval()
    out = []
    with torch.inference_mode():
        for chunk in ids.split(rows):
            chunk = chunk.to(device)
            features = base({"input_ids": chunk, "attention_mask": torch.ones_like(chunk)})
            out.append(features["sentence_embedding"].float().cpu().numpy())
    base.to("cpu")
    return np.concatenate(out)


def pca_reduce(table: np.ndarray, dim: int) -> np.ndarray:
    """The table's rows projected on its `dim` principal directions (centred; float32 [V, dim])."""
    if not 1 <= dim <= table.shape[1]:
        raise LeafkdError(f"static_dim={dim}, but the base's token vectors are {table.shape[1]}-d")
    x = table.astype(np.float64)
    x -= x.mean(axis=0)
    _, vecs = np.linalg.eigh(x.T @ x)  # ascending eigenvalues: the last columns are the top directions
    return (x @ vecs[:, ::-1][:, :dim]).astype(np.float32)


def random_table(size: int, dim: int, seed: int = 0) -> np.ndarray:
    """A random table (rows of norm ~1): a static student trained from scratch, or one built only for its speed."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((size, dim)) / np.sqrt(dim)).astype(np.float32)


class StaticInit(StrEnum):
    """Where a static student's table starts (from a transformer base; a static base brings its own table)."""

    FORWARD = "forward"  # each token embedded by the base's whole pipeline ([CLS] token [SEP]), model2vec-style
    EMBEDDINGS = "embeddings"  # the base's input token embeddings (no forward pass: instant on any machine)


def input_embeddings(base_model: SentenceTransformer) -> np.ndarray:
    """The base transformer's input token-embedding matrix (float32 [V, hidden])."""
    module: Any = base_model[0]
    auto = getattr(module, "auto_model", None)
    if auto is None:
        raise LeafkdError(f"static_init=embeddings needs a transformer base, not {type(module).__name__}")
    return auto.get_input_embeddings().weight.detach().float().cpu().numpy()


def initial_table(base_model: SentenceTransformer, *, dim: int | None = None, vocab: int | None = None,
                  device: str | None = None, init: StaticInit | str = StaticInit.FORWARD
                  ) -> tuple[np.ndarray, Tokenizer]:
    """The starting table and its tokenizer: a static base's own table, else the base's vocabulary embedded by the
    base (`vocabulary_table`; `vocab=0`: random) or its input token embeddings, PCA-reduced to `dim` when given."""
    if is_static(base_model):  # a static model (a model2vec folder, a trained static student): its own table
        module: Any = base_model[0]
        table, rust = module.embedding.weight.detach().float().cpu().numpy(), module.tokenizer
    else:
        rust = base_model.tokenizer.backend_tokenizer
        size = rust.get_vocab_size(with_added_tokens=True)
        if vocab == 0:
            return random_table(size, dim or embedding_dimension(base_model)), rust
        if StaticInit(init) is StaticInit.EMBEDDINGS:
            table = input_embeddings(base_model)[:size]
        else:
            table = vocabulary_table(base_model, vocab, device)
    if dim and dim != table.shape[1]:
        table = pca_reduce(table, dim)
    return table, rust


def build_static_student(base: str | Path, teacher_dim: int, *, dim: int | None = None, vocab: int | None = None,
                         projection: str = "auto", normalize: bool = False, max_seq_length: int | None = None,
                         device: str | None = None, init: StaticInit | str = StaticInit.FORWARD) -> StaticStudent:
    """StaticEmbedding (the base's tokens embedded by the base, PCA-reduced to `dim`) + [Dense] + [Normalize].

    `vocab=0` skips the base's embedding: a random table (`dim`, default the base's output dimension).
    """
    base_model = as_static_student(load_model(base, device="cpu"))
    table, rust = initial_table(base_model, dim=dim, vocab=vocab, device=device, init=init)
    length = max_seq_length or base_max_length(base_model)
    static = StaticEmbedding(without_template(rust, length), embedding_weights=torch.from_numpy(table),
                             base_model=str(base))
    modules = [static, *head_modules(table.shape[1], teacher_dim, projection, normalize)]
    student = StaticStudent(modules=modules, device="cpu")
    student.prompts = dict(getattr(base_model, "prompts", {}) or {})
    return student
