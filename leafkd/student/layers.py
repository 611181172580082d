"""Which encoder layers a student keeps: the first k (``6``), an explicit list (``0,2,4,6,8,10``) or every other
layer (``every-other``: 0, 2, 4, ...; DistilBERT's initialisation, taken up by LEAF).

A layer spec is an int, a list of ints, or its text form as the command line and TOML give it; `canonical_layers`
turns any of them into one value (an int for "first k", else the text), so a run's result key does not depend on
how the spec was spelled.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from leafkd.errors import LeafkdError

EVERY_OTHER = "every-other"

LayerSpec = int | str | Sequence[int]


def canonical_layers(spec: LayerSpec | None) -> int | str | None:
    """One spelling of a layer spec: None, an int (the first k layers), ``every-other``, or ``i,j,k``."""
    if isinstance(spec, bool):
        raise LeafkdError(f"student_layers must be a count, layer indices or {EVERY_OTHER}, not {spec}")
    if spec is None:
        return None
    if isinstance(spec, int):
        return spec
    if isinstance(spec, str):
        text = spec.strip().lower().replace(" ", "")
        if text in ("", "none", "all"):
            return None
        if text == EVERY_OTHER:
            return EVERY_OTHER
        parts = text.strip("[]").split(",")
        try:
            numbers = [int(p) for p in parts if p != ""]
        except ValueError:
            raise LeafkdError(f"student_layers {spec!r}: expected a count (6), layer indices (0,2,4) or "
                              f"{EVERY_OTHER}") from None
        if len(parts) == 1 and "," not in text and not text.startswith("["):
            return numbers[0]
        return ",".join(map(str, numbers))
    return ",".join(str(int(i)) for i in spec)


def layer_indices(spec: LayerSpec | None, available: int) -> list[int]:
    """The 0-based indices of the layers kept out of `available`; a spec that does not fit is a `LeafkdError`."""
    spec = canonical_layers(spec)
    if spec is None:
        return list(range(available))
    if isinstance(spec, int):
        if not 1 <= spec <= available:
            raise LeafkdError(f"student_layers={spec}, but the base has {available} layers")
        return list(range(spec))
    if spec == EVERY_OTHER:
        return list(range(0, available, 2))
    indices = [int(i) for i in spec.split(",")]
    bad = [i for i in indices if not 0 <= i < available]
    if not indices or bad:
        raise LeafkdError(f"student_layers={spec}: layer indices must be in 0..{available - 1} (the base has "
                          f"{available} layers)")
    if indices != sorted(set(indices)):
        raise LeafkdError(f"student_layers={spec}: give each layer once, in increasing order")
    return indices


def encoder_blocks(auto: nn.Module) -> nn.ModuleList:
    """The encoder's list of layers of a Hugging Face model (BERT, MPNet, RoBERTa, ...)."""
    blocks = getattr(getattr(auto, "encoder", None), "layer", None)
    if not isinstance(blocks, nn.ModuleList):
        raise LeafkdError(f"cannot select layers of a {type(auto).__name__}: no encoder.layer list")
    return blocks


def keep_layers(auto: nn.Module, spec: LayerSpec | None) -> list[int]:
    """Keep only the layers `spec` names (renumbered 0..k-1 in the saved model); returns their original indices.

    Shared parts stay (MPNet's relative attention bias lives on the encoder, not in the layers).
    """
    blocks = encoder_blocks(auto)
    indices = layer_indices(spec, len(blocks))
    auto.encoder.layer = nn.ModuleList([blocks[i] for i in indices])
    auto.config.num_hidden_layers = len(indices)
    return indices
