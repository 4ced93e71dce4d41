"""The Hydra configs compose, name what the paper runs need, and instantiate."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

PAPER_RUNS = {
    # name: (backbone, margin, m, num_classes)
    "r100_ms1mv3": ("r100", "arcface", 0.5, 93431),
    "r100_webface4m": ("r100", "cosface", 0.4, 205990),
    "r100_webface8m": ("r100", "cosface", 0.4, None),
    "r50_webface12m": ("r50", "cosface", 0.4, 617970),
    "r100_webface12m": ("r100", "cosface", 0.4, 617970),
}


def _compose(*overrides: str):
    with initialize_config_module(config_module="fastface_pl.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("name", sorted(PAPER_RUNS))
def test_paper_experiment_has_the_papers_settings(name):
    backbone, margin, m, num_classes = PAPER_RUNS[name]
    cfg = _compose(f"+experiment={name}")
    assert cfg.model.backbone == backbone
    assert cfg.model.margin == margin
    assert cfg.model.margin_kwargs.s == 64.0 and cfg.model.margin_kwargs.m == m
    assert cfg.model.num_classes == cfg.data.num_classes == num_classes  # written once, in the experiment
    assert cfg.model.embedding_size == 512 and cfg.model.classifier == "full"
    assert cfg.model.lr == 0.02 and cfg.model.momentum == 0.9 and cfg.model.weight_decay == 5e-4
    assert cfg.model.clip_grad_norm == 5.0
    assert cfg.model.backbone_kwargs.input_size == 112
    assert cfg.data.batch_size == 128 and cfg.data.flip is True
    assert cfg.trainer.max_epochs == 5 and cfg.trainer.precision == "16-mixed"
    assert cfg.seed == 3407
    assert cfg.scheduler.detector == "fastface"
    assert (cfg.scheduler.alpha, cfg.scheduler.beta, cfg.scheduler.threshold) == (1e-3, 1e-3, 5e-5)
    assert (cfg.scheduler.patience_fraction, cfg.scheduler.decay, cfg.scheduler.max_decays) == (0.05, 2.0, 8)


@pytest.mark.parametrize("name", sorted(PAPER_RUNS))
def test_moving_haar_variant_keeps_the_run_and_swaps_the_scheduler(name):
    base, variant = _compose(f"+experiment={name}"), _compose(f"+experiment={name}_mh")
    assert variant.scheduler.detector == "moving_haar"
    assert (variant.scheduler.threshold, variant.scheduler.decay, variant.scheduler.restart_after) == (0.06, 2.0, 3)
    assert variant.scheduler.patience is None  # 2·window, the authors' rule
    if name == "r100_ms1mv3":
        assert variant.scheduler.window == 4000  # the authors' MS1MV3 setting
    assert variant.model == base.model and variant.data == base.data and variant.trainer == base.trainer


@pytest.mark.parametrize("name", sorted(PAPER_RUNS) + [f"{n}_mh" for n in sorted(PAPER_RUNS)])
def test_experiment_scheduler_instantiates_a_callback(name):
    from fastface_pl.scheduling.callback import FastFaceLRCallback

    cfg = _compose(f"+experiment={name}")
    callback = instantiate(cfg.scheduler, _convert_="all")
    assert isinstance(callback, FastFaceLRCallback)


def test_experiment_model_instantiates_with_the_paper_backbone():
    """Build the ResNet-50 run's module for real, with a small class count to keep memory low."""
    cfg = _compose("+experiment=r50_webface12m", "model.num_classes=10")
    module = instantiate(cfg.model, _convert_="all")
    n_backbone = sum(p.numel() for p in module.backbone.parameters())
    assert 43.0e6 < n_backbone < 44.0e6  # IResNet-50: 43.59M


