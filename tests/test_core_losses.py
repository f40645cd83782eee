import math

import pytest
import torch

from poe_core.losses import ckd_loss, kd_loss, scale_loss, soft_loss


def _softmax(values, t):
    exps = [math.exp(v / t) for v in values]
    return [e / sum(exps) for e in exps]


def test_kd_matches_hand_computed_value():
    student, teacher, t = [1.0, 2.0, 0.5], [3.0, 0.0, 1.0], 4.0
    p, q = _softmax(teacher, t), _softmax(student, t)
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)) * t * t
    got = kd_loss(torch.tensor([student]), torch.tensor([teacher]), t)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_averages_over_the_batch():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    both = kd_loss(s, t)
    first = kd_loss(s[:1], t[:1])
    assert both.item() == pytest.approx(first.item() / 2, rel=1e-6)


def test_scale_loss_is_mean_absolute_difference():
    s = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    t = torch.tensor([[0.0, 0.0], [0.5, 4.0]])
    assert scale_loss(s, t).item() == pytest.approx((1 + 2 + 0 + 4) / 4)


def test_ckd_is_soft_plus_alpha_scale():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.1, -1.0, 3.0]])
    t = torch.tensor([[3.0, 0.0, 1.0], [2.0, 2.0, -2.0]])
    expected = soft_loss(s, t, 4.0) + 0.3 * scale_loss(s, t)
    assert ckd_loss(s, t, 4.0, 0.3).item() == pytest.approx(expected.item())
    assert ckd_loss(s, t, 4.0, 0.0).item() == pytest.approx(soft_loss(s, t, 4.0).item())


def test_soft_loss_ignores_logit_scale_but_scale_loss_does_not():
    t = torch.tensor([[2.0, 0.0, 1.0]])
    shifted = t + 5.0
    assert soft_loss(shifted, t).item() == pytest.approx(0.0, abs=1e-6)
    assert scale_loss(shifted, t).item() == pytest.approx(5.0)


def test_standardized_kd_ignores_the_logit_range_but_not_the_ranking():
    teacher = torch.tensor([[3.0, 0.0, 1.0, -2.0]])
    squeezed = 0.1 * teacher + 5.0  # same ranking and relative gaps, another range and offset
    assert kd_loss(squeezed, teacher, 4.0, standardized=True).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(squeezed, teacher, 4.0).item() > 0.1
    reordered = teacher[:, [1, 0, 2, 3]]
    assert kd_loss(reordered, teacher, 4.0, standardized=True).item() > 0.01
