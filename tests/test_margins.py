"""Margin heads: values against the formulas, gradient conventions, numerics at cos θ = ±1, fp32 under autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastface_pl.models.margins import (
    ArcFace,
    ArcFaceExact,
    CombinedMargin,
    CosFace,
    build_margin,
    safe_arccos,
)

EDGE = torch.tensor([-1.0, -0.999999, -0.5, 0.0, 0.3, 0.999999, 1.0], dtype=torch.float64)


def target_grad(head, cos):
    cos = cos.clone().requires_grad_(True)
    value = head.target_logit(cos)
    (grad,) = torch.autograd.grad(value.sum(), cos)
    return value.detach(), grad


def test_values_against_formulas():
    cos = torch.tensor([-0.9, -0.2, 0.0, 0.4, 0.95], dtype=torch.float64)
    theta = torch.arccos(cos)
    torch.testing.assert_close(ArcFace(m=0.5).target_logit(cos), torch.cos(theta + 0.5))
    torch.testing.assert_close(CosFace(m=0.4).target_logit(cos), cos - 0.4)
    expected_exact = torch.where(theta + 0.5 <= math.pi, torch.cos(theta + 0.5), cos - 0.5 * math.sin(0.5))
    torch.testing.assert_close(ArcFaceExact(m=0.5).target_logit(cos), expected_exact)
    combined = CombinedMargin(m1=1.2, m2=0.3, m3=0.1, straight_through=False)
    angle = 1.2 * theta + 0.3
    expected = torch.where(angle <= math.pi, torch.cos(angle), cos - 0.3 * math.sin(0.3)) - 0.1
    torch.testing.assert_close(combined.target_logit(cos), expected)


def arcface_torch_combined_target(cos, m1, m2, m3):
    """arcface_torch's ``CombinedMarginLoss`` target logit (losses.py): the ArcFace branch for m1 = 1, m3 = 0,
    else, for m3 > 0, the CosFace branch, which leaves m1 and m2 out."""
    if m1 == 1.0 and m3 == 0.0:
        return torch.cos(torch.arccos(cos) + m2)
    if m3 > 0:
        return cos - m3
    raise ValueError("arcface_torch refuses this combination")


def test_combined_matches_arcface_torch_on_arcface_and_cosface_and_differs_with_m2_and_m3():
    """Ours applies all three margins; arcface_torch's drops m2 whenever m3 > 0 (the docstring says so)."""
    cos = torch.tensor([-0.9, -0.2, 0.0, 0.4, 0.95], dtype=torch.float64)
    for m1, m2, m3 in [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4)]:
        torch.testing.assert_close(CombinedMargin(m1=m1, m2=m2, m3=m3).target_logit(cos),
                                   arcface_torch_combined_target(cos, m1, m2, m3))
    ours = CombinedMargin(m1=1.0, m2=0.3, m3=0.2).target_logit(cos)
    torch.testing.assert_close(ours, torch.cos(torch.arccos(cos) + 0.3) - 0.2)
    assert (arcface_torch_combined_target(cos, 1.0, 0.3, 0.2) - ours).abs().min() > 0.01


def test_combined_reduces_to_arcface_and_cosface():
    cos = torch.linspace(-0.99, 0.99, 41, dtype=torch.float64)
    torch.testing.assert_close(CombinedMargin(m1=1, m2=0.5, m3=0).target_logit(cos), ArcFace().target_logit(cos))
    torch.testing.assert_close(CombinedMargin(m1=1, m2=0, m3=0.4).target_logit(cos), CosFace().target_logit(cos))
    exact = CombinedMargin(m1=1, m2=0.5, m3=0, straight_through=False)
    torch.testing.assert_close(exact.target_logit(cos), ArcFaceExact().target_logit(cos))


def test_forward_changes_only_target_and_scales():
    torch.manual_seed(0)
    cosine = torch.rand(4, 6, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 5, -1, 2])
    logits = CosFace(s=64.0, m=0.4)(cosine, labels)
    expected = cosine * 64.0
    for row, label in enumerate(labels.tolist()):
        if label >= 0:
            expected[row, label] = (cosine[row, label] - 0.4) * 64.0
    torch.testing.assert_close(logits, expected)
    assert torch.equal(logits[2], cosine[2] * 64.0)  # ignored row untouched


def test_forward_clamps_cosines():
    cosine = torch.tensor([[1.0000001, -1.0000001]], dtype=torch.float32)
    logits = ArcFace(s=1.0)(cosine, torch.tensor([0]))
    assert torch.isfinite(logits).all()
    assert logits[0, 1] == -1.0 and logits[0, 0] == pytest.approx(math.cos(0.5))


