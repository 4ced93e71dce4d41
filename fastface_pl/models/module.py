"""FaceRecognitionModule: backbone + margin softmax layer, trained as in the FastFace paper.

The paper's recipe (docs/paper_runs.md): SGD lr 0.02, momentum 0.9, weight decay 5e-4, batch 128, fp16 mixed
precision, gradient-norm clipping at 5 on the backbone only, embedding 512, s = 64, full classification
layer; the LR schedule comes from :class:`fastface_pl.scheduling.callback.FastFaceLRCallback`, which reads
the loss that ``training_step`` returns.

Example::

    import lightning.pytorch as pl
    from fastface_pl import FaceRecognitionModule, FastFaceLRCallback

    model = FaceRecognitionModule(num_classes=93_431, backbone="r100", margin="arcface")
    trainer = pl.Trainer(precision="16-mixed", max_epochs=5, callbacks=[FastFaceLRCallback()])
    trainer.fit(model, datamodule=datamodule)

.. note:: when ``backbone`` is an ``nn.Module`` it is not stored in the hyper-parameters (only its weights
   are in the checkpoint): pass it again, ``FaceRecognitionModule.load_from_checkpoint(path, backbone=net)``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from fastface_pl.evaluation.verification import VerificationMetric
from fastface_pl.models.backbones import build_backbone
from fastface_pl.models.classifiers import CLASSIFIERS, FullClassifier, SampledClassifier
from fastface_pl.models.dcp import DynamicClassPool, default_pool_size
from fastface_pl.models.margins import build_margin
from fastface_pl.models.optim import RowSparseSGD
from fastface_pl.models.sharded import ShardedClassifier, gather_rows, slice_rows
from fastface_pl.validation import check_choice, check_int, check_real

__all__ = ["FaceRecognitionModule"]

CLASSIFIER_NAMES = (*CLASSIFIERS, "dcp", "sharded")
# each classification layer's settings (``classifier_kwargs``, conf/classifier/*.yaml) and their defaults
CLASSIFIER_SETTINGS: dict[str, dict[str, Any]] = {
    "full": {},
    "sampled": {"sample_rate": 0.1},
    "dcp": {"pool_fraction": 0.01, "pool_size": None, "momentum": 0.99, "push_topk": None},
    "sharded": {"sample_rate": 1.0},
}
SHARDED_CHECKPOINT_KEY = "sharded_classifier"  # {"world_size", "num_classes"} of the run that saved it
_VAL_KEYS = ("accuracy", "accuracy_std", "threshold", "val_at_far", "val_at_far_std", "far", "xnorm")
LR_SCHEDULES = ("polynomial", "step")


class PolynomialFactor:
    """LR factor of arcface_torch's PolyScheduler at optimizer step t (T steps in all, W of warm-up).

    ``t / W`` during the linear warm-up, then ``(1 − (t − W) / (T − W))^power``. A callable object (not a
    lambda), so ``LambdaLR.state_dict()`` keeps it in checkpoints.
    """

    def __init__(self, total_steps: int, warmup_steps: int, power: float) -> None:
        self.total_steps, self.warmup_steps, self.power = int(total_steps), int(warmup_steps), float(power)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return max(0.0, 1.0 - progress) ** self.power


def check_lr_schedule(schedule: dict[str, Any] | None) -> dict[str, Any] | None:
    """``lr_schedule`` in its plain form (see :func:`fastface_pl.scheduling.presets.torch_schedule`), else ValueError."""
    if schedule is None:
        return None
    if not isinstance(schedule, Mapping) or schedule.get("name") not in LR_SCHEDULES:
        raise ValueError(
            f"lr_schedule must be None (constant LR, or a FastFaceLRCallback) or a dict with name in "
            f"{', '.join(LR_SCHEDULES)}, got {schedule!r}"
        )
    if schedule["name"] == "polynomial":
        return {"name": "polynomial",
                "power": check_real("lr_schedule power", schedule.get("power", 2.0), 0.0),
                "warmup_fraction": check_real("lr_schedule warmup_fraction", schedule.get("warmup_fraction", 0.0),
                                              0.0, 1.0, low_open=False, high_open=True)}
    milestones = schedule.get("milestones")
    if not isinstance(milestones, Sequence) or not milestones:
        raise ValueError(f"lr_schedule milestones must be a non-empty list of epochs >= 1, got {milestones!r}")
    return {"name": "step", "milestones": sorted(check_int("lr_schedule milestone", m, 1) for m in milestones),
            "gamma": check_real("lr_schedule gamma", schedule.get("gamma"), 0.0, 1.0, high_open=True)}


def _check_classifier(classifier: Any, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The classification layer's settings, defaults filled in; ValueError for an unknown name, key or value."""
    check_choice("classifier", classifier, CLASSIFIER_NAMES)
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ValueError(f"classifier_kwargs must be a dict or None, got {kwargs!r}")
    settings = CLASSIFIER_SETTINGS[classifier]
    unknown = sorted(set(kwargs or {}) - set(settings))
    if unknown:
        raise ValueError(f"classifier_kwargs {unknown} do not apply to classifier={classifier!r}; it takes "
                         f"{', '.join(settings) or 'none'} (conf/classifier/{classifier}.yaml)")
    settings = {**settings, **(kwargs or {})}
    if classifier in ("sampled", "sharded"):
        check_real("sample_rate", settings["sample_rate"], 0.0, 1.0)
    if classifier == "dcp":
        check_real("pool_fraction", settings["pool_fraction"], 0.0, 1.0)
        check_real("momentum", settings["momentum"], 0.0, 1.0, low_open=False)
        check_int("pool_size", settings["pool_size"], 1, allow_none=True, none_means="from pool_fraction")
        check_int("push_topk", settings["push_topk"], 1, allow_none=True, none_means="0.02 % of the pool")
    return settings


