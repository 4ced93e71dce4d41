"""The composed config is checked against the classes it configures before any data or model is built."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Optional, Union

import pytest
from hydra import compose, initialize_config_module

from fastface_pl.config_check import check_arguments, describe_type, value_matches
from fastface_pl.config_check import validate_config
from fastface_pl.errors import ConfigurationError, UsageError
from fastface_pl.models.sharded import ShardedClassifier
from fastface_pl.runs import check_writable_folder, claim_run_folder

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_module(config_module="fastface_pl.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("value, annotation, expected", [
    (3, Optional[int], True), ("abc", Optional[int], False), (None, Optional[int], True), (True, int, False),
    (2, float, True), ("16-mixed", Union[Literal["16-mixed", "32-true"], int], True),
    ("17", Union[Literal["16-mixed", "32-true"], int], False), ([1, 2], list[int], True), ({"a": 1}, dict, True),
    (object(), Path, None),
])
def test_value_matches(value, annotation, expected):
    assert value_matches(value, annotation) is expected


def test_describe_type():
    assert describe_type(Optional[int]) == "an integer or null"
    assert describe_type(Union[Literal["a", "b"], None]) == "one of 'a', 'b' or null"


def test_unknown_keys_and_bad_types_are_named():
    def target(depth: int, rate: float = 0.1, name: Optional[str] = None) -> None: ...

    problems = check_arguments({"_target_": "x", "depth": "deep", "rate": 1, "colour": "red"}, target, "model")
    assert problems == ["model.depth='deep': expected an integer",
                        "model.colour: unknown key (target takes depth, rate, name)"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_shipped_config_passes(name):
    validate_config(_compose(f"+experiment={name}", "data.root=/data/somewhere"))


@pytest.mark.parametrize("scheduler", ["constant", "step", "polynomial", "moving_haar", "fastface_demo"])
def test_the_demo_with_every_scheduler_passes(scheduler):
    validate_config(_compose(f"scheduler={scheduler}"))


@pytest.mark.parametrize("override, named", [
    ("trainer.max_epochs=abc", "trainer.max_epochs='abc': expected an integer or null"),
    ("trainer.precision=17", "trainer.precision=17: expected one of"),
    ("model.lr=fast", "model.lr='fast': expected a number"),
    ("+model.dropout=0.1", "model.dropout: unknown key"),
    ("data.batch_size=1.5", "data.batch_size=1.5: expected an integer"),
    ("checkpoint_every_n_steps=0", "checkpoint_every_n_steps must be an int >= 1, got 0"),
    ("divergence.max_nonfinite_steps=-1", "divergence.max_nonfinite_steps must be an int >= 1, got -1"),
    # the ranges, checked before any data is read
    ("model.lr=-0.1", "model: lr must be a finite number in (0, inf), got -0.1"),
    ("data.batch_size=0", "data: batch_size must be an int >= 1, got 0"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0: expected an int >= 1 (or -1: no limit)"),
    ("trainer.max_steps=0", "trainer.max_steps=0: expected an int >= 1 (or -1: no limit)"),
    ("+model.classifier_kwargs.pool_size=8", "do not apply to classifier='full'"),
    ("+scheduler.thresold=1e-3", "thresold"),
    ("scheduler.patience=100", "give either patience (optimizer steps) or patience_fraction"),
])
def test_a_bad_value_is_named(override, named):
    with pytest.raises(UsageError, match="invalid configuration") as info:
        validate_config(_compose(override))
    assert named in str(info.value)


def test_run_folder_checks(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_writable_folder(tmp_path / "a_file" / "run")
    monkeypatch.setattr("os.access", lambda path, mode: False)  # as a user without write permission (even as root)
    with pytest.raises(UsageError, match="not writable"):
        check_writable_folder(tmp_path / "new" / "run")


def test_claiming_a_run_folder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    claim_run_folder(run, resume_in_place=False)
    (run / "config.yaml").write_text("first")
    (run / "logs").mkdir()
    (run / "logs" / "metrics.csv").write_text("step\n1\n")
    with pytest.raises(UsageError, match="already holds a run"):
        claim_run_folder(run, resume_in_place=False)
    claim_run_folder(run, resume_in_place=True)  # ckpt_path=last: the earlier files are renamed, not lost
    assert (run / "config.1.yaml").read_text() == "first" and not (run / "config.yaml").exists()
    assert (run / "logs" / "metrics.1.csv").read_text() == "step\n1\n"

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(UsageError, match="permission denied"):
        claim_run_folder(tmp_path / "other", resume_in_place=False)


def test_the_sharded_layer_with_the_trainers_clipping_is_refused_before_anything_is_built():
    validate_config(_compose("classifier=sharded", "trainer=ddp"))
    with pytest.raises(UsageError, match=r"trainer.gradient_clip_val=1.0 with classifier=sharded"):
        validate_config(_compose("classifier=sharded", "trainer=ddp", "trainer.gradient_clip_val=1.0"))


def test_the_sharded_layer_refuses_the_trainers_clipping_itself_over_several_ranks():
    """The layer owns the rule: the config check asks it, and so does its own on_fit_start with the real world size."""
    ShardedClassifier.check_trainer(1.0, world_size=1)
    ShardedClassifier.check_trainer(None, world_size=4)
    with pytest.raises(ConfigurationError, match=r"trainer.gradient_clip_val=1.0 with classifier=sharded"):
        ShardedClassifier.check_trainer(1.0, world_size=2)
    layer = ShardedClassifier(8, 4)
    layer.world_size = 2
    with pytest.raises(ConfigurationError, match=r"gradient_clip_val=0.5 with classifier=sharded"):
        layer.on_fit_start(SimpleNamespace(trainer=SimpleNamespace(gradient_clip_val=0.5)))


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_spawn_find_unused_parameters_true"])
def test_a_strategy_that_spawns_the_ranks_is_refused_before_training_naming_ddp(strategy):
    """Under ddp_spawn the run would train, then end as a usage error (the launching process's trainer counts no
    step): it is refused before training."""
    with pytest.raises(UsageError, match=rf"trainer.strategy={strategy}: .*use trainer.strategy=ddp") as info:
        validate_config(_compose("classifier=sharded", "trainer.accelerator=cpu", "trainer.devices=2",
                                 f"trainer.strategy={strategy}"))
    assert info.value.exit_code == 2
    validate_config(_compose("classifier=sharded", "trainer.accelerator=cpu", "trainer.devices=2",
                             "trainer.strategy=ddp"))
