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

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from fastface_pl.errors import ConfigurationError
from fastface_pl.evaluation.verification import VerificationMetric
from fastface_pl.models.backbones import build_backbone
from fastface_pl.models.classifiers import ClassificationLayer, FullClassifier, SampledClassifier
from fastface_pl.models.dcp import DCPClassifier
from fastface_pl.models.margins import build_margin
from fastface_pl.models.sharded import ShardedClassifier
from fastface_pl.argument_checks import check_choice, check_int, check_real

__all__ = ["FaceRecognitionModule", "CLASSIFIERS"]

# the classification layers by their ``classifier`` name; conf/classifier/<name>.yaml mirrors each one's SETTINGS
CLASSIFIERS: dict[str, type[ClassificationLayer]] = {
    "full": FullClassifier,
    "sampled": SampledClassifier,
    "sharded": ShardedClassifier,
    "dcp": DCPClassifier,
}
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
    """``lr_schedule`` in its plain form (see :func:`fastface_pl.scheduling.hydra_factories.torch_schedule`), else ValueError."""
    if schedule is None:
        return None
    if not isinstance(schedule, Mapping) or schedule.get("name") not in LR_SCHEDULES:
        raise ConfigurationError(
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
        raise ConfigurationError(f"lr_schedule milestones must be a non-empty list of epochs >= 1, got {milestones!r}")
    return {"name": "step", "milestones": sorted(check_int("lr_schedule milestone", m, 1) for m in milestones),
            "gamma": check_real("lr_schedule gamma", schedule.get("gamma"), 0.0, 1.0, high_open=True)}


def _check_classifier(classifier: Any, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The classification layer's settings, defaults filled in; ValueError for an unknown name, key or value."""
    check_choice("classifier", classifier, tuple(CLASSIFIERS))
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigurationError(f"classifier_kwargs must be a dict or None, got {kwargs!r}")
    layer = CLASSIFIERS[classifier]
    unknown = sorted(set(kwargs or {}) - set(layer.SETTINGS))
    if unknown:
        raise ConfigurationError(f"classifier_kwargs {unknown} do not apply to classifier={classifier!r}; it takes "
                         f"{', '.join(layer.SETTINGS) or 'none'} (conf/classifier/{classifier}.yaml)")
    settings = {**layer.SETTINGS, **(kwargs or {})}
    layer.check_settings(settings)
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
            :func:`fastface_pl.scheduling.hydra_factories.torch_schedule` builds these dicts.

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
            raise ConfigurationError(f"backbone must be a name or an nn.Module, got {type(backbone).__name__}")
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        head = build_margin(margin, **(margin_kwargs or {}))
        self.classifier = CLASSIFIERS[classifier].from_settings(embedding_size, num_classes, head, settings,
                                                                self.backbone)
        self._ddp_params_and_buffers_to_ignore = [f"classifier.{name}" for name in self.classifier.ddp_ignored()]
        # Kept out of the module tree so state_dict keys stay "backbone.*" with or without compile.
        self._compiled_backbone = torch.compile(self.backbone) if compile else None
        self.val_metrics = nn.ModuleList()
        self._val_names: list[str] = []

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
            raise ConfigurationError("backbone_kwargs only applies to a backbone given by name; "
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
        """True when the layer (``dcp``) trains on batches of identity pairs at positions (2i, 2i + 1)."""
        return self.classifier.needs_identity_pairs

    def training_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """The embeddings of training images, ValueError unless they are ``[B, embedding_size]``."""
        embeddings = self(images)
        if embeddings.dim() != 2 or embeddings.shape[1] != self.hparams.embedding_size:
            raise ConfigurationError(
                f"the backbone returned shape {list(embeddings.shape)} but embedding_size="
                f"{self.hparams.embedding_size}; pass the backbone's output size as embedding_size"
            )
        return embeddings

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = self.classifier.training_loss(self, images, labels)
        # prog_bar=False: showing a per-step value would force a host-device sync at every refresh.
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=False)
        return loss

    # ------------------------------------------------------------------ the classification layer's hooks
    def setup(self, stage: str) -> None:
        """The layer's :meth:`~ClassificationLayer.setup_fit` (under a Trainer, before a checkpoint loads and the
        optimizer is built)."""
        if stage == "fit" and self._trainer is not None:
            self.classifier.setup_fit(self)

    def on_fit_start(self) -> None:
        self.classifier.on_fit_start(self)

    def on_train_start(self) -> None:
        self.classifier.on_train_start(self)

    def on_train_epoch_end(self) -> None:
        self.classifier.on_train_epoch_end(self)

    def on_train_end(self) -> None:
        self.classifier.on_train_end(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.classifier.on_save_checkpoint(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.classifier.on_load_checkpoint(self, checkpoint)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.classifier.on_before_optimizer_step(self, optimizer)

    def configure_optimizers(self) -> Any:
        """SGD (momentum, weight decay) with two parameter groups: ``backbone`` and ``classifier``.

        The frozen BatchNorm1d weight of the IResNet head (``requires_grad=False``) is in neither group, nor are
        a layer's frozen parameters (``dcp``: the gallery network; its group is then left out). The optimizer is
        the layer's ``optimizer_class``: :class:`~fastface_pl.models.optim.RowSparseSGD` for the sampled and
        sharded layers (it leaves unsampled rows and their momentum untouched), else ``torch.optim.SGD``. With
        ``lr_schedule`` set, also
        the matching ``torch.optim.lr_scheduler`` (``LambdaLR`` per step, or ``MultiStepLR`` per epoch).
        """
        hp = self.hparams
        groups = [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad], "name": "backbone"},
            {"params": [p for p in self.classifier.parameters() if p.requires_grad], "name": "classifier"},
        ]
        if not groups[1]["params"]:
            groups.pop()
        optimizer = self.classifier.optimizer_class(groups, lr=hp.lr, momentum=hp.momentum,
                                                    weight_decay=hp.weight_decay)
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
            raise ConfigurationError(
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

