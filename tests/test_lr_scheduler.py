"""FastFaceLR: the detectors as a plain-PyTorch scheduler (ReduceLROnPlateau style)."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

from fastface_pl.scheduling.detectors import FastFaceDetector, MovingHaarDetector, NonFiniteLossError
from fastface_pl.scheduling.lr_scheduler import FastFaceLR


def make_optimizer(lrs=(0.02, 0.002)):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)


def raw_detector(patience=1, **kwargs):
    """alpha = beta = 1: stationary exactly when the loss falls by less than 0.5."""
    return FastFaceDetector(alpha=1.0, beta=1.0, threshold=0.5, patience=patience, **kwargs)


def test_the_scheduler_alone_records_decisions_numbered_by_optimizer_step():
    scheduler = FastFaceLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.02), FastFaceDetector(patience=1))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        factors = [scheduler.step(loss) for loss in (3.0, math.nan, 3.0, 3.0)]
    assert factors == [1.0, 1.0, 1.0, 0.5]
    assert scheduler.decisions == [(4, 0.5, 0.01)]  # the NaN step counts: step 4, not the detector's third loss
    assert scheduler.detector.steps_seen == 3 and not hasattr(scheduler.detector, "decisions")


def test_decision_scales_every_group_and_keeps_their_ratio():
    optimizer = make_optimizer()
    scheduler = FastFaceLR(optimizer, raw_detector(patience=1))
    factors = [scheduler.step(3.0) for _ in range(3)]
    assert factors == [1.0, 1.0, 0.5]
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.001]
    assert scheduler.get_last_lr() == [0.01, 0.001]
    assert scheduler.decisions == [(3, 0.5, 0.01)]


def test_tensor_losses_and_shapes():
    optimizer = make_optimizer((0.1,))
    scheduler = FastFaceLR(optimizer, raw_detector(patience=0))
    scheduler.step(torch.tensor(2.0))
    assert scheduler.step(torch.tensor([2.0])) == 0.5  # one element is fine
    assert scheduler.detector.steps_seen == 2
    with pytest.raises(ValueError, match="scalar"):
        scheduler.step(torch.tensor([1.0, 2.0]))


def test_min_lr_floors_decays_but_not_restarts():
    optimizer = make_optimizer((0.1, 0.01))
    detector = MovingHaarDetector(window=2, threshold=0.5, patience=0)
    scheduler = FastFaceLR(optimizer, detector, min_lr=[0.02, 0.0])
    for _ in range(7):  # decisions at steps 5, 6, 7: three halvings
        scheduler.step(20.0)
    assert scheduler.get_last_lr() == [0.02, 0.00125]
    assert scheduler.step(20.0) == 4.0  # the restart raises from the floor
    assert scheduler.get_last_lr() == [0.08, 0.005]


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_lr=-1.0), "min_lr"),
    (dict(min_lr=[0.1]), "min_lr.*2"),
    (dict(on_nonfinite="ignore"), "on_nonfinite must be one of 'skip', 'raise', got 'ignore'"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FastFaceLR(make_optimizer(), raw_detector(), **kwargs)


def test_wrong_types_are_type_errors():
    with pytest.raises(TypeError, match="detector must be 'fastface', 'moving_haar' or a detector instance"):
        FastFaceLR(make_optimizer(), object())
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        FastFaceLR(object(), raw_detector())
    with pytest.raises(TypeError, match="loss must be a real number"):
        FastFaceLR(make_optimizer(), raw_detector()).step("3.0x")


def test_nonfinite_losses_are_skipped_counted_and_warned_once():
    scheduler = FastFaceLR(make_optimizer(), raw_detector(patience=1))
    with pytest.warns(RuntimeWarning, match="non-finite loss nan"):
        assert scheduler.step(math.nan) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would fail here
        scheduler.step(torch.tensor(math.inf))
        factors = [scheduler.step(3.0) for _ in range(3)]
    assert scheduler.num_nonfinite == 2
    assert scheduler.detector.steps_seen == 3  # the NaN and inf never entered the detector
    assert factors == [1.0, 1.0, 0.5] and scheduler.decisions == [(5, 0.5, 0.01)]


def test_nonfinite_losses_can_raise():
    scheduler = FastFaceLR(make_optimizer(), raw_detector(), on_nonfinite="raise")
    scheduler.step(1.0)
    with pytest.raises(NonFiniteLossError, match="optimizer step 2 is inf"):
        scheduler.step(math.inf)
    assert scheduler.detector.steps_seen == 1


def test_state_dict_resume_continues_the_same_lr_trajectory():
    losses = [10.0 - 0.02 * t if t % 97 < 40 else 5.0 for t in range(600)]

    def lrs_after(scheduler, optimizer, chunk):
        out = []
        for loss in chunk:
            scheduler.step(loss)
            out.append(tuple(g["lr"] for g in optimizer.param_groups))
        return out

    optimizer = make_optimizer()
    reference = FastFaceLR(optimizer, FastFaceDetector(alpha=0.1, beta=0.1, threshold=1e-3, patience=20))
    expected = lrs_after(reference, optimizer, losses)
    assert len(reference.decisions) >= 3

    optimizer = make_optimizer()
    first = FastFaceLR(optimizer, FastFaceDetector(alpha=0.1, beta=0.1, threshold=1e-3, patience=20))
    lrs_after(first, optimizer, losses[:250])
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # plain Python values only

    optimizer = make_optimizer()
    resumed = FastFaceLR(optimizer, FastFaceDetector(patience=1))
    optimizer.load_state_dict(checkpoint["optimizer"])
    resumed.load_state_dict(checkpoint["scheduler"])
    assert resumed.last_step == 250 and resumed.detector.patience == 20
    assert lrs_after(resumed, optimizer, losses[250:]) == expected[250:]
    assert resumed.decisions == reference.decisions


def test_load_state_dict_needs_a_detector_entry():
    with pytest.raises(ValueError, match="detector"):
        FastFaceLR(make_optimizer(), raw_detector()).load_state_dict({})


def test_decay_never_raises_a_group_already_below_min_lr():
    # Group 0 starts below its floor: a decay leaves it alone (it must not jump up to min_lr).
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 1e-4}, {"params": [params[1]], "lr": 0.1}], lr=0.1)
    scheduler = FastFaceLR(optimizer, FastFaceDetector(patience=1), min_lr=1e-3)
    factors = [scheduler.step(3.0) for _ in range(3)]
    assert factors[-1] == 0.5
    assert scheduler.get_last_lr() == [1e-4, 0.05]


# --------------------------------------------------------------------------------------------------
# What the three entry points share lives in FastFaceLR: patience from τ and T, reconfiguration, composition.
def test_named_detector_with_patience_fraction_resolves_p_from_the_run_length():
    scheduler = FastFaceLR(make_optimizer(), "fastface", {"alpha": 0.5}, total_steps=1000)
    assert scheduler.patience_fraction == 0.05 and scheduler.detector.patience == 50  # the paper's τ by default
    assert scheduler.detector.alpha == 0.5
    assert FastFaceLR(make_optimizer(), "moving_haar", {"window": 10}).detector.patience == 20  # 2·m, no T needed
    assert FastFaceLR(make_optimizer(), "fastface", patience=7).detector.patience == 7
    with pytest.raises(ValueError, match="patience_fraction=0.05 needs the run length: pass total_steps"):
        FastFaceLR(make_optimizer(), "fastface")


def test_set_total_steps_recomputes_p_and_keeps_the_running_state():
    scheduler = FastFaceLR(make_optimizer(), "fastface", {"alpha": 1.0, "beta": 1.0, "threshold": 0.5},
                           patience_fraction=0.1, total_steps=40)
    for _ in range(3):
        scheduler.step(3.0)
    assert scheduler.detector.patience == 4 and scheduler.detector.stationary_count == 2
    assert scheduler.set_total_steps(100) == {"patience": (4, 10)}
    assert scheduler.detector.patience == 10 and scheduler.detector.stationary_count == 2
    assert scheduler.detector.steps_seen == 3 and scheduler.set_total_steps(100) == {}


def test_reconfigure_names_unknown_settings():
    scheduler = FastFaceLR(make_optimizer(), raw_detector())
    assert scheduler.reconfigure(threshold=0.25) == {"threshold": (0.5, 0.25)}
    with pytest.raises(ValueError, match="FastFaceDetector has no setting window"):
        scheduler.reconfigure(window=3)


def test_several_optimizers_share_one_decision_and_the_floor_is_per_group():
    first, second = make_optimizer((0.1, 0.01)), make_optimizer((0.002,))
    scheduler = FastFaceLR([first, second], raw_detector(patience=0), min_lr=[0.0, 0.008, 0.0])
    scheduler.step(3.0)
    assert scheduler.step(3.0) == 0.5
    assert scheduler.get_last_lr() == [0.05, 0.008, 0.001]
    assert scheduler.decisions == [(2, 0.5, 0.05)]


class SuperCallingSGD(torch.optim.SGD):
    """An optimizer subclass whose step() calls super().step(): torch runs the step hooks twice."""

    def step(self, closure=None):
        self.seen = self.param_groups[0]["lr"]
        return super().step(closure)


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, SuperCallingSGD])
def test_compose_scales_another_schedulers_lr_while_the_optimizer_steps(optimizer_class):
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)  # hooks SGD.step too (as any earlier SGD does)
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = optimizer_class([weight], lr=0.1)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=5)
    scheduler = FastFaceLR(optimizer, raw_detector(patience=0), compose=True)
    used = []
    for step in range(8):
        weight.grad = torch.ones(1)
        before = weight.item()
        optimizer.step()
        used.append(before - weight.item())  # gradient 1, no momentum: the parameter moved by the LR in effect
        warmup.step()
        scheduler.step(3.0)
    own = [0.1 * min(1.0, 0.1 + 0.9 * s / 5) for s in range(8)]
    scale = [1.0, 1.0] + [0.5 ** (s - 1) for s in range(2, 8)]  # decisions from step 2 on, each applied next step
    assert used == pytest.approx([o * s for o, s in zip(own, scale)], rel=1e-5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # the warm-up's own LR, untouched
    assert scheduler.get_last_lr() == pytest.approx([0.1 * scheduler.lr_scale])
    scheduler.close()
    weight.grad = torch.ones(1)
    before = weight.item()
    optimizer.step()
    assert before - weight.item() == pytest.approx(0.1, rel=1e-5)  # hooks gone


def test_docstring_examples_run():
    import doctest

    from fastface_pl.scheduling import lr_scheduler

    assert doctest.testmod(lr_scheduler).failed == 0
