"""The ridge warm start: the projection set to the closed-form ridge map from the student's pooled vectors to the
teacher's, so training starts from the linear-map baseline instead of from noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from leafkd.student.build import pooled_model, projection_layer
from leafkd.vectors import ridge_fit


def warm_start(model, texts: Sequence[str], teacher_vectors: np.ndarray, alpha: float = 1e-2,
               batch_tokens: int | None = None) -> None:
    """Set the student's projection to the ridge map from its pooled vectors to the teacher's vectors."""
    from leafkd.runtime.encode import encode

    dense = projection_layer(model)
    if dense is None:
        return
    x = encode(pooled_model(model), list(texts), batch_tokens=batch_tokens, dtype="fp32")
    w, b = ridge_fit(x, np.asarray(teacher_vectors, dtype=np.float32), alpha)
    with torch.no_grad():
        dense.linear.weight.copy_(torch.from_numpy(w))
        dense.linear.bias.copy_(torch.from_numpy(b))


