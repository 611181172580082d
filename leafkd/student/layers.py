"""Which encoder layers a student keeps: the first k (``first:6`` or ``6``), every n-th layer from the first
(``every:2``: 0, 2, 4, ...; DistilBERT's initialisation, taken up by LEAF; ``every-other`` says the same), or an
explicit list (``0,2,4,6,8,10``).

A layer spec is an int, a list of ints, or its text form as the command line and TOML give it; `canonical_layers`
turns any of them into one value (an int for "first k", else ``every:N`` or ``i,j,k``), so a run's result key does
not depend on how the spec was spelled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from leafkd.errors import LeafkdError

if TYPE_CHECKING:
    from torch import nn

EVERY_OTHER = "every-other"
SPEC_HELP = "a count (first:6 or 6), every n-th layer (every:2) or layer indices (0,2,4)"

LayerSpec = int | str | Sequence[int]


def _count(text: str, spec: object) -> int:
    n = _index(text, spec)
    if n < 1:
        raise LeafkdError(f"student_layers {spec!r}: the count must be >= 1")
    return n


def canonical_layers(spec: LayerSpec | None) -> int | str | None:
    """One spelling of a layer spec: None (all layers), an int (the first k), ``every:N`` or ``i,j,k``."""
    if isinstance(spec, bool):
        raise LeafkdError(f"student_layers must be {SPEC_HELP}, not {spec}")
    if spec is None or isinstance(spec, int):
        return spec
    if not isinstance(spec, str):
        return ",".join(str(int(i)) for i in spec)
    text = spec.strip().lower().replace(" ", "")
    if text in ("", "none", "all"):
        return None
    if text == EVERY_OTHER:
        return "every:2"
    kind, sep, rest = text.partition(":")
    if sep:
        if kind not in ("first", "every"):
            raise LeafkdError(f"student_layers {spec!r}: expected {SPEC_HELP}")
        n = _count(rest, spec)
        return n if kind == "first" else f"every:{n}"
    if "," not in text and not text.startswith("["):
        return _count(text, spec)
    return ",".join(str(_index(p, spec)) for p in text.strip("[]").split(",") if p != "")


def _index(text: str, spec: object) -> int:
    try:
        return int(text)
    except ValueError:
        raise LeafkdError(f"student_layers {spec!r}: expected {SPEC_HELP}") from None


def layer_indices(spec: LayerSpec | None, available: int) -> list[int]:
    """The 0-based indices of the layers kept out of `available`; a spec that does not fit is a `LeafkdError`."""
    spec = canonical_layers(spec)
    if spec is None:
        return list(range(available))
    if isinstance(spec, int):
        if not 1 <= spec <= available:
            raise LeafkdError(f"student_layers={spec}, but the base has {available} layers")
        return list(range(spec))
    if spec.startswith("every:"):
        return list(range(0, available, int(spec.partition(":")[2])))
    indices = [int(i) for i in spec.split(",") if i]
    bad = [i for i in indices if not 0 <= i < available]
    if not indices or bad:
        raise LeafkdError(f"student_layers={spec}: layer indices must be in 0..{available - 1} (the base has "
                          f"{available} layers)")
    if indices != sorted(set(indices)):
        raise LeafkdError(f"student_layers={spec}: give each layer once, in increasing order")
    return indices


def encoder_blocks(auto: nn.Module) -> nn.ModuleList:
    """The encoder's list of layers of a Hugging Face model (BERT, MPNet, RoBERTa, ...)."""
    from torch import nn  # here, not at the top: the CLI's parser reads this module's spec help without torch

    blocks = getattr(getattr(auto, "encoder", None), "layer", None)
    if not isinstance(blocks, nn.ModuleList):
        raise LeafkdError(f"cannot select layers of a {type(auto).__name__}: no encoder.layer list")
    return blocks


def keep_layers(auto: Any, spec: LayerSpec | None) -> list[int]:
    """Keep only the layers `spec` names (renumbered 0..k-1 in the saved model); returns their original indices.

    Shared parts stay (MPNet's relative attention bias lives on the encoder, not in the layers).
    """
    blocks = encoder_blocks(auto)
    indices = layer_indices(spec, len(blocks))
    from torch import nn

    auto.encoder.layer = nn.ModuleList([blocks[i] for i in indices])
    auto.config.num_hidden_layers = len(indices)
    return indices