@pytest.mark.parametrize("name, expected", [
    ("polynomial", {"name": "polynomial", "power": 2.0, "warmup_fraction": 0.0}),
    ("step", {"name": "step", "milestones": [2, 3, 4], "gamma": 0.1}),
    ("constant", None),
])
def test_comparison_schedules(name, expected):
    cfg = _compose(f"scheduler={name}")
    assert instantiate(cfg.scheduler, _convert_="all") == expected


@pytest.mark.parametrize("name, mode", [("fastface_cooldown", "cooldown"), ("fastface_stop", "stop")])
def test_the_cooldown_and_stop_presets_build_their_mode(name, mode):
    from fastface_pl.scheduling.callback import FastFaceLRCallback

    cfg = _compose(f"scheduler={name}")
    callback = instantiate(cfg.scheduler, _convert_="all")
    assert isinstance(callback, FastFaceLRCallback) and callback._ending["mode"] == mode
    assert callback._ending["shape"] == "1-sqrt" and callback._ending["latest_start"] == 0.8
    assert (callback.horizon_epochs is not None) == (mode == "stop")


def test_demo_defaults_are_small():
    cfg = _compose()
    assert cfg.data.root == "synthetic" and cfg.model.backbone == "tiny"
    assert cfg.scheduler.detector == "fastface" and cfg.model.classifier == "full"


def test_configs_ship_inside_the_package():
    from importlib import resources

    conf = resources.files("fastface_pl.conf")
    assert conf.joinpath("train.yaml").is_file()
    assert {p.name for p in conf.joinpath("experiment").iterdir()} >= {f"{n}.yaml" for n in PAPER_RUNS}


@pytest.mark.parametrize("name", ["r50", "mbf"])
def test_smaller_models_differ_from_r100_only_in_the_backbone(name):
    r100, other = _compose("model=r100").model, _compose(f"model={name}").model
    assert other.backbone == name
    assert {key: value for key, value in other.items() if key != "backbone"} == {
        key: value for key, value in r100.items() if key != "backbone"}


def test_resolved_experiments_are_what_the_recipe_says():
    """The chain r100_ms1mv3 -> r100_webface4m -> 8m/12m -> r50_webface12m changes one thing at a time."""
    ms1m, wf4m, wf12m, r50 = (_compose(f"+experiment={n}") for n in
                              ("r100_ms1mv3", "r100_webface4m", "r100_webface12m", "r50_webface12m"))
    assert (ms1m.model.margin, wf4m.model.margin) == ("arcface", "cosface")
    assert wf12m.model == dict(wf4m.model, num_classes=617970)
    assert r50.model == dict(wf12m.model, backbone="r50") and r50.data == wf12m.data


def test_classifier_group_mirrors_the_layer_registry():
    """conf/classifier/ holds one file per layer of ``CLASSIFIERS``, whose settings are that layer's defaults."""
    from importlib.resources import files

    from fastface_pl.models.module import CLASSIFIERS

    names = {path.name.removesuffix(".yaml") for path in files("fastface_pl.conf").joinpath("classifier").iterdir()
             if path.name.endswith(".yaml")}
    assert names == set(CLASSIFIERS)
    for name, layer in CLASSIFIERS.items():
        cfg = _compose(f"classifier={name}")
        assert cfg.model.classifier == name
        assert cfg.model.classifier_kwargs == layer.SETTINGS, name


def test_paper_run_with_the_f2c_pool_composes_and_builds():
    cfg = _compose("+experiment=r100_webface12m", "classifier=dcp", "model.backbone=tiny",
                   "model.backbone_kwargs.input_size=32")
    assert cfg.model.classifier == "dcp"
    assert cfg.model.classifier_kwargs == {"pool_fraction": 0.01, "pool_size": None, "momentum": 0.99, "push_topk": None}
    assert cfg.data.identity_fraction is None
    module = instantiate(cfg.model, lr_schedule=None, _convert_="all")
    assert module.classifier.pool_size == 6180  # 1 % of 617,970 identities
    assert module.classifier.push_topk == 3
    assert module.needs_identity_pairs

