"""FaceRecognitionModule under Trainer.fit on CPU: learning, precision, clipping, groups, validation, checkpoints."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastface_pl.evaluation.verification import evaluate_pairs
from fastface_pl.models.backbones import build_backbone
from fastface_pl.models.module import FaceRecognitionModule
from fastface_pl.models.optim import RowSparseSGD

NUM_CLASSES = 8
SIZE = 32
EMB = 32


def identity_images(num_per_class: int, seed: int = 0, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable data: each class is a fixed random image plus small noise."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(NUM_CLASSES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1234))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(num_per_class)
    images = prototypes[labels] + noise * torch.randn(labels.numel(), 3, SIZE, SIZE, generator=generator)
    return images.clamp(-1, 1), labels


def train_loader(num_per_class: int = 8, batch_size: int = 16) -> DataLoader:
    images, labels = identity_images(num_per_class)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(0))


def pair_loader(num_pairs: int = 20, seed: int = 5) -> DataLoader:
    images, labels = identity_images(4, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(0, images.shape[0], (num_pairs,), generator=generator)
    second = torch.randint(0, images.shape[0], (num_pairs,), generator=generator)
    issame = labels[first] == labels[second]
    return DataLoader(TensorDataset(images[first], images[second], issame), batch_size=8)


def make_module(**kwargs) -> FaceRecognitionModule:
    defaults = dict(num_classes=NUM_CLASSES, backbone="tiny", backbone_kwargs={"input_size": SIZE},
                    embedding_size=EMB, margin="cosface", margin_kwargs={"s": 16.0, "m": 0.2}, lr=0.05)
    defaults.update(kwargs)
    return FaceRecognitionModule(**defaults)


def make_trainer(max_steps: int, tmp_path=None, **kwargs) -> pl.Trainer:
    defaults = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    limit_val_batches=0, default_root_dir=tmp_path)
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())


def test_fit_loss_decreases_on_learnable_data(tmp_path):
    torch.manual_seed(0)
    recorder = LossRecorder()
    trainer = make_trainer(24, tmp_path, callbacks=[recorder])
    trainer.fit(make_module(), train_dataloaders=train_loader())
    losses = [float(loss) for loss in recorder.losses]
    assert len(losses) == 24
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses


def test_bf16_mixed_loss_is_fp32_and_finite(tmp_path):
    torch.manual_seed(0)
    recorder = LossRecorder()
    module = make_module()
    trainer = make_trainer(3, tmp_path, precision="bf16-mixed", callbacks=[recorder])
    trainer.fit(module, train_dataloaders=train_loader())
    assert len(recorder.losses) == 3
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in recorder.losses)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = module(torch.randn(2, 3, SIZE, SIZE))
        assert embeddings.dtype == torch.float32  # the IResNet head runs in fp32, as arcface_torch's
        loss = module.classifier(embeddings, torch.tensor([0, 1]))
    assert loss.dtype == torch.float32


def test_two_param_groups_and_frozen_bn_weight():
    module = make_module()
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert [group["name"] for group in optimizer.param_groups] == ["backbone", "classifier"]
    for group in optimizer.param_groups:
        assert group["lr"] == 0.05 and group["momentum"] == 0.9 and group["weight_decay"] == 5e-4
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len({id(p) for p in grouped})
    frozen = module.backbone.features.weight
    assert not frozen.requires_grad and all(p is not frozen for p in grouped)
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert {id(p) for p in grouped} == trainable
    assert optimizer.param_groups[1]["params"] == [module.classifier.weight]
    assert FaceRecognitionModule(num_classes=4, backbone="tiny").hparams.lr == 0.02


class ClipProbe(FaceRecognitionModule):
    """Records gradient norms right after the module's clipping hook."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.backbone_norm_before = torch.nn.utils.get_total_norm(
            [p.grad for p in self.backbone.parameters() if p.grad is not None])
        self.classifier_norm_before = self.classifier.weight.grad.norm()
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.backbone_norm_after = torch.nn.utils.get_total_norm(
            [p.grad for p in self.backbone.parameters() if p.grad is not None])
        self.classifier_norm_after = self.classifier.weight.grad.norm()


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_clipping_applies_to_backbone_only(tmp_path, precision):
    torch.manual_seed(0)
    clip = 1e-3
    module = ClipProbe(num_classes=NUM_CLASSES, backbone="tiny", backbone_kwargs={"input_size": SIZE},
                       embedding_size=EMB, clip_grad_norm=clip)
    make_trainer(1, tmp_path, precision=precision).fit(module, train_dataloaders=train_loader())
    assert module.backbone_norm_before > 10 * clip
    assert module.backbone_norm_after == pytest.approx(clip, rel=1e-3)
    assert module.classifier_norm_before > 10 * clip
    assert torch.equal(module.classifier_norm_after, module.classifier_norm_before)


