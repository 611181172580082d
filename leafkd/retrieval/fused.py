"""The fused query forward of Transformer -> mean Pooling -> [Dense]* -> [Normalize] models.

For these models (students and the usual teachers) queries run through the Hugging Face model directly, then
masked mean pooling, projection and normalisation in one small function: no sentence-transformers per-call
feature plumbing, and the whole pass can be captured in a CUDA graph. Other architectures keep the model's own
forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from leafkd.modules import is_mean_pooling
from leafkd.runtime.packed import mpnet_relative_bias


@dataclass
class FusedForward:
    """Token ids + attention mask -> normalised float32 sentence vectors, as the model's own modules compute them."""

    auto: torch.nn.Module  # the Hugging Face model inside the Transformer module
    dense: list[tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]]  # (linear, activation) per Dense
    lower: bool  # the Transformer module lower-cases texts before tokenising

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.auto(input_ids=ids, attention_mask=mask)[0]  # last_hidden_state
        m = mask.to(hidden.dtype).unsqueeze(1)  # [B, 1, L]
        summed = torch.bmm(m, hidden).squeeze(1).float()  # masked sum over tokens, fp32 accumulate
        x = summed / mask.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
        x = x.to(hidden.dtype)
        for linear, act in self.dense:
            x = act(linear(x))
        return torch.nn.functional.normalize(x.float(), dim=-1)


def _dense_layer(module) -> tuple[torch.nn.Module, Callable] | None:
    """(linear, activation) of a plain Dense module on the sentence embedding, or None for anything else."""
    if getattr(module, "use_residual", False):
        return None
    for attr in ("module_input_name", "module_output_name"):
        if getattr(module, attr, "sentence_embedding") != "sentence_embedding":
            return None
    return module.linear, module.activation_function


def fused_forward(model, prompt: str | None = None) -> FusedForward | None:
    """The fused forward of a Transformer -> mean Pooling -> [Dense]* -> [Normalize] model, or None otherwise."""
    try:
        modules = list(model)
    except TypeError:
        return None
    if len(modules) < 2:
        return None
    names = [type(m).__name__ for m in modules]
    if names[0] != "Transformer" or names[1] != "Pooling" or not is_mean_pooling(modules[1]):
        return None
    if prompt and getattr(modules[1], "include_prompt", True) is False:
        return None  # prompt tokens would have to be masked out of the pooling
    auto = getattr(modules[0], "auto_model", None)
    if auto is None:
        return None
    dense, normalized = [], False
    for m, name in zip(modules[2:], names[2:]):
        if normalized:
            return None  # something after Normalize
        if name == "Dense":
            layer = _dense_layer(m)
            if layer is None:
                return None
            dense.append(layer)
        elif name == "Normalize":
            normalized = True
        else:
            return None
    _position_bias_on_device(auto)
    return FusedForward(auto, dense, bool(getattr(modules[0], "do_lower_case", False)))


def _position_bias_on_device(auto: torch.nn.Module) -> None:
    """Make an MPNet encoder build its relative position bias on the hidden states' device.

    transformers before ~5.20 builds the relative positions with `torch.arange` on the CPU and copies them to the
    GPU on every forward: a CUDA graph cannot capture that copy, so MPNet models (all-mpnet-base-v2, the teacher's
    layer cuts) ran their queries eagerly (an H200 run: "Cannot copy between CPU and CUDA tensors during CUDA
    graph capture"). The replacement computes the same values, as newer transformers does; it is set on this
    encoder instance only.
    """
    encoder = getattr(auto, "encoder", None)
    if getattr(getattr(auto, "config", None), "model_type", None) != "mpnet" or encoder is None:
        return
    if not hasattr(encoder, "relative_position_bucket") or not hasattr(encoder, "relative_attention_bias"):
        return

    own = type(encoder).compute_position_bias

    def compute_position_bias(x: torch.Tensor, position_ids: torch.Tensor | None = None,
                              num_buckets: int = 32) -> torch.Tensor:
        if position_ids is not None or num_buckets != encoder.relative_attention_bias.num_embeddings:
            return own(encoder, x, position_ids, num_buckets)  # not what MPNetEncoder.forward asks for
        bias = mpnet_relative_bias(encoder, torch.arange(x.size(1), device=x.device))  # [H, L, L]
        return bias.unsqueeze(0).expand(x.size(0), -1, -1, -1).contiguous()

    encoder.compute_position_bias = compute_position_bias