@pytest.mark.parametrize("head", [ArcFace(), ArcFaceExact(), CosFace(), CombinedMargin(m1=1.3, m2=0.2, m3=0.1),
                                  CombinedMargin(m1=1.3, m2=0.2, m3=0.1, straight_through=False)],
                         ids=["arcface", "arcface_exact", "cosface", "combined_st", "combined_exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_values_and_gradients_at_the_edges(head, dtype):
    cos = torch.cat([EDGE, torch.tensor([1.0000001, -1.0000001], dtype=torch.float64)]).to(dtype)
    value, grad = target_grad(head, cos)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    cosine = cos.unsqueeze(0).repeat(len(cos), 1).requires_grad_(True)
    logits = head(cosine, torch.arange(len(cos)))
    F.cross_entropy(logits, torch.arange(len(cos))).backward()
    assert torch.isfinite(logits).all() and torch.isfinite(cosine.grad).all()


@pytest.mark.parametrize("head", [ArcFace(), CosFace(), CombinedMargin(m1=1.3, m2=0.2, m3=0.1)],
                         ids=["arcface", "cosface", "combined_st"])
def test_straight_through_gradient_equals_plain_cosine_gradient(head):
    torch.manual_seed(0)
    cosine = (torch.rand(5, 7, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    labels = torch.tensor([0, 3, 6, 2, 2])
    logits = head(cosine, labels)
    # same forward values, gradient through s·cos as if no margin: d/dcos of CE(s·cos + const)
    probabilities = torch.softmax(logits.detach(), dim=1)
    F.cross_entropy(logits, labels).backward()
    expected = (probabilities - F.one_hot(labels, 7)) * head.s / 5
    torch.testing.assert_close(cosine.grad, expected)


def test_exact_arcface_gradient_is_derivative_of_cos_theta_plus_m():
    cos = torch.tensor([-0.6, -0.1, 0.2, 0.7, 0.9], dtype=torch.float64)
    _, grad = target_grad(ArcFaceExact(m=0.5), cos)
    expected = math.cos(0.5) + cos * math.sin(0.5) / torch.sqrt(1 - cos**2)
    torch.testing.assert_close(grad, expected)
    _, st_grad = target_grad(ArcFace(m=0.5), cos)
    assert torch.equal(st_grad, torch.ones_like(cos))


def test_exact_arcface_rule_beyond_pi():
    m = 0.5
    head = ArcFaceExact(m=m)
    threshold = math.cos(math.pi - m)
    beyond = torch.tensor([-1.0, -0.95, threshold - 1e-6], dtype=torch.float64)
    value, grad = target_grad(head, beyond)
    torch.testing.assert_close(value, beyond - m * math.sin(m))  # cos θ − m·sin m
    torch.testing.assert_close(grad, torch.ones_like(beyond))
    inside = torch.tensor([threshold + 1e-6], dtype=torch.float64)
    assert head.target_logit(inside) == pytest.approx(math.cos(math.acos(inside.item()) + m))
    # the target logit never rises as θ grows (cos(θ + m) alone would, past π − m)
    grid = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    values = head.target_logit(grid)
    assert (values[1:] >= values[:-1] - 1e-12).all()


@pytest.mark.parametrize("head", [ArcFaceExact(), CombinedMargin(m1=1.2, m2=0.3, m3=0.1, straight_through=False),
                                  CosFace()], ids=["arcface_exact", "combined_exact", "cosface"])
@pytest.mark.parametrize("point", [-0.999, -0.3, 0.0, 0.5, 0.999])
def test_gradcheck_float64(head, point):
    # gradcheck needs a differentiable neighbourhood: interior points, as close to ±1 as finite differences
    # allow (at exactly ±1 the clamp makes the one-sided derivative differ; finiteness is tested above),
    # and away from the θ + m = π switch of the exact forms.
    cos = torch.tensor([point], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(head.target_logit, (cos,), eps=1e-7, atol=1e-5)


def test_gradcheck_full_head_and_safe_arccos():
    torch.manual_seed(0)
    cosine = (torch.rand(3, 4, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    labels = torch.tensor([1, -1, 3])
    assert torch.autograd.gradcheck(lambda c: ArcFaceExact(s=4.0)(c, labels), (cosine,))
    x = torch.tensor([-0.9, 0.0, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(safe_arccos, (x,))
    edge = torch.tensor([-1.0, 1.0], dtype=torch.float64, requires_grad=True)
    safe_arccos(edge).sum().backward()
    assert torch.isfinite(edge.grad).all()


def test_cross_entropy_in_fp32_under_autocast():
    from fastface_pl.models.classifiers import FullClassifier

    torch.manual_seed(0)
    layer = FullClassifier(8, 10, build_margin("arcface"))
    embeddings = torch.randn(4, 8).bfloat16()
    labels = torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(embeddings, labels)
    assert loss.dtype == torch.float32
    reference = layer(embeddings.float(), labels)  # the same computation without autocast
    torch.testing.assert_close(loss, reference)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("sphereface", {}, "valid names: arcface, arcface_exact, cosface, combined"),
        ("arcface", {"s": 0}, "s must be"),
        ("cosface", {"m": -0.1}, "m must be"),
        ("combined", {"m1": 0.5}, "m1 must be"),
        ("arcface", {"margin": 0.5}, "invalid arguments for margin 'arcface'"),
    ],
)
def test_invalid_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_margin(name, **kwargs)


def test_build_margin_names():
    assert isinstance(build_margin("arcface", s=32.0, m=0.3), ArcFace)
    assert build_margin("cosface").m == 0.4 and build_margin("arcface").m == 0.5
    assert build_margin("arcface_exact").s == 64.0