def test_no_clipping_when_disabled(tmp_path):
    torch.manual_seed(0)
    module = ClipProbe(num_classes=NUM_CLASSES, backbone="tiny", backbone_kwargs={"input_size": SIZE},
                       embedding_size=EMB, clip_grad_norm=None)
    make_trainer(1, tmp_path).fit(module, train_dataloaders=train_loader())
    assert torch.equal(module.backbone_norm_after, module.backbone_norm_before)


def test_works_with_fastface_callback(tmp_path):
    from fastface_pl.scheduling.callback import FastFaceLRCallback

    torch.manual_seed(0)
    callback = FastFaceLRCallback("fastface", patience=0, detector_kwargs={"threshold": 1e9},
                                    verbose=False, log_signals=False)
    module = make_module()
    trainer = make_trainer(6, tmp_path, callbacks=[callback])
    trainer.fit(module, train_dataloaders=train_loader())
    assert callback.steps_observed == 6
    assert callback.decisions, "a huge threshold makes every step stationary: the LR must have been decayed"
    lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]
    assert lrs[0] == lrs[1] == pytest.approx(0.05 * callback.lr_scale)
    assert lrs[0] < 0.05


def test_validation_logs_per_set_and_matches_protocol(tmp_path):
    torch.manual_seed(0)
    module = make_module(val_set_names=["lfw", "agedb_30"])
    trainer = make_trainer(1, tmp_path, limit_val_batches=None)
    loaders = [pair_loader(20, seed=5), pair_loader(30, seed=6)]
    trainer.validate(module, dataloaders=loaders, verbose=False)
    results = {key: float(value) for key, value in trainer.callback_metrics.items()}
    for name in ("lfw", "agedb_30"):
        for key in ("accuracy", "accuracy_std", "threshold", "val_at_far", "val_at_far_std", "far", "xnorm"):
            assert f"val/{name}/{key}" in results
    module.eval()
    for name, loader in zip(("lfw", "agedb_30"), loaders):
        images_a, images_b, issame = loader.dataset.tensors
        with torch.no_grad():
            expected = evaluate_pairs(module.embed_views(images_a), module.embed_views(images_b), issame)
        assert results[f"val/{name}/accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
        assert results[f"val/{name}/xnorm"] == pytest.approx(expected["xnorm"], rel=1e-5)
    mean = (results["val/lfw/accuracy"] + results["val/agedb_30/accuracy"]) / 2
    assert results["val/accuracy"] == pytest.approx(mean, abs=1e-6)


def test_validation_default_names_and_fit_with_val(tmp_path):
    torch.manual_seed(0)
    module = make_module()
    trainer = make_trainer(2, tmp_path, limit_val_batches=None, val_check_interval=2)
    trainer.fit(module, train_dataloaders=train_loader(), val_dataloaders=[pair_loader(), pair_loader(seed=7)])
    assert "val/set0/accuracy" in trainer.callback_metrics and "val/set1/accuracy" in trainer.callback_metrics
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert metrics["val/accuracy"] == pytest.approx((metrics["val/set0/accuracy"] + metrics["val/set1/accuracy"]) / 2)


def test_embed_is_normalised():
    module = make_module().eval()
    embeddings = module.embed(torch.randn(3, 3, SIZE, SIZE))
    assert embeddings.shape == (3, EMB)
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(3))


