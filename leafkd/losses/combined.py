"""The weighted sum of named losses that training minimises."""

from __future__ import annotations

from torch import Tensor, nn

from leafkd.losses.relational import RelationalLoss


class CombinedLoss(nn.Module):
    """Weighted sum of named losses; `forward` returns the total and each weighted part (detached)."""

    def __init__(self, parts: dict[str, tuple[float, nn.Module]]):
        super().__init__()
        if not parts:
            raise ValueError("CombinedLoss needs at least one loss with a non-zero weight")
        self.weights = {name: float(w) for name, (w, _) in parts.items()}
        self.losses = nn.ModuleDict({name: m for name, (_, m) in parts.items()})

    def forward(self, student: Tensor, teacher: Tensor, keys: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        total = student.new_zeros(())
        report: dict[str, Tensor] = {}
        for name, module in self.losses.items():
            if keys is not None and isinstance(module, RelationalLoss):
                value = module(student, teacher, keys) * self.weights[name]
            else:
                value = module(student, teacher) * self.weights[name]
            total = total + value
            report[name] = value.detach()
        return total, report