class FaceRecognitionModule(pl.LightningModule):
    """A face-recognition model (backbone + margin-softmax classification layer) for ``Trainer.fit``.

    Args:
        num_classes: number of identities C.
        backbone: a name for :func:`~fastface_pl.models.backbones.build_backbone` (``r100`` …, ``tiny``) or any
            ``nn.Module`` mapping ``float[B, 3, H, W]`` to ``float[B, embedding_size]``.
        backbone_kwargs: extra arguments of ``build_backbone`` (e.g. ``{"input_size": 32}``).
        embedding_size: embedding dimension D (512).
        margin: ``arcface`` (straight-through, the paper's), ``arcface_exact``, ``cosface`` or ``combined``.
        margin_kwargs: arguments of the margin head (``s=64``, ``m=0.5`` / ``m=0.4``, ``m1, m2, m3``).
        classifier: ``full`` (all identities, the paper's), ``sampled`` (Partial-FC-style), ``sharded`` (the full
            or sampled layer split across DDP ranks, ``docs/sharded.md``) or ``dcp`` (F2C's
            Dynamic Class Pool with a gallery network, ``docs/f2c.md``; needs batches of identity pairs, which
            :class:`~fastface_pl.data.datamodule.FaceDataModule` lays out by itself for it).
        classifier_kwargs: the layer's settings (``conf/classifier/*.yaml``). ``sampled``: ``sample_rate``, the
            fraction of classes per step (0.1). ``sharded``: ``sample_rate`` (1.0: every class).
            ``dcp``: ``pool_fraction``, pool entries as a fraction of
            ``num_classes`` (1 %); ``pool_size``, pool entries (overrides the fraction; never fewer than the
            images of one step's gallery view over all ranks: a smaller pool is enlarged at ``setup``, a given
            size raises); ``momentum``, EMA momentum of the gallery network (0.99); ``push_topk``, k of the
            push-away loss (default 0.02 % of the pool, in [3, 10]).
        lr: learning rate η (0.02), the same for both parameter groups.
        momentum: SGD momentum (0.9).
        weight_decay: L2 weight decay λ (5e-4).
        clip_grad_norm: max gradient norm of the backbone (5.0); ``None`` disables clipping. Applied in
            :meth:`configure_gradient_clipping`, after Lightning unscales fp16 gradients.
        channels_last: run the backbone in channels-last memory format (faster convolutions on GPUs).
        compile: ``torch.compile`` the backbone for training and embedding (weights stay shared).
        val_set_names: names of the validation pair sets, in dataloader order (default: the datamodule's
            ``val_set_names``, else ``set0``, ``set1`` …).
        lr_schedule: a fixed schedule for comparison runs (leave ``None`` with the FastFace callback, which
            owns the LR): ``{"name": "polynomial", "power": 2.0, "warmup_fraction": 0.0}`` (arcface_torch's
            γ0·(1 − t/T)^power per optimizer step over ``trainer.estimated_stepping_batches``) or
            ``{"name": "step", "milestones": [2, 3, 4], "gamma": 0.1}`` (per epoch).
            :func:`fastface_pl.scheduling.presets.torch_schedule` builds these dicts.

    Validation dataloaders (one per pair set) yield ``(images_a, images_b, issame)``; each image is embedded
    with its horizontal flip (the two embeddings added), and :class:`VerificationMetric` logs
    ``val/{name}/accuracy``, ``…/accuracy_std``, ``…/threshold``, ``…/val_at_far``, ``…/val_at_far_std``,
    ``…/far``, ``…/xnorm`` (InsightFace's definitions, ``docs/evaluation.md``) and the mean ``val/accuracy``
    over sets.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str | nn.Module = "r100",
        backbone_kwargs: dict[str, Any] | None = None,
        embedding_size: int = 512,
        margin: str = "arcface",
        margin_kwargs: dict[str, Any] | None = None,
        classifier: str = "full",
        classifier_kwargs: dict[str, Any] | None = None,
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        clip_grad_norm: float | None = 5.0,
        channels_last: bool = False,
        compile: bool = False,
        val_set_names: Sequence[str] | None = None,
        lr_schedule: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        settings = self.check_arguments(num_classes, backbone, backbone_kwargs, embedding_size, classifier,
                                        classifier_kwargs, lr, momentum, weight_decay, clip_grad_norm, lr_schedule)
        if val_set_names is not None:
            val_set_names = [str(name) for name in val_set_names]
        lr_schedule = check_lr_schedule(lr_schedule)
        classifier_kwargs = settings  # hparams hold every setting of the layer (a checkpoint rebuilds the same)

        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        if isinstance(backbone, str):
            self.backbone = build_backbone(backbone, embedding_size=embedding_size, **(backbone_kwargs or {}))
        elif isinstance(backbone, nn.Module):
            self.backbone = backbone
        else:
            raise ValueError(f"backbone must be a name or an nn.Module, got {type(backbone).__name__}")
        head = build_margin(margin, **(margin_kwargs or {}))
        if classifier == "sampled":
            self.classifier: nn.Module = SampledClassifier(embedding_size, num_classes, head, settings["sample_rate"])
        elif classifier == "sharded":
            self.classifier = ShardedClassifier(embedding_size, num_classes, head, settings["sample_rate"])
            # each rank holds its own rows: DDP neither broadcasts nor averages them
            self._ddp_params_and_buffers_to_ignore = ["classifier.weight"]
        elif classifier == "dcp":
            pool_size = settings["pool_size"] or default_pool_size(num_classes, settings["pool_fraction"])
            self.classifier = DynamicClassPool(embedding_size, num_classes, pool_size, head, settings["push_topk"])
        else:
            self.classifier = FullClassifier(embedding_size, num_classes, head)
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        if classifier == "dcp":  # F2C's gallery network: an EMA of the backbone, never trained by gradients
            self.gallery_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
            # Every rank writes the same gathered features into its pool: no need to broadcast it under DDP.
            self._ddp_params_and_buffers_to_ignore = [f"classifier.{name}" for name, _ in
                                                      self.classifier.named_buffers()]
        # Kept out of the module tree so state_dict keys stay "backbone.*" with or without compile.
        self._compiled_backbone = torch.compile(self.backbone) if compile else None
        self.val_metrics = nn.ModuleList()
        self._val_names: list[str] = []
        self._gallery_step: int | None = None  # the optimizer step of the last gallery update (dcp)
        self._skipped_reported = 0  # pool writes refused (non-finite gallery features) already warned about

    @staticmethod
    def check_arguments(num_classes: int | None = None, backbone: Any = "r100", backbone_kwargs: Any = None,
                        embedding_size: int = 512, classifier: str = "full", classifier_kwargs: Any = None,
                        lr: float = 0.02, momentum: float = 0.9, weight_decay: float = 5e-4,
                        clip_grad_norm: float | None = 5.0, lr_schedule: Any = None, **_: Any) -> dict[str, Any]:
        """Check the arguments of the constructor without building anything (``num_classes`` None: not known
        yet); returns the classifier's settings with their defaults. Raises ValueError naming the argument."""
        if num_classes is not None:
            check_int("num_classes", num_classes, 1)
        check_int("embedding_size", embedding_size, 1)
        check_real("lr", lr, 0.0)
        check_real("momentum", momentum, 0.0, 1.0, low_open=False)
        check_real("weight_decay", weight_decay, 0.0, low_open=False)
        check_real("clip_grad_norm", clip_grad_norm, 0.0, allow_none=True)
        if backbone_kwargs is not None and not isinstance(backbone, str):
            raise ValueError("backbone_kwargs only applies to a backbone given by name; "
                             "configure the nn.Module before passing it")
        check_lr_schedule(lr_schedule)
        return _check_classifier(classifier, classifier_kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "_compiled_backbone":  # an nn.Module, but not a submodule
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings ``float[B, D]`` of images ``float[B, 3, H, W]`` (normalised RGB)."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        net = self._compiled_backbone if self._compiled_backbone is not None else self.backbone
        return net(images)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings ``float[B, D]`` (fp32) for verification and search."""
        return F.normalize(self(images).float(), dim=1)

    def embed_with_flip(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the embeddings of the images and their horizontal flips (unnormalised, fp32)."""
        return self.embed_views(images).mean(dim=1)

    def embed_views(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings of the images and of their horizontal flips, ``float[B, 2, D]`` (unnormalised, fp32)."""
        first, flipped = self(torch.cat([images, images.flip(-1)])).float().chunk(2)
        return torch.stack([first, flipped], dim=1)

    # ------------------------------------------------------------------ training
    @property
    def needs_identity_pairs(self) -> bool:
        """True for ``dcp``: training batches must hold identity pairs at positions (2i, 2i + 1)."""
        return self.hparams.classifier == "dcp"

    def _check_embeddings(self, embeddings: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.hparams.embedding_size:
            raise ValueError(
                f"the backbone returned shape {list(embeddings.shape)} but embedding_size="
                f"{self.hparams.embedding_size}; pass the backbone's output size as embedding_size"
            )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.hparams.classifier == "dcp":
            loss = self._dcp_step(images, labels)
        else:
            embeddings = self(images)
            self._check_embeddings(embeddings)
            loss = self.classifier(embeddings, labels)
        # prog_bar=False: showing a per-step value would force a host-device sync at every refresh.
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=False)
        return loss

    # ------------------------------------------------------------------ F2C (classifier="dcp")
    def _gallery_features(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gallery features and labels of ``images``, gathered over all ranks (rank order), no gradient."""
        with torch.no_grad():
            if self.hparams.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            features = self.gallery_backbone(images).float()
            trainer = self._trainer  # None outside Trainer.fit (e.g. a step called by hand)
            if trainer is not None and trainer.world_size > 1:
                features = self.all_gather(features).reshape(-1, features.shape[1])
                labels = self.all_gather(labels).reshape(-1)
        return features, labels

    @torch.no_grad()
    def _update_gallery(self) -> None:
        """gallery ← m · gallery + (1 − m) · probe, parameter by parameter (BatchNorm statistics are the
        gallery's own, as in the F2C reference), once per optimizer step.

        Called by every micro-batch, it updates only at the first one after an optimizer step (the probe has not
        changed since): with ``accumulate_grad_batches=N`` the momentum per optimizer step stays m, not mᴺ. Outside
        a Trainer (a step called by hand) every call updates.
        """
        trainer = self._trainer
        if trainer is not None:
            step = int(trainer.global_step)  # a Python counter: no host sync
            if step == self._gallery_step:
                return
            self._gallery_step = step
        m = float(self.hparams.classifier_kwargs["momentum"])
        gallery = list(self.gallery_backbone.parameters())
        probe = [p.detach() for p in self.backbone.parameters()]
        torch._foreach_mul_(gallery, m)
        torch._foreach_add_(gallery, probe, alpha=1.0 - m)

    def _dcp_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """F2C's symmetric step: view A (even positions) is probe against the pool written from view B (odd
        positions), with pool and LRU rolled back afterwards; then B is probe against A's gallery features,
        which stay in the pool. The loss is the mean of the two passes."""
        if images.shape[0] % 2:
            raise ValueError(f"classifier='dcp' needs an even batch of identity pairs, got {images.shape[0]} images; "
                             "use an even batch_size with FaceDataModule (it lays out the pairs itself)")
        self._update_gallery()
        view_a, view_b = images[0::2], images[1::2]
        labels_a, labels_b = labels[0::2], labels[1::2]
        probe_a = self(view_a)
        self._check_embeddings(probe_a)
        gallery_b, gallery_labels_b = self._gallery_features(view_b, labels_b)
        loss_a, present_a = self.classifier(probe_a, labels_a, gallery_b, gallery_labels_b, rollback=True)
        probe_b = self(view_b)
        gallery_a, gallery_labels_a = self._gallery_features(view_a, labels_a)
        loss_b, present_b = self.classifier(probe_b, labels_b, gallery_a, gallery_labels_a, rollback=False)
        self.log("train/dcp_present", (present_a + present_b) / 2, on_step=True, on_epoch=False)
        self.log("train/dcp_skipped_writes", self.classifier.skipped_writes.float(), on_step=True, on_epoch=False)
        return (loss_a + loss_b) / 2

    def on_train_end(self) -> None:
        """``sharded`` over several ranks: the whole layer and its momentum back on every rank (on the host, before
        Lightning's teardown), the optimizer rebound to them, so that ``state_dict()`` after ``fit``, a checkpoint
        saved then, and what ``ddp_spawn`` hands back to the launching process hold every row."""
        layer = self.classifier
        if not isinstance(layer, ShardedClassifier) or layer.world_size == 1:
            return
        rows, trainer = layer.weight, self.trainer
        holders = [(optimizer, group) for optimizer in trainer.optimizers for group in optimizer.param_groups
                   if any(p is rows for p in group["params"])]
        # whether to gather a momentum: from the settings (the same on every rank), never from a rank's own state
        momenta = [gather_rows(optimizer.state.get(rows, {}).get("momentum_buffer", torch.zeros_like(rows)), layer,
                               every_rank=True) if group.get("momentum", 0) else None for optimizer, group in holders]
        layer.unshard()
        for (optimizer, group), momentum in zip(holders, momenta):
            group["params"] = [layer.weight if p is rows else p for p in group["params"]]
            old = optimizer.state.pop(rows, {})
            if momentum is not None and "momentum_buffer" in old:
                optimizer.state[layer.weight] = {**old, "momentum_buffer": momentum}

    def on_train_start(self) -> None:
        if self.hparams.classifier == "dcp":  # after a resume, warn only about refusals of this run
            self._skipped_reported = int(self.classifier.skipped_writes)

    def on_train_epoch_end(self) -> None:
        """``dcp``: warns when gallery writes were refused this epoch (non-finite features; one read per epoch)."""
        if self.hparams.classifier != "dcp":
            return
        skipped = int(self.classifier.skipped_writes)
        if skipped > self._skipped_reported:
            rank_zero_warn(
                f"F2C pool: {skipped - self._skipped_reported} gallery write(s) refused this epoch ({skipped} in "
                "all) because the gallery network gave non-finite features (e.g. an fp16 overflow); the pool kept "
                "its previous features. Many refusals mean the gallery network has diverged: lower the learning "
                "rate or train in bf16/fp32"
            )
        self._skipped_reported = skipped

    def setup(self, stage: str) -> None:
        """``sharded``: keeps this rank's rows of the layer. ``dcp``: enlarges the pool to hold one step's gallery
        view of all ranks. Both before a checkpoint loads and the optimizer is built."""
        trainer = self._trainer
        if isinstance(self.classifier, ShardedClassifier) and stage == "fit" and trainer is not None \
                and trainer.world_size > 1:
            self.classifier.shard(trainer.global_rank, trainer.world_size)
        if stage != "fit" or self.hparams.classifier != "dcp":
            return
        needed = self._dcp_gallery_batch()
        if needed is None or needed <= self.classifier.pool_size:
            return
        settings = self.hparams.classifier_kwargs
        if settings["pool_size"] is not None:
            raise ValueError(
                f"classifier_kwargs.pool_size={settings['pool_size']} is smaller than one step's gallery view "
                f"({needed} images over all ranks); set pool_size >= {needed} or leave it null"
            )
        rank_zero_info(f"F2C pool: {self.classifier.pool_size} entries ({settings['pool_fraction']:g} of "
                       f"{self.hparams.num_classes} identities) raised to {needed}, the gallery images of one step")
        self.classifier.resize(needed)
        settings["pool_size"] = needed  # checkpoints rebuild the same pool

    def on_fit_start(self) -> None:
        layer = self.classifier
        if isinstance(layer, ShardedClassifier) and layer.world_size > 1 and self.trainer.gradient_clip_val is not None:
            raise ValueError(
                f"trainer.gradient_clip_val={self.trainer.gradient_clip_val} clips every parameter together, and with "
                "classifier=sharded each rank holds other rows of the layer: the ranks would scale their gradients "
                "differently and their backbones drift apart. Leave it null; model.clip_grad_norm clips the backbone "
                "(the same on every rank)"
            )
        if self.hparams.classifier == "dcp":
            needed = self._dcp_gallery_batch()
            if needed is not None and needed > self.classifier.pool_size:
                raise ValueError(
                    f"the F2C pool has {self.classifier.pool_size} entries (from the checkpoint) but one step writes "
                    f"{needed} gallery images over all ranks; resume with the batch size and devices it was "
                    "trained with, or start a new run"
                )

    # ------------------------------------------------------------------ sharded checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """``sharded`` over several ranks: the checkpoint gets the whole C × D weight and momentum, gathered on rank
        0 (a collective: Lightning calls this on every rank), so it resumes on any number of ranks."""
        layer = self.classifier
        if not isinstance(layer, ShardedClassifier):
            return
        checkpoint[SHARDED_CHECKPOINT_KEY] = {"world_size": layer.world_size, "num_classes": layer.num_classes}
        if layer.world_size == 1:
            return
        checkpoint["state_dict"]["classifier.weight"] = gather_rows(layer.weight, layer)
        for optimizer_state in checkpoint.get("optimizer_states", []):
            index, entry, momentum = _classifier_state(optimizer_state)
            # Whether to gather, from what every rank shares (the settings, the step count), never from one rank's
            # own state: a rank that disagreed would leave the others waiting. A rank without a buffer sends zeros.
            if index is None or not momentum or self.trainer.global_step == 0:
                continue
            buffer = (entry or {}).get("momentum_buffer")
            whole = gather_rows(buffer if buffer is not None else torch.zeros_like(layer.weight), layer)
            # a new dict: the optimizer's state_dict() shares its entries with the live optimizer
            optimizer_state["state"][index] = {**(entry or {}), "momentum_buffer": whole}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """``sharded``: this rank's rows of the checkpoint's whole weight and momentum (whatever world size saved
        them)."""
        layer = self.classifier
        if not isinstance(layer, ShardedClassifier):
            return
        saved = checkpoint.get(SHARDED_CHECKPOINT_KEY, {}).get("world_size", 1)
        if saved != layer.world_size:
            rank_zero_info(f"sharded classification layer: the checkpoint was saved by {saved} rank(s); its "
                           f"{layer.num_classes} rows are split again over {layer.world_size}")
        if layer.world_size == 1:
            return
        state = checkpoint.get("state_dict", {})
        if "classifier.weight" in state:
            state["classifier.weight"] = slice_rows(state["classifier.weight"], layer)
        for optimizer_state in checkpoint.get("optimizer_states", []):
            index, entry, _ = _classifier_state(optimizer_state)
            if entry is not None and "momentum_buffer" in entry:
                optimizer_state["state"][index] = {**entry, "momentum_buffer": slice_rows(entry["momentum_buffer"],
                                                                                            layer)}

    def _dcp_gallery_batch(self) -> int | None:
        datamodule = getattr(self.trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None)
        if not isinstance(batch_size, int):
            return None
        return (batch_size // 2) * max(1, int(self.trainer.world_size))

    def configure_optimizers(self) -> Any:
        """SGD (momentum, weight decay) with two parameter groups: ``backbone`` and ``classifier``.

        The frozen BatchNorm1d weight of the IResNet head (``requires_grad=False``) is in neither group.
        With the sampled classifier the optimizer is :class:`RowSparseSGD`, which leaves unsampled rows
        (and their momentum) untouched; otherwise plain ``torch.optim.SGD``. With ``lr_schedule`` set, also
        the matching ``torch.optim.lr_scheduler`` (``LambdaLR`` per step, or ``MultiStepLR`` per epoch).
        """
        hp = self.hparams
        groups = [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad], "name": "backbone"},
            {"params": [p for p in self.classifier.parameters() if p.requires_grad], "name": "classifier"},
        ]
        if not groups[1]["params"]:  # dcp: the pool has no parameters
            groups.pop()
        optimizer_class = RowSparseSGD if hp.classifier in ("sampled", "sharded") else torch.optim.SGD
        optimizer = optimizer_class(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        schedule = hp.get("lr_schedule")
        if schedule is None:
            return optimizer
        if schedule["name"] == "polynomial":
            total = int(self.trainer.estimated_stepping_batches)
            factor = PolynomialFactor(total, int(schedule["warmup_fraction"] * total), schedule["power"])
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, schedule["milestones"], schedule["gamma"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """``sharded`` under fp16 with a gradient scaler: the ranks agree on whether this step overflowed.

        Lightning has just unscaled the gradients; each rank's scaler found infs or NaNs in its own gradients only,
        and the ranks hold different rows of the layer. Were one rank to skip a step the others take, its scale and
        its backbone would drift apart from theirs for good. One ``all_reduce`` (MAX) of the overflow flag, on the
        device, makes every rank skip or step together (as FSDP's sharded scaler does).
        """
        layer = self.classifier
        if not isinstance(layer, ShardedClassifier) or layer.world_size == 1:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return
        state = scaler._per_optimizer_states.get(id(optimizer), {})
        for found in state.get("found_inf_per_device", {}).values():
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX, group=layer.group)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clips the backbone's gradient norm to ``clip_grad_norm`` (the classification layer is not clipped).

        Lightning calls this after unscaling fp16 gradients. A ``gradient_clip_val`` set on the Trainer is
        applied as well, to all parameters (Lightning's default behaviour).
        """
        if self.hparams.clip_grad_norm is not None:
            params = [p for p in self.backbone.parameters() if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, self.hparams.clip_grad_norm)
        if gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ validation
    def _resolve_val_names(self, count: int) -> list[str]:
        names = self.hparams.val_set_names
        if names is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            names = getattr(datamodule, "val_set_names", None)
        if names is None:
            return [f"set{i}" for i in range(count)]
        if len(names) != count:
            raise ValueError(
                f"{count} validation dataloaders but {len(names)} val_set_names {list(names)}; "
                "give one name per dataloader"
            )
        return list(names)

    def on_validation_epoch_start(self) -> None:
        num_batches = self.trainer.num_val_batches
        count = len(num_batches) if isinstance(num_batches, (list, tuple)) else 1
        names = self._resolve_val_names(count)
        if names != self._val_names or len(self.val_metrics) != count:
            self.val_metrics = nn.ModuleList(VerificationMetric() for _ in names).to(self.device)
            self._val_names = names
        for metric in self.val_metrics:
            metric.reset()

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        images_a, images_b, issame = batch
        self.val_metrics[dataloader_idx].update(self.embed_views(images_a), self.embed_views(images_b), issame)

    def on_validation_epoch_end(self) -> None:
        accuracies = []
        for name, metric in zip(self._val_names, self.val_metrics):
            if not metric.distances:  # e.g. a sanity check that ran no batch of this set
                continue
            if self.trainer.sanity_checking and sum(d.numel() for d in metric.distances) < metric.num_folds:
                metric.reset()  # a few sanity batches can hold fewer pairs than folds: nothing to report yet
                continue
            result = metric.compute()
            for key in _VAL_KEYS:
                self.log(f"val/{name}/{key}", result[key].float(), add_dataloader_idx=False)
            accuracies.append(result["accuracy"].float())
            metric.reset()
        if accuracies:
            self.log("val/accuracy", torch.stack(accuracies).mean(), prog_bar=True, add_dataloader_idx=False)


def _classifier_state(optimizer_state: Mapping[str, Any]) -> tuple[Any, Any, float]:
    """(index, state entry, momentum setting) of the classifier's weight in an optimizer's ``state_dict`` (its group
    is named ``classifier``); (None, None, 0) when there is none."""
    for group in optimizer_state.get("param_groups", []):
        if group.get("name") == "classifier" and group.get("params"):
            index = group["params"][0]
            return index, optimizer_state.get("state", {}).get(index), float(group.get("momentum", 0) or 0)
    return None, None, 0.0
