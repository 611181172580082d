"""The maths of the losses: zero loss and zero gradient at the teacher, finite gradients, invariances."""

import pytest
import torch

from leafkd.losses.combined import CombinedLoss
from leafkd.losses.distance import CosineLoss, LeafL2Loss, MSELoss
from leafkd.losses.lelp import LELPHead, LELPLoss
from leafkd.losses.relational import BankRelationalLoss, RelationalLoss

torch.manual_seed(0)
D = 32


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def teacher_cloud():
    # Clustered unit vectors, like a teacher's embedding space.
    centres = _unit(torch.randn(6, D))
    x = centres[torch.randint(0, 6, (600,))] + 0.3 * torch.randn(600, D)
    return _unit(x)


@pytest.fixture(scope="module")
def lelp_head(teacher_cloud):
    return LELPHead.fit(teacher_cloud.numpy(), classes=6, subclasses=4, seed=0)


def all_losses(head, bank):
    return {"l2": LeafL2Loss(), "mse": MSELoss(), "cos": CosineLoss(), "lelp": LELPLoss(head, 0.1),
            "rel": RelationalLoss(0.1), "bank": BankRelationalLoss(bank, 0.1)}


def test_zero_loss_and_gradient_at_teacher(teacher_cloud, lelp_head):
    t = teacher_cloud[:16]
    for name, loss in all_losses(lelp_head, teacher_cloud[100:300]).items():
        s = t.clone().requires_grad_(True)
        value = loss(s, t)
        value.backward()
        assert abs(float(value.detach())) < 1e-6, name
        assert s.grad.abs().max() < 1e-5, name


def test_positive_and_finite_gradients_away_from_teacher(teacher_cloud, lelp_head):
    t = teacher_cloud[:16]
    for name, loss in all_losses(lelp_head, teacher_cloud[100:300]).items():
        s = (t + 0.2 * torch.randn_like(t)).requires_grad_(True)
        value = loss(s, t)
        value.backward()
        assert float(value.detach()) > 0, name
        assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0, name


def test_l2_equals_D_times_mse_and_matches_formula(teacher_cloud):
    t = teacher_cloud[:8]
    s = t + 0.1 * torch.randn_like(t)
    l2 = LeafL2Loss()(s, t)
    assert torch.allclose(l2, MSELoss()(s, t) * D)
    assert torch.allclose(l2, ((s - t) ** 2).sum(1).mean())


def test_cosine_scale_invariance(teacher_cloud):
    t = teacher_cloud[:8]
    s = t + 0.3 * torch.randn_like(t)
    assert torch.allclose(CosineLoss()(s, t), CosineLoss()(3.7 * s, t), atol=1e-6)


def test_rotation_invariance_of_l2_and_relational(teacher_cloud):
    t = teacher_cloud[:12]
    s = t + 0.2 * torch.randn_like(t)
    q, _ = torch.linalg.qr(torch.randn(D, D))
    for loss in (LeafL2Loss(), RelationalLoss(0.1)):
        assert torch.allclose(loss(s, t), loss(s @ q, t @ q), atol=1e-5)


def test_lelp_head_structure(lelp_head, teacher_cloud):
    p = lelp_head.directions
    assert p.shape == (6 * 4, D)
    # Rows are unit vectors, orthonormal within a class block (a rotation of principal directions).
    for c in range(6):
        block = p[c * 4 : (c + 1) * 4]
        assert torch.allclose(block @ block.T, torch.eye(4), atol=1e-4)
    # No trainable parameters: the head is fitted once on teacher vectors and shared.
    assert sum(x.numel() for x in LELPLoss(lelp_head).parameters()) == 0


def test_lelp_invariant_to_error_orthogonal_to_head(lelp_head, teacher_cloud):
    t = teacher_cloud[:8]
    p = lelp_head.directions
    basis, _ = torch.linalg.qr(p.T)  # span of the head's directions
    noise = torch.randn_like(t)
    orth = noise - (noise @ basis) @ basis.T
    if orth.norm() > 1e-3:  # D=32 and C*S=24: a nullspace exists
        assert float(LELPLoss(lelp_head)(t + orth, t)) < 1e-6


def test_combined_weights(teacher_cloud, lelp_head):
    t = teacher_cloud[:8]
    s = t + 0.1 * torch.randn_like(t)
    combo = CombinedLoss({"leaf_l2": (1.0, LeafL2Loss()), "lelp": (0.5, LELPLoss(lelp_head))})
    total, parts = combo(s, t)
    assert torch.allclose(total, LeafL2Loss()(s, t) + 0.5 * LELPLoss(lelp_head)(s, t))
    assert set(parts) == {"leaf_l2", "lelp"}


def test_bank_relational_is_relational_against_fixed_keys(teacher_cloud):
    t = teacher_cloud[:12]
    s = t + 0.2 * torch.randn_like(t)
    # With the batch's own teacher vectors as the bank it is the in-batch relational loss.
    assert torch.allclose(BankRelationalLoss(t, 0.1)(s, t), RelationalLoss(0.1)(s, t), atol=1e-6)
    # Only the error inside the bank's span matters: error orthogonal to every key changes nothing.
    bank = teacher_cloud[100:110]
    basis, _ = torch.linalg.qr(bank.T)
    noise = torch.randn_like(t)
    orth = noise - (noise @ basis) @ basis.T
    assert float(BankRelationalLoss(bank, 0.1)(t + orth, t)) < 1e-6
    assert float(BankRelationalLoss(bank, 0.1)(t + noise, t)) > 1e-4
    # No trainable parameters; the bank travels with the module (buffer) to the training device.
    loss = BankRelationalLoss(bank.numpy(), 0.1)
    assert sum(p.numel() for p in loss.parameters()) == 0 and "bank" in dict(loss.named_buffers())
    with pytest.raises(ValueError, match="at least 2 vectors"):
        BankRelationalLoss(bank[:1])