def test_checkpoint_round_trip_gives_identical_embeddings(tmp_path):
    torch.manual_seed(0)
    module = make_module(margin="arcface", margin_kwargs=None)
    trainer = make_trainer(3, tmp_path)
    trainer.fit(module, train_dataloaders=train_loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = FaceRecognitionModule.load_from_checkpoint(path, map_location="cpu")
    assert restored.hparams.margin == "arcface" and restored.hparams.num_classes == NUM_CLASSES
    images = torch.randn(4, 3, SIZE, SIZE)
    module.eval(), restored.eval()
    torch.testing.assert_close(restored.embed(images), module.embed(images), rtol=0, atol=0)


def test_module_backbone_needs_passing_again(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("tiny", embedding_size=16, input_size=SIZE)
    module = FaceRecognitionModule(num_classes=NUM_CLASSES, backbone=backbone, embedding_size=16)
    assert "backbone" not in module.hparams
    trainer = make_trainer(2, tmp_path)
    trainer.fit(module, train_dataloaders=train_loader())
    path = tmp_path / "custom.ckpt"
    trainer.save_checkpoint(path)
    fresh = build_backbone("tiny", embedding_size=16, input_size=SIZE)
    restored = FaceRecognitionModule.load_from_checkpoint(path, backbone=fresh, map_location="cpu")
    images = torch.randn(2, 3, SIZE, SIZE)
    module.eval(), restored.eval()
    torch.testing.assert_close(restored.embed(images), module.embed(images), rtol=0, atol=0)


def test_sampled_classifier_module_uses_row_sparse_sgd(tmp_path):
    torch.manual_seed(0)
    module = make_module(num_classes=64, classifier="sampled", classifier_kwargs={"sample_rate": 0.25})
    images, labels = identity_images(4)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)  # labels < 8 of 64 classes
    before = module.classifier.weight.detach().clone()
    trainer = make_trainer(2, tmp_path)
    trainer.fit(module, train_dataloaders=loader)
    assert isinstance(trainer.optimizers[0], RowSparseSGD)
    changed = (module.classifier.weight.detach() != before).any(dim=1)
    assert changed[:8].sum() > 0
    assert 0 < int(changed.sum()) <= 2 * 16  # at most two steps of 16 sampled rows


def test_channels_last_runs(tmp_path):
    torch.manual_seed(0)
    module = make_module(channels_last=True)
    make_trainer(1, tmp_path).fit(module, train_dataloaders=train_loader())
    assert module.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_wrong_embedding_size_is_explained():
    module = FaceRecognitionModule(num_classes=4, backbone=nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8)),
                                   embedding_size=16)
    with pytest.raises(ValueError, match="embedding_size"):
        module.training_step((torch.randn(2, 3, 16, 16), torch.tensor([0, 1])), 0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=4, classifier="partial"), "classifier"),
        (dict(num_classes=4, margin="sphereface"), "sphereface"),
        (dict(num_classes=4, backbone="r1000"), "r1000"),
        (dict(num_classes=4, lr=0.0), "lr"),
        (dict(num_classes=4, momentum=1.5), "momentum"),
        (dict(num_classes=4, classifier_kwargs={"sample_rate": 0.0}, classifier="sampled"), "sample_rate"),
        (dict(num_classes=4, classifier_kwargs={"pool_size": 8}), "do not apply to classifier='full'"),
        (dict(num_classes=4, clip_grad_norm=-1.0), "clip_grad_norm"),
    ],
)
def test_invalid_arguments(kwargs, match):
    kwargs.setdefault("backbone", "tiny")
    with pytest.raises(ValueError, match=match):
        FaceRecognitionModule(**kwargs)


def test_compile_keeps_state_dict_keys():
    eager = make_module()
    compiled = make_module(compile=True)  # torch.compile is lazy: nothing is compiled until a forward
    assert isinstance(compiled._compiled_backbone, torch._dynamo.eval_frame.OptimizedModule)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert all(not name.startswith("_compiled") for name, _ in compiled.named_modules())


