"""classifier="sharded" in Trainer.fit with DDP (ddp_spawn, 2 CPU ranks): checkpoints hold the whole layer, a resume
on the same ranks is exact, and one process (another world size) resumes from it with the same rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from fastface_pl.data.datamodule import FaceDataModule
from fastface_pl.models.module import FaceRecognitionModule
from fastface_pl.models.sharded import SHARDED_CHECKPOINT_KEY, shard_range

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
CLASSES = 13  # not divisible by 2
SYNTHETIC = {"num_identities": CLASSES, "images_per_identity": 4, "image_size": 16, "num_val_pairs": 20, "seed": 0}
STEPS_PER_EPOCH = (CLASSES * 4) // (4 * 2)  # batch 4 per rank, 2 ranks


class RankRows(Callback):
    """Each rank saves its rows, their momentum and the backbone at the end of training (and at its start)."""

    def __init__(self, out_dir: Path, tag: str) -> None:
        self.out_dir, self.tag = out_dir, tag

    def _save(self, trainer, pl_module, when: str) -> None:
        optimizer = trainer.optimizers[0]
        momentum = optimizer.state.get(pl_module.classifier.weight, {}).get("momentum_buffer")
        torch.save({"rows": pl_module.classifier.weight.detach().clone(),
                    "momentum": None if momentum is None else momentum.clone(),
                    "range": (pl_module.classifier.start, pl_module.classifier.end),
                    "steps": pl_module.classifier.steps,
                    "backbone": {k: v.clone() for k, v in pl_module.backbone.state_dict().items()}},
                   self.out_dir / f"{self.tag}-{when}-rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "start")

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "end")

    def on_fit_end(self, trainer, pl_module) -> None:  # after fit, as a user saving the trained model would
        trainer.save_checkpoint(self.out_dir / f"{self.tag}-after-fit.ckpt")


def fit(tmp_path: Path, tag: str, epochs: int, devices: int = 2, ckpt_path: Path | None = None,
        sample_rate: float = 0.5) -> Path:
    torch.manual_seed(0)
    datamodule = FaceDataModule("synthetic", batch_size=4, num_workers=0, seed=1, synthetic=SYNTHETIC)
    model = FaceRecognitionModule(
        num_classes=CLASSES, backbone="tiny", backbone_kwargs={"input_size": 16}, embedding_size=16,
        margin="cosface", margin_kwargs={"s": 16.0, "m": 0.2}, classifier="sharded",
        classifier_kwargs={"sample_rate": sample_rate}, lr=0.05,
    )
    folder = tmp_path / tag
    trainer = Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_epochs=epochs,
        callbacks=[RankRows(tmp_path, tag), ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, default_root_dir=folder,
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return folder


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


def test_checkpoints_hold_the_whole_layer_and_a_resume_on_the_same_ranks_is_exact(tmp_path):
    straight = fit(tmp_path, "straight", epochs=2)
    ranks = [load(tmp_path / f"straight-end-rank{r}.pt") for r in (0, 1)]
    assert [r["range"] for r in ranks] == [shard_range(CLASSES, 2, 0), shard_range(CLASSES, 2, 1)]
    checkpoint = load(straight / "epoch=1.ckpt")
    whole = checkpoint["state_dict"]["classifier.weight"]
    assert whole.shape == (CLASSES, 16) and checkpoint[SHARDED_CHECKPOINT_KEY]["world_size"] == 2
    torch.testing.assert_close(whole, torch.cat([r["rows"] for r in ranks]), rtol=0, atol=0)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    index = next(g for g in groups if g["name"] == "classifier")["params"][0]
    momentum = checkpoint["optimizer_states"][0]["state"][index]["momentum_buffer"]
    torch.testing.assert_close(momentum, torch.cat([r["momentum"] for r in ranks]), rtol=0, atol=0)
    assert ranks[0]["steps"] == 2 * STEPS_PER_EPOCH
    after = load(tmp_path / "straight-after-fit.ckpt")  # the layer and the optimizer are whole after fit
    torch.testing.assert_close(after["state_dict"]["classifier.weight"], whole, rtol=0, atol=0)
    torch.testing.assert_close(after["optimizer_states"][0]["state"][index]["momentum_buffer"], momentum, rtol=0,
                               atol=0)

    first = fit(tmp_path, "first", epochs=1)
    fit(tmp_path, "resumed", epochs=2, ckpt_path=first / "epoch=0.ckpt")
    for rank in (0, 1):
        want, got = ranks[rank], load(tmp_path / f"resumed-end-rank{rank}.pt")
        assert got["steps"] == want["steps"]  # the sampling generator continues where it was
        torch.testing.assert_close(got["rows"], want["rows"], rtol=0, atol=0)
        torch.testing.assert_close(got["momentum"], want["momentum"], rtol=0, atol=0)
        for key, value in want["backbone"].items():
            torch.testing.assert_close(got["backbone"][key], value, rtol=0, atol=0)

    # one process resumes from the 2-rank checkpoint: every row and its momentum, as saved
    fit(tmp_path, "single", epochs=3, devices=1, ckpt_path=straight / "epoch=1.ckpt")
    start = load(tmp_path / "single-start-rank0.pt")
    assert start["range"] == (0, CLASSES)
    torch.testing.assert_close(start["rows"], whole, rtol=0, atol=0)
    torch.testing.assert_close(start["momentum"], momentum, rtol=0, atol=0)
    exported = FaceRecognitionModule.load_from_checkpoint(straight / "epoch=1.ckpt", weights_only=True)  # as evaluate
    torch.testing.assert_close(exported.classifier.weight.detach(), whole, rtol=0, atol=0)


class Decisions(Callback):
    """Each rank saves the LRs after every optimizer step, the scheduler's decisions and the last loss."""

    def __init__(self, out_dir: Path, fastface) -> None:
        self.out_dir, self.fastface, self.lrs = out_dir, fastface, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])
        self.loss = float(outputs["loss"])

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"lrs": self.lrs, "decisions": self.fastface.decisions, "loss": self.loss,
                    "steps": trainer.global_step}, self.out_dir / f"stack-rank{trainer.global_rank}.pt")


