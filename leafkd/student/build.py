"""The student: a base encoder + mean pooling + a Dense projection into the teacher's space (+ Normalize).

Built from sentence-transformers modules, so the saved folder loads with plain `SentenceTransformer(path)`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from leafkd.errors import LeafkdError
from leafkd.models import load_model
from leafkd.modules import Dense, Normalize, Pooling, Transformer


def _transformer(model) -> Transformer:
    first = model[0]
    if not isinstance(first, Transformer):
        raise LeafkdError(f"the student base must start with a Transformer module, not {type(first).__name__}")
    return first


def truncate_layers(transformer: Transformer, layers: int) -> None:
    """Keep the first `layers` encoder layers (e.g. a teacher's first k layers as a student)."""
    auto = transformer.auto_model
    encoder = getattr(auto, "encoder", None)
    blocks = getattr(encoder, "layer", None)
    if encoder is None or blocks is None:
        raise LeafkdError(f"cannot truncate layers of a {type(auto).__name__}: no encoder.layer list")
    if not 1 <= layers <= len(blocks):
        raise LeafkdError(f"student_layers={layers}, but the base has {len(blocks)} layers")
    encoder.layer = nn.ModuleList(list(blocks)[:layers])
    auto.config.num_hidden_layers = layers


def build_student(base: str | Path, teacher_dim: int, *, layers: int | None = None, normalize: bool = False,
                  projection: str = "auto", max_seq_length: int | None = None, device: str | None = None):
    """Base encoder (optionally cut to `layers`) + mean pooling + Dense(hidden -> teacher_dim) + Normalize."""
    from sentence_transformers import SentenceTransformer

    base_model = load_model(base, device="cpu")
    transformer = _transformer(base_model)
    if layers:
        truncate_layers(transformer, layers)
    if max_seq_length:
        transformer.max_seq_length = max_seq_length
    hidden = (getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension)()
    modules: list[nn.Module] = [transformer, Pooling(hidden, "mean")]
    if projection not in ("auto", "always", "none"):
        raise LeafkdError(f"projection must be auto, always or none, not {projection!r}")
    if projection == "always" or (projection == "auto" and hidden != teacher_dim):
        dense = Dense(hidden, teacher_dim, bias=True, activation_function=nn.Identity())
        modules.append(dense)
    elif hidden != teacher_dim:
        raise LeafkdError(f"projection='none' but the student is {hidden}-d and the teacher {teacher_dim}-d")
    if normalize:
        modules.append(Normalize())
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
    """A view of the student up to its pooling layer (shares the modules; for ridge fitting)."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(modules=[model[0], model[1]], device=str(model.device))


