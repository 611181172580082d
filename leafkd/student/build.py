"""The student: a base encoder (cut to some of its layers) + mean pooling + a Dense projection into the teacher's
space (+ Normalize), or a static-embedding table + the same head (`leafkd.student.static`).

Built from sentence-transformers modules, so the saved folder loads with plain `SentenceTransformer(path)`.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from leafkd.errors import LeafkdError
from leafkd.models import load_model
from leafkd.modules import Dense, Pooling, Transformer
from leafkd.student.head import head_modules
from leafkd.student.layers import LayerSpec, keep_layers
from leafkd.student.static import StaticStudent, build_static_student, is_static


class StudentKind(StrEnum):
    """What the student is made of."""

    TRANSFORMER = "transformer"  # the base encoder's layers (all, the first k, or a selection) + mean pooling
    STATIC = "static"  # a token embedding table initialised from the base (model2vec-style) + mean pooling


def _transformer(model) -> Transformer:
    first = model[0]
    if not isinstance(first, Transformer):
        raise LeafkdError(f"the student base must start with a Transformer module, not {type(first).__name__}")
    return first


def truncate_layers(transformer: Transformer, layers: LayerSpec) -> list[int]:
    """Keep the encoder layers `layers` names: the first k (an int), a list of indices, or ``every-other``.
    Returns the kept layers' original indices."""
    return keep_layers(transformer.auto_model, layers)


def build_student(base: str | Path, teacher_dim: int, *, layers: LayerSpec | None = None, normalize: bool = False,
                  projection: str = "auto", max_seq_length: int | None = None, device: str | None = None,
                  kind: StudentKind | str = StudentKind.TRANSFORMER, static_dim: int | None = None,
                  static_vocab: int | None = None, static_init: str = "forward"):
    """A student to train into a `teacher_dim`-d space.

    - ``transformer``: the base encoder (its `layers`: first k, indices, or ``every-other``) + mean pooling +
      Dense(hidden -> teacher_dim) when the dims differ (or `projection` = always) + Normalize.
    - ``static``: a StaticEmbedding table initialised from the base (`static_dim`: PCA dims; `static_vocab`: embed
      only the first N token ids, 0 for a random table; `static_init`: forward (each token through the base,
      model2vec-style) or embeddings (the base's input embeddings); `device`: where the base embeds) + the
      same head.
    """
    kind = StudentKind(kind)
    if kind is StudentKind.STATIC:
        if layers is not None:
            raise LeafkdError("a static student has no layers to select (drop student_layers)")
        return build_static_student(base, teacher_dim, dim=static_dim, vocab=static_vocab, projection=projection,
                                    normalize=normalize, max_seq_length=max_seq_length, device=device,
                                    init=static_init)
    from sentence_transformers import SentenceTransformer

    base_model = load_model(base, device="cpu")
    transformer = _transformer(base_model)
    if layers is not None:
        truncate_layers(transformer, layers)
    if max_seq_length:
        transformer.max_seq_length = max_seq_length
    hidden = (getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension)()
    modules = [transformer, Pooling(hidden, "mean"), *head_modules(hidden, teacher_dim, projection, normalize)]
    model = SentenceTransformer(modules=modules, device=device or "cpu")
    # Keep the base's prompts (e.g. a query prompt) so encode_query behaves as the teacher's.
    model.prompts = dict(getattr(base_model, "prompts", {}) or {})
    return model


def projection_layer(model) -> Dense | None:
    for module in model:
        if isinstance(module, Dense):
            return module
    return None


def pooled_model(model):
    """A view of the student up to its pooling (shares the modules; for ridge fitting): Transformer + Pooling, or
    the static table alone."""
    from sentence_transformers import SentenceTransformer

    if is_static(model):
        return StaticStudent(modules=[model[0]], device=str(model.device))
    return SentenceTransformer(modules=[model[0], model[1]], device=str(model.device))