def test_fastface_the_guard_bf16_and_accumulation_work_with_the_sharded_layer(tmp_path):
    """One LR decision for all ranks (the loss is the same global loss on every rank), bf16 autocast and two
    micro-batches per optimizer step."""
    from fastface_pl.safety import DivergenceGuard
    from fastface_pl.scheduling.callback import FastFaceLRCallback

    torch.manual_seed(0)
    datamodule = FaceDataModule("synthetic", batch_size=4, num_workers=0, seed=1, synthetic=SYNTHETIC)
    model = FaceRecognitionModule(
        num_classes=CLASSES, backbone="tiny", backbone_kwargs={"input_size": 16}, embedding_size=16,
        margin="arcface", margin_kwargs={"s": 16.0, "m": 0.3}, classifier="sharded", lr=0.05,
    )
    fastface = FastFaceLRCallback("fastface", detector_kwargs={"alpha": 0.5, "beta": 0.5, "threshold": 10.0,
                                                               "patience": 2}, sync_every_n_steps=2, verbose=False)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=3, precision="bf16-mixed",
        accumulate_grad_batches=2, callbacks=[fastface, DivergenceGuard(check_every_n_steps=2),
                                              Decisions(tmp_path, fastface)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=datamodule)
    ranks = [load(tmp_path / f"stack-rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 3 * (STEPS_PER_EPOCH // 2)
    assert ranks[0]["lrs"] == ranks[1]["lrs"] and ranks[0]["decisions"] == ranks[1]["decisions"]
    assert len(ranks[0]["decisions"]) >= 1 and ranks[0]["lrs"][-1][0] < 0.05
    assert ranks[0]["loss"] == ranks[1]["loss"] and torch.isfinite(torch.tensor(ranks[0]["loss"]))
    assert model.classifier.weight.shape == (CLASSES, 16)  # whole again in the launching process


class Overflow(Callback):
    """Makes rank 1's own rows overflow at one step (before the scaler unscales) and records each rank's scale."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.scales = out_dir, []

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_rank == 1 and trainer.global_step == 2:
            pl_module.classifier.weight.grad[0, 0] = float("inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.scales.append(float(trainer.precision_plugin.scaler.get_scale()))

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"scales": self.scales, "backbone": {k: v.clone() for k, v in pl_module.backbone.state_dict().items()}},
                   self.out_dir / f"overflow-rank{trainer.global_rank}.pt")


def test_under_fp16_an_overflow_on_one_rank_makes_every_rank_skip_the_step(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    torch.manual_seed(0)
    datamodule = FaceDataModule("synthetic", batch_size=4, num_workers=0, seed=1, synthetic=SYNTHETIC)
    model = FaceRecognitionModule(
        num_classes=CLASSES, backbone="tiny", backbone_kwargs={"input_size": 16}, embedding_size=16,
        margin="cosface", margin_kwargs={"s": 16.0, "m": 0.2}, classifier="sharded", lr=0.05,
    )
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=5,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))],
        callbacks=[Overflow(tmp_path)], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=datamodule)
    ranks = [load(tmp_path / f"overflow-rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["scales"] == ranks[1]["scales"]
    assert min(ranks[0]["scales"]) < 1024.0  # the overflow was seen, by both
    for key, value in ranks[0]["backbone"].items():
        if "running_" not in key and "num_batches_tracked" not in key:
            torch.testing.assert_close(ranks[1]["backbone"][key], value, rtol=0, atol=0)
