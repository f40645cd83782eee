"""Expert heads cut from the library's student head (poe_core.prune)."""

import pytest
import torch

from poe_core import prune
from poe_core.nets import ExpertHead, init_weights
from poe_core.prune import pruned_head


def _student(classes: int = 10, depth: int = 10, in_channels: int = 8) -> ExpertHead:
    torch.manual_seed(0)
    head = ExpertHead(depth, in_channels, 1.0, classes)
    init_weights(head)
    head.train()
    with torch.no_grad():  # BatchNorm statistics and affine parameters away from their defaults
        for _ in range(3):
            head(torch.randn(16, in_channels, 8, 8) * 2 + 0.5)
        for m in head.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        head.fc.bias.uniform_(-1, 1)
    return head.eval()


def test_full_width_is_the_student_restricted_to_the_task():
    student = _student()
    features = torch.randn(32, 8, 8, 8)
    classes = [7, 2, 5]
    head = pruned_head(student, classes, 1.0, features, depth=10)
    x = torch.randn(5, 8, 8, 8)
    with torch.no_grad():
        assert torch.allclose(head(x), student(x)[:, classes], atol=1e-5)


def test_narrow_head_keeps_the_channels_that_carry_the_task(monkeypatch):
    student = _student()
    features = torch.randn(64, 8, 8, 8)
    classes = [1, 4]
    head = pruned_head(student, classes, 0.5, features, depth=10)
    assert head.fc.weight.shape == (2, 32) and head.conv4[0].conv1.weight.shape == (32, 8, 3, 3)
    x = torch.randn(256, 8, 8, 8)
    with torch.no_grad():
        want = student(x)[:, classes]
        error = (head(x) - want).abs().mean()
        # the same cut with channels kept at random instead of by score
        torch.manual_seed(1)
        monkeypatch.setattr(prune, "_keep",
                            lambda scores, width: torch.sort(torch.randperm(len(scores))[:width]).values)
        random_errors = [(pruned_head(student, classes, 0.5, features, depth=10)(x) - want).abs().mean()
                         for _ in range(5)]
    assert error < sum(random_errors) / len(random_errors)


def test_cannot_widen_the_student():
    with pytest.raises(ValueError, match="cannot be cut"):
        pruned_head(_student(), [0], 2.0, torch.randn(4, 8, 8, 8), depth=10)


def test_experts_start_as_the_student_cut_to_their_task(work_dir, synthetic):
    """init 'student': at the student's own width a head starts as the student restricted
    to its task (the mask baseline); narrower heads start cut from it; training goes on."""
    from conftest import tiny_plan

    from poe_core.extract import load_wrn
    from poe_core.train import HeadTarget, _initial_heads, train_experts

    net = load_wrn(work_dir, "library", len(synthetic.taxonomy.classes))
    plan = tiny_plan(epochs=1, init="student")
    classes = synthetic.taxonomy.tasks["task1"]
    full = net.spec.ks
    heads = {"a": HeadTarget(classes, ks=full), "b": HeadTarget(classes, ks=full / 2)}
    start = _initial_heads(net.library, synthetic, heads, plan.expert_spec, plan.expert_cfg, net.head)
    x = (synthetic.val.x[:20].float() / 255 - torch.tensor(synthetic.mean).view(1, -1, 1, 1)) \
        / torch.tensor(synthetic.std).view(1, -1, 1, 1)
    with torch.no_grad():
        f = net.library(x)
        torch.testing.assert_close(start["a"](f), net.head(f)[:, list(classes)], atol=1e-5, rtol=1e-4)
        assert start["b"](f).shape == (20, len(classes))
    experts, result = train_experts(net.library, net, synthetic, ["task1"], plan.expert_spec, plan.expert_cfg,
                                    widths=[full / 2], student=net.head)
    assert result.epochs == 1 and 0 <= result.best_val_acc[f"task1@{full / 2:g}"] <= 1
    with pytest.raises(ValueError, match="student head"):
        train_experts(net.library, net, synthetic, ["task1"], plan.expert_spec, plan.expert_cfg)
