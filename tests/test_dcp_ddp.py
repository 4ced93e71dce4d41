"""classifier="dcp" under DDP (ddp_spawn, 2 CPU ranks): every rank writes the gallery features of all ranks into
its pool, so pools, LRU tables, gallery and probe networks stay identical without broadcasting the pool."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from fastface_pl.data.datamodule import FaceDataModule
from fastface_pl.models.module import FaceRecognitionModule

SYNTHETIC = {"num_identities": 16, "images_per_identity": 4, "image_size": 16, "num_val_pairs": 20, "seed": 0}


class RankState(Callback):
    """Saves, per rank, the final state_dict and the labels of the last batch's view A (gallery of pass 2)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.last_view_a: torch.Tensor | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last_view_a = batch[1][0::2].clone()

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state": state, "view_a": self.last_view_a.cpu()},
                   Path(self.out_dir, f"rank{trainer.global_rank}.pt"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_dcp_ranks_keep_identical_pools_with_all_gallery_features(tmp_path):
    datamodule = FaceDataModule("synthetic", batch_size=8, num_workers=0, seed=1, synthetic=SYNTHETIC)
    model = FaceRecognitionModule(
        num_classes=SYNTHETIC["num_identities"], backbone="tiny", backbone_kwargs={"input_size": 16},
        embedding_size=16, margin="cosface", margin_kwargs={"s": 16.0, "m": 0.2}, classifier="dcp", lr=0.05,
        classifier_kwargs={"momentum": 0.9},
    )
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, callbacks=[RankState(str(tmp_path))],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=datamodule)

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    states = [rank["state"] for rank in ranks]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        if "running_" in key or "num_batches_tracked" in key:
            continue  # BatchNorm statistics are rank-local between DDP's buffer broadcasts (at each forward)
        assert torch.equal(states[0][key], states[1][key]), key
    state = states[0]
    steps = 2 * (64 // (8 * 2))
    assert state["classifier.clock"].item() == steps
    assert state["classifier.features"].shape[1] == 8  # raised to one step's gallery view: 2 ranks x 4 images
    # The committed pass wrote view A of both ranks: the last batch's identities of rank 0 and rank 1 are present.
    entries = state["classifier.identity_entry"]
    for rank in ranks:
        assert (entries[rank["view_a"]] >= 0).all()
    assert not torch.equal(ranks[0]["view_a"], ranks[1]["view_a"])
    # The gallery is an EMA, not a copy, of the probe.
    prefix = "classifier.gallery_backbone."
    gallery = [v for k, v in state.items() if k.startswith(prefix) and v.is_floating_point()]
    probe = [state["backbone." + k[len(prefix):]] for k in state
             if k.startswith(prefix) and state[k].is_floating_point()]
    assert any(not torch.equal(g, p) for g, p in zip(gallery, probe))
