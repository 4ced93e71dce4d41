"""The whole stack under DDP on CPU: FaceDataModule (synthetic) + FaceRecognitionModule + FastFaceLRCallback.

Two ``ddp_spawn`` processes train a tiny IResNet for 2 epochs with validation. Each rank writes what it saw
(LRs, callback decisions, training samples, final weights) to ``tmp_path``; the test then checks that the
ranks agree where they must (LR, decisions, weights) and differ where they must (their training shards).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from fastface_pl.data.datamodule import FaceDataModule
from fastface_pl.models.module import FaceRecognitionModule
from fastface_pl.scheduling.callback import FastFaceLRCallback

LR0 = 0.05
BATCH = 8
SYNTHETIC = {"num_identities": 8, "images_per_identity": 8, "image_size": 16, "num_val_pairs": 40, "seed": 0}
# Threshold far above any signal: every step is stationary, so the detector decides after patience + 1 steps.
DETECTOR = {"alpha": 0.5, "beta": 0.5, "threshold": 10.0, "patience": 2}


def fingerprint(image: torch.Tensor) -> float:
    """A flip-invariant fingerprint of one image (its pixel sum), to recognise samples across ranks."""
    return round(float(image.double().sum()), 3)


class RankRecorder(Callback):
    """Writes, per rank, the LRs after each optimizer step, the callback's decisions, the sampler's order and
    fingerprints of the training images of every epoch, the logged metrics and the final weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.lrs: list[list[float]] = []
        self.seen: dict[int, list[float]] = {}
        self.sampler_indices: dict[int, list[int]] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sampler = trainer.train_dataloader.sampler
        items = list(iter(sampler))
        self.sampler_indices[trainer.current_epoch] = [i[0] if isinstance(i, tuple) else i for i in items]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        images, _ = batch
        self.seen.setdefault(trainer.current_epoch, []).extend(fingerprint(image) for image in images)
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    def on_train_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        fastface = next(c for c in trainer.callbacks if isinstance(c, FastFaceLRCallback))
        dataset = trainer.datamodule.train_dataset
        record = {
            "lrs": self.lrs,
            "final_lrs": [group["lr"] for group in trainer.optimizers[0].param_groups],
            "decisions": fastface.decisions,
            "fed": fastface.detector.steps_seen,
            "seen": {str(k): v for k, v in self.seen.items()},
            "sampler": {str(k): v for k, v in self.sampler_indices.items()},
            "expected": {str(k): [fingerprint(dataset[i][0]) for i in v] for k, v in self.sampler_indices.items()},
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        }
        Path(self.out_dir, f"rank{rank}.json").write_text(json.dumps(record))
        torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()},
                   Path(self.out_dir, f"weights{rank}.pt"))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_whole_stack_ddp_spawn_two_cpu_ranks_agree(tmp_path):
    datamodule = FaceDataModule("synthetic", batch_size=BATCH, num_workers=0, synthetic=SYNTHETIC)
    model = FaceRecognitionModule(
        num_classes=SYNTHETIC["num_identities"], backbone="tiny", backbone_kwargs={"input_size": 16},
        embedding_size=16, margin="arcface", margin_kwargs={"s": 16.0, "m": 0.3}, lr=LR0,
    )
    fastface = FastFaceLRCallback("fastface", detector_kwargs=DETECTOR, sync_every_n_steps=2, verbose=False)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, callbacks=[fastface, RankRecorder(str(tmp_path))],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=datamodule)

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    images = SYNTHETIC["num_identities"] * SYNTHETIC["images_per_identity"]
    steps_per_epoch = images // 2 // BATCH
    steps = 2 * steps_per_epoch

    # Identical LR in every param group after every step, and identical decisions, fed every optimizer step.
    assert ranks[0]["lrs"] == ranks[1]["lrs"] and len(ranks[0]["lrs"]) == steps
    assert ranks[0]["final_lrs"] == ranks[1]["final_lrs"]
    assert len(ranks[0]["final_lrs"]) == 2  # backbone and classifier groups
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert ranks[0]["fed"] == ranks[1]["fed"] == steps
    assert len(ranks[0]["decisions"]) >= 2  # the detector decided within the run
    scale = 1.0
    for _, factor, _ in ranks[0]["decisions"]:
        scale *= factor
    assert ranks[0]["final_lrs"] == pytest.approx([LR0 * scale] * 2)
    assert scale < 1.0

    # Validation ran on both ranks and was logged (the metric is synced across ranks: same value).
    for rank in ranks:
        assert rank["metrics"]["val/accuracy"] == rank["metrics"]["val/synthetic/accuracy"]  # one set: its mean
    assert ranks[0]["metrics"]["val/synthetic/accuracy"] == ranks[1]["metrics"]["val/synthetic/accuracy"]
    assert "val/synthetic/accuracy" in trainer.callback_metrics  # returned to the main process

    # Disjoint training shards per epoch, covering the data; what was trained on is what the sampler gave.
    for epoch in ("0", "1"):
        shard0, shard1 = (set(rank["sampler"][epoch]) for rank in ranks)
        assert len(shard0) == len(shard1) == images // 2
        assert not shard0 & shard1
        assert shard0 | shard1 == set(range(images))
        for rank in ranks:
            assert rank["seen"][epoch] == rank["expected"][epoch]
        assert not set(ranks[0]["seen"][epoch]) & set(ranks[1]["seen"][epoch])
    assert ranks[0]["sampler"]["0"] != ranks[0]["sampler"]["1"]  # reshuffled each epoch

    # DDP kept the replicas in sync: identical weights (and BN buffers) at the end.
    weights = [torch.load(tmp_path / f"weights{r}.pt") for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key

    # Validation under DDP follows the protocol exactly: contiguous shards gathered in rank order give the
    # same 10-fold accuracy as evaluating all pairs, in file order, in one process with the final weights.
    from fastface_pl.evaluation.verification import evaluate_pairs

    single = FaceRecognitionModule(
        num_classes=SYNTHETIC["num_identities"], backbone="tiny", backbone_kwargs={"input_size": 16},
        embedding_size=16, margin="arcface", margin_kwargs={"s": 16.0, "m": 0.3}, lr=LR0,
    )
    single.load_state_dict(weights[0])
    single.eval()
    datamodule.setup("validate")
    pairs = datamodule.val_datasets[0]
    with torch.no_grad():
        a = torch.stack([pairs[i][0] for i in range(len(pairs))])
        b = torch.stack([pairs[i][1] for i in range(len(pairs))])
        issame = torch.tensor([bool(pairs[i][2]) for i in range(len(pairs))])
        expected = evaluate_pairs(single.embed_with_flip(a), single.embed_with_flip(b), issame)
    assert ranks[0]["metrics"]["val/synthetic/accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    assert ranks[0]["metrics"]["val/synthetic/accuracy_std"] == pytest.approx(expected["accuracy_std"], abs=1e-6)
    # the mean best threshold over folds depends on which pairs form each fold: a reordering changes it
    assert ranks[0]["metrics"]["val/synthetic/threshold"] == pytest.approx(expected["threshold"], abs=1e-6)