def test_fp16_grad_scaler_unscales_before_backbone_clipping(tmp_path):
    # Lightning maps precision="16-mixed" to bf16 on CPU; pass its fp16 plugin with a CPU GradScaler to check
    # that the clipping hook sees unscaled gradients (clipping scaled ones would clip 256 times too hard).
    from lightning.pytorch.plugins import MixedPrecision

    norms = {}
    for name, plugins in (("fp32", []), ("fp16", [MixedPrecision("16-mixed", "cpu",
                                                                 scaler=torch.amp.GradScaler("cpu", init_scale=256.0))])):
        torch.manual_seed(0)
        module = ClipProbe(num_classes=NUM_CLASSES, backbone="tiny", backbone_kwargs={"input_size": SIZE},
                           embedding_size=EMB, clip_grad_norm=1e-3)
        make_trainer(1, tmp_path, plugins=plugins).fit(module, train_dataloaders=train_loader())
        norms[name] = float(module.backbone_norm_before)
        assert float(module.backbone_norm_after) == pytest.approx(1e-3, rel=1e-3)
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=0.02)


def test_polynomial_lr_schedule_follows_arcface_torch(tmp_path):
    torch.manual_seed(0)
    module = make_module(lr_schedule={"name": "polynomial", "power": 2.0, "warmup_fraction": 0.25})
    lrs = []

    class LrRecorder(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    make_trainer(8, tmp_path, callbacks=[LrRecorder()]).fit(module, train_dataloaders=train_loader(32, 16))
    # T = 8 steps, W = 2 warm-up steps: factor t/2 for t < 2, then (1 − (t − 2)/6)²
    expected = [0.0, 0.5] + [(1 - (t - 2) / 6) ** 2 for t in range(2, 8)]
    assert [a for a, b in lrs] == pytest.approx([0.05 * f for f in expected])
    assert all(a == b for a, b in lrs)


def test_step_lr_schedule_per_epoch(tmp_path):
    torch.manual_seed(0)
    module = make_module(lr_schedule={"name": "step", "milestones": [1, 2], "gamma": 0.1})
    trainer = make_trainer(-1, tmp_path, max_epochs=3)
    lrs = []

    class LrRecorder(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer.callbacks.append(LrRecorder())
    trainer.fit(module, train_dataloaders=train_loader())
    assert lrs == pytest.approx([0.05, 0.005, 0.0005])


@pytest.mark.parametrize("schedule, match", [
    ({"name": "cosine"}, "lr_schedule"),
    ({"name": "polynomial", "power": 0}, "power"),
    ({"name": "polynomial", "power": 1.0, "warmup_fraction": 1.0}, "warmup_fraction"),
    ({"name": "step", "milestones": [], "gamma": 0.1}, "milestones"),
    ({"name": "step", "milestones": [2], "gamma": 1.5}, "gamma"),
])
def test_invalid_lr_schedule(schedule, match):
    with pytest.raises(ValueError, match=match):
        make_module(lr_schedule=schedule)


def test_sanity_check_with_fewer_pairs_than_folds_does_not_fail(tmp_path):
    # 2 sanity batches of 2 pairs = 4 pairs < 10 folds: skipped in the sanity check, reported after training.
    torch.manual_seed(0)
    module = make_module(val_set_names=["lfw"])
    small = DataLoader(pair_loader(20).dataset, batch_size=2)
    trainer = make_trainer(2, tmp_path, limit_val_batches=None, num_sanity_val_steps=2, val_check_interval=2)
    trainer.fit(module, train_dataloaders=train_loader(), val_dataloaders=small)
    images_a, images_b, issame = small.dataset.tensors
    module.eval()
    with torch.no_grad():  # after training: the 20 pairs through the protocol directly
        expected = evaluate_pairs(module.embed_with_flip(images_a), module.embed_with_flip(images_b), issame)
    assert float(trainer.callback_metrics["val/lfw/accuracy"]) == pytest.approx(expected["accuracy"], abs=1e-6)
