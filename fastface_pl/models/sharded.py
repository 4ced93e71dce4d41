"""The classification layer sharded across DDP ranks (``model.classifier=sharded``, docs/sharded.md).

Each of the N ranks holds C/N rows of the C × D weight (and their optimizer state). At every step:

1. the embeddings and labels of all ranks are gathered (:class:`_GatherRows`: its backward sums the embedding
   gradients of all ranks and returns each rank its own rows, times N, because DDP then averages the backbone's
   gradients: the average of N copies of the summed gradient is the gradient of the global loss);
2. each rank scores the whole global batch against its rows only (a ``[N·B, C/N]`` buffer, never ``N·B × C``);
3. the margin softmax's row maxima are reduced with MAX and its row sums (with the target logits) with SUM,
   so every rank holds the same global loss: the mean over the global batch, as the ``full`` layer on one
   process computes it on the same batch;
4. backward gives each rank the exact gradient of its rows, and its share of the embeddings' gradient.

With ``sample_rate < 1`` each rank scores the batch's positives that fall in its rows plus random others, in all
``max(round(sample_rate · C/N), positives)`` rows (Partial FC's rule per rank); the random share comes from a
generator seeded by the layer's seed, the number of training steps done and the rank, so a resume draws the same
samples. The weight is left out of DDP's gradient all-reduce (it differs per rank by design).

On one process the layer is the ``full`` layer (``sample_rate = 1``) or the ``sampled`` one: the same loss and
gradients. Checkpoints hold the whole C × D weight and its momentum (gathered on rank 0 at save, sliced again at
load, :func:`gather_rows` and :func:`slice_rows`), so a run resumes on any number of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastface_pl.errors import ConfigurationError
from fastface_pl.models.classifiers import (ClassificationLayer, _check_labels, _cosines, _input_gradients,
                                            _target_logits)
from fastface_pl.models.margins import IGNORE_LABEL, MarginHead, build_margin
from fastface_pl.models.optim import RowSparseSGD
from fastface_pl.argument_checks import check_int, check_real

if TYPE_CHECKING:
    from fastface_pl.models.module import FaceRecognitionModule

__all__ = ["ShardedClassifier", "shard_range", "sharded_margin_cross_entropy", "gather_rows", "slice_rows",
           "SHARDED_CHECKPOINT_KEY"]

SHARDED_CHECKPOINT_KEY = "sharded_classifier"  # {"world_size", "num_classes"} of the run that saved it


# torch >= 2.10 names them *_single (the older names warn); the same collectives
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of ``rank``: C split as evenly as possible, the first C mod N ranks one row more."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _GatherRows(torch.autograd.Function):
    """All ranks' ``[B, D]`` rows, in rank order; backward: the summed gradient of this rank's rows, times N."""

    @staticmethod
    def forward(ctx, rows, group):  # type: ignore[override]
        ctx.group, ctx.world = group, dist.get_world_size(group)
        return _gathered(rows, group)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        own = grad.new_empty((grad.shape[0] // ctx.world, *grad.shape[1:]))
        _reduce_scatter(own, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return own.mul_(ctx.world), None


def _gathered(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Every rank's ``tensor`` (the same shape on each), stacked along the first dimension in rank order."""
    out = tensor.new_empty((dist.get_world_size(group) * tensor.shape[0], *tensor.shape[1:]))
    _all_gather(out, tensor.contiguous(), group=group)
    return out


class _ShardedMarginCrossEntropy(torch.autograd.Function):
    """The margin softmax over rows held by several ranks (one ``[B, C_local]`` buffer, as
    :func:`fastface_pl.models.classifiers.margin_cross_entropy`); no host synchronisation."""

    @staticmethod
    def forward(ctx, embeddings, weight, target_cols, valid, margin, group, reuse_buffer):  # type: ignore[override]
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            # cosines → logits → softmax → gradient, in place
            emb_hat, emb_norm, w, w_norm, buffer = _cosines(embeddings, weight)
            here = target_cols >= 0  # rows whose target class is one of this rank's scored rows
            rows = torch.arange(buffer.shape[0], device=buffer.device)
            cols = target_cols.clamp_min(0)
            cos_target = buffer[rows, cols]
            target, d_target = _target_logits(margin, cos_target)
            s = margin.s
            buffer[rows, cols] = torch.where(here, target, cos_target)
            buffer.mul_(s)
            row_max = buffer.amax(dim=1)
            if group is not None:
                dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
            buffer.sub_(row_max.unsqueeze(1)).exp_()
            sums = torch.stack([buffer.sum(dim=1), torch.where(here, target * s, torch.zeros_like(target))])
            if group is not None:
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
            row_sum, target_logit = sums[0], sums[1]
            buffer.div_(row_sum.unsqueeze(1))  # softmax p over this rank's columns
            log_sum_exp = row_sum.log() + row_max
            num_valid = valid.sum().clamp_min(1).to(buffer.dtype)
            loss = torch.where(valid, log_sum_exp - target_logit, torch.zeros_like(row_max)).sum() / num_valid

        ctx.save_for_backward(emb_hat, emb_norm, w, w_norm, buffer, rows, cols, here, valid, d_target, num_valid)
        ctx.s, ctx.used, ctx.reuse_buffer = s, False, reuse_buffer
        ctx.input_dtypes = (embeddings.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        if ctx.used:
            raise RuntimeError("sharded_margin_cross_entropy reuses its softmax buffer for the gradient and supports "
                               "one backward pass; pass reuse_buffer=False to backpropagate twice")
        emb_hat, emb_norm, w, w_norm, grad, rows, cols, here, valid, d_target, num_valid = ctx.saved_tensors
        if ctx.reuse_buffer:
            ctx.used = True
        else:
            grad = grad.clone()
        with torch.autocast(device_type=grad.device.type, enabled=False):
            p_target = grad[rows, cols]
            grad[rows, cols] = torch.where(here, (p_target - 1.0) * d_target, p_target)
            grad.mul_(valid.unsqueeze(1).to(grad.dtype))  # rows without a label contribute nothing
            grad.mul_((grad_loss.to(grad.dtype) * ctx.s / num_valid))
            grad_emb, grad_w = _input_gradients(grad, emb_hat, emb_norm, w, w_norm, ctx.needs_input_grad[:2],
                                                ctx.input_dtypes)
        return grad_emb, grad_w, None, None, None, None, None


def sharded_margin_cross_entropy(embeddings: torch.Tensor, weight: torch.Tensor, target_cols: torch.Tensor,
                                 valid: torch.Tensor, margin: MarginHead, group: Any = None,
                                 reuse_buffer: bool = True) -> torch.Tensor:
    """Mean margin-softmax cross-entropy of the global batch over class rows spread across the ranks of ``group``.

    Args:
        embeddings: ``float[B, D]``, the same global batch on every rank.
        weight: ``float[R, D]``, the class rows this rank scores.
        target_cols: ``long[B]``: the row of ``weight`` holding the sample's class, −1 where another rank has it.
        valid: ``bool[B]``: the samples with a label (not −1); the loss is their mean.
        margin: the margin head.
        group: the process group (``dist.group.WORLD`` for all ranks; None: one process, and then this is
            ``margin_cross_entropy``).
        reuse_buffer: turn the saved softmax into the gradient in place (one backward pass only).

    Returns:
        The global loss (fp32, or fp64 for fp64 inputs), the same on every rank.
    """
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(f"expected embeddings [B, D] and weight [R, D] with the same D, got "
                         f"{list(embeddings.shape)} and {list(weight.shape)}")
    return _ShardedMarginCrossEntropy.apply(embeddings, weight, target_cols, valid, margin, group, reuse_buffer)


def _mixed_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1, np.uint64)[0] % 2**63)


class ShardedClassifier(ClassificationLayer):
    """Margin-softmax layer whose C × D weight is split across DDP ranks (see the module's docstring).

    Built whole (``weight float[C, D]``, initialised as the ``full`` layer's); :meth:`shard` keeps this rank's
    rows. Under a Trainer with several ranks it shards itself in :meth:`setup_fit`, keeps checkpoints whole
    (:meth:`on_save_checkpoint`, :meth:`on_load_checkpoint`) and is whole again on every rank after ``fit``
    (:meth:`on_train_end`).

    Args:
        embedding_size: D.
        num_classes: C.
        margin: a margin head or its name.
        sample_rate: fraction of each rank's rows scored per training step, in (0, 1]; the positives always are.
        check_labels: verify labels are in range every step (one host sync per step).
    """

    SETTINGS: ClassVar[dict[str, Any]] = {"sample_rate": 1.0}
    optimizer_class = RowSparseSGD

    def __init__(self, embedding_size: int, num_classes: int, margin: MarginHead | str = "arcface",
                 sample_rate: float = 1.0, check_labels: bool = False) -> None:
        super().__init__()
        check_int("embedding_size", embedding_size, 1)
        check_int("num_classes", num_classes, 1)
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.margin = build_margin(margin) if isinstance(margin, str) else margin
        self.sample_rate = check_real("sample_rate", sample_rate, 0.0, 1.0)
        self.check_labels = check_labels
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, 0.0, 0.01)  # as the full layer (and arcface_torch)
        # the random share's seed (from the global generator: seed_everything governs it; rank 0's under DDP),
        # kept in checkpoints; a Python int, not a buffer, so that seeding the generator reads nothing from the
        # device (drawing the sample still synchronises once, for the number of positives, as Partial FC does)
        self.sample_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.rank, self.world_size, self.group = 0, 1, None
        self.start, self.end = 0, num_classes
        self.steps = 0  # training forward passes done: with the seed and the rank, the sampling generator's seed
        self.last_sampled: Optional[torch.Tensor] = None  # this rank's sampled rows (local indices), last step

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> None:
        check_real("sample_rate", settings["sample_rate"], 0.0, 1.0)

    def ddp_ignored(self) -> list[str]:
        """The weight: each rank holds its own rows, so DDP neither broadcasts nor averages them."""
        return ["weight"]

    @property
    def num_local(self) -> int:
        return self.end - self.start

    @property
    def num_sample(self) -> int:
        """Rows scored per step on this rank when the positives are fewer (``round(sample_rate · C/N)``, ≥ 1)."""
        return max(1, int(round(self.sample_rate * self.num_local)))

    @torch.no_grad()
    def shard(self, rank: int, world_size: int, group: Any = None) -> None:
        """Keep rows ``shard_range(C, world_size, rank)`` of the whole weight (before the optimizer is built)."""
        if world_size > 1 and group is None:
            group = dist.group.WORLD
        if (rank, world_size) == (self.rank, self.world_size):
            self.group = group
            return
        if self.world_size != 1:
            raise RuntimeError(f"the layer is already sharded over {self.world_size} ranks; build it again to shard "
                               f"it over {world_size}")
        if self.num_classes < world_size:
            raise ConfigurationError(f"classifier=sharded needs at least one identity per rank: {self.num_classes} "
                             f"identities over {world_size} ranks; use classifier=full")
        start, end = shard_range(self.num_classes, world_size, rank)
        seed = [self.sample_seed]
        dist.broadcast_object_list(seed, src=0, group=group)  # rank 0's, as checkpoints keep it
        self.sample_seed = int(seed[0])
        self.weight = nn.Parameter(self.weight.data[start:end].clone())
        self.rank, self.world_size, self.group, self.start, self.end = rank, world_size, group, start, end

    @torch.no_grad()
    def unshard(self) -> None:
        """Every rank gets the whole weight back, on the host (a collective): the layer is then the whole layer
        of one process, as after ``fit``. The caller rebinds an optimizer that held the rows
        (:meth:`on_train_end` does)."""
        if self.world_size == 1:
            return
        self.weight = nn.Parameter(gather_rows(self.weight, self, every_rank=True))
        self.rank, self.world_size, self.group, self.start, self.end = 0, 1, None, 0, self.num_classes

    def get_extra_state(self) -> dict[str, int]:
        return {"steps": self.steps, "sample_seed": self.sample_seed}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("steps"), int) \
                or not isinstance(state.get("sample_seed"), int):
            raise ValueError(f"the sharded layer's saved state must hold the integers steps and sample_seed, got "
                             f"{state!r}")
        self.steps, self.sample_seed = state["steps"], state["sample_seed"]

    def sample(self, local_labels: torch.Tensor) -> torch.Tensor:
        """Sorted local rows: this rank's positives (``local_labels`` ≥ 0) plus random others."""
        positives = torch.unique(local_labels[local_labels >= 0])
        if self.num_sample <= positives.numel():
            return positives
        generator = torch.Generator(device=local_labels.device)
        generator.manual_seed(_mixed_seed(self.sample_seed, self.steps, self.rank))
        scores = torch.rand(self.num_local, generator=generator, device=local_labels.device)
        scores[positives] = 2.0
        return torch.topk(scores, k=self.num_sample).indices.sort().values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The global batch's loss for this rank's ``embeddings float[B, D]`` and ``labels long[B]``."""
        if embeddings.dim() != 2 or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(f"expected embeddings [B, D] and labels [B], got {list(embeddings.shape)} and "
                             f"{list(labels.shape)}")
        labels = labels.long()
        embeddings = embeddings.float()  # gathered in fp32: the loss is computed in fp32 anyway
        group = self.group if self.world_size > 1 else None
        if group is not None:
            embeddings = _GatherRows.apply(embeddings, group)
            labels = _gathered(labels, group)
        if self.check_labels:  # after the gather: every rank raises together
            _check_labels(labels, self.num_classes)
        # A label no rank holds would leave its sample without a target, silently: stop as the full layer's
        # index error does, without reading anything on the host (a device-side assertion on a GPU).
        torch._assert_async(((labels >= IGNORE_LABEL) & (labels < self.num_classes)).all(),
                            f"labels must be in [0, {self.num_classes}) or -1; set num_classes to the number of "
                            "identities in the data")
        valid = labels != IGNORE_LABEL
        local = torch.where((labels >= self.start) & (labels < self.end), labels - self.start,
                            torch.full_like(labels, -1))
        if self.training and self.sample_rate < 1.0:
            index = self.sample(local)
            self.last_sampled = index
            rows = F.embedding(index, self.weight, sparse=True)  # sparse gradient: RowSparseSGD updates these rows
            found = torch.searchsorted(index, local.clamp_min(0))
            target_cols = torch.where(local >= 0, found, torch.full_like(local, -1))
        else:
            rows, target_cols = self.weight, local
        if self.training:
            self.steps += 1
        return sharded_margin_cross_entropy(embeddings, rows, target_cols, valid, self.margin, group)

    # ------------------------------------------------------------------ hooks of FaceRecognitionModule
    def setup_fit(self, module: FaceRecognitionModule) -> None:
        """Keeps this rank's rows when the trainer has several ranks (before a checkpoint loads)."""
        trainer = module.trainer
        if trainer.world_size > 1:
            self.shard(trainer.global_rank, trainer.world_size)

    @classmethod
    def check_trainer(cls, gradient_clip_val: Any, world_size: Optional[int]) -> None:
        """Refuses the Trainer's ``gradient_clip_val`` over several ranks (or a number not known yet): it would clip
        each rank differently."""
        if gradient_clip_val is not None and (world_size is None or world_size > 1):
            raise ConfigurationError(
                f"trainer.gradient_clip_val={gradient_clip_val} with classifier=sharded: it clips every parameter "
                "together, and each rank holds other rows of the layer, so the ranks would scale their gradients "
                "differently and their backbones drift apart. Leave it null; model.clip_grad_norm clips the "
                "backbone (the same on every rank)"
            )

    def on_fit_start(self, module: FaceRecognitionModule) -> None:
        """Refuses the Trainer's ``gradient_clip_val`` over several ranks (:meth:`check_trainer`)."""
        self.check_trainer(module.trainer.gradient_clip_val, self.world_size)

    def on_train_end(self, module: FaceRecognitionModule) -> None:
        """Over several ranks: the whole layer and its momentum back on every rank (on the host, before Lightning's
        teardown), the optimizer rebound to them, so that ``state_dict()`` after ``fit``, a checkpoint saved then,
        and what ``ddp_spawn`` hands back to the launching process hold every row."""
        if self.world_size == 1:
            return
        rows = self.weight
        holders = [(optimizer, group) for optimizer in module.trainer.optimizers for group in optimizer.param_groups
                   if any(p is rows for p in group["params"])]
        # whether to gather a momentum: from the settings (the same on every rank), never from a rank's own state
        momenta = [gather_rows(optimizer.state.get(rows, {}).get("momentum_buffer", torch.zeros_like(rows)), self,
                               every_rank=True) if group.get("momentum", 0) else None for optimizer, group in holders]
        self.unshard()
        for (optimizer, group), momentum in zip(holders, momenta):
            group["params"] = [self.weight if p is rows else p for p in group["params"]]
            old = optimizer.state.pop(rows, {})
            if momentum is not None and "momentum_buffer" in old:
                optimizer.state[self.weight] = {**old, "momentum_buffer": momentum}

    def on_save_checkpoint(self, module: FaceRecognitionModule, checkpoint: dict[str, Any]) -> None:
        """The checkpoint gets the whole C × D weight and momentum, gathered on rank 0 (a collective: Lightning calls
        this on every rank), so it resumes on any number of ranks."""
        checkpoint[SHARDED_CHECKPOINT_KEY] = {"world_size": self.world_size, "num_classes": self.num_classes}
        if self.world_size == 1:
            return
        checkpoint["state_dict"]["classifier.weight"] = gather_rows(self.weight, self)
        for optimizer_state in checkpoint.get("optimizer_states", []):
            index, entry, momentum = _classifier_state(optimizer_state)
            # Whether to gather, from what every rank shares (the settings, the step count), never from one rank's
            # own state: a rank that disagreed would leave the others waiting. A rank without a buffer sends zeros.
            if index is None or not momentum or module.trainer.global_step == 0:
                continue
            buffer = (entry or {}).get("momentum_buffer")
            whole = gather_rows(buffer if buffer is not None else torch.zeros_like(self.weight), self)
            # a new dict: the optimizer's state_dict() shares its entries with the live optimizer
            optimizer_state["state"][index] = {**(entry or {}), "momentum_buffer": whole}

    def on_load_checkpoint(self, module: FaceRecognitionModule, checkpoint: dict[str, Any]) -> None:
        """This rank's rows of the checkpoint's whole weight and momentum (whatever world size saved them)."""
        from lightning.pytorch.utilities import rank_zero_info

        saved = checkpoint.get(SHARDED_CHECKPOINT_KEY, {}).get("world_size", 1)
        if saved != self.world_size:
            rank_zero_info(f"sharded classification layer: the checkpoint was saved by {saved} rank(s); its "
                           f"{self.num_classes} rows are split again over {self.world_size}")
        if self.world_size == 1:
            return
        state = checkpoint.get("state_dict", {})
        if "classifier.weight" in state:
            state["classifier.weight"] = slice_rows(state["classifier.weight"], self)
        for optimizer_state in checkpoint.get("optimizer_states", []):
            index, entry, _ = _classifier_state(optimizer_state)
            if entry is not None and "momentum_buffer" in entry:
                optimizer_state["state"][index] = {**entry, "momentum_buffer": slice_rows(entry["momentum_buffer"],
                                                                                            self)}

    def on_before_optimizer_step(self, module: FaceRecognitionModule, optimizer: torch.optim.Optimizer) -> None:
        """Under fp16 with a gradient scaler over several ranks: the ranks agree on whether this step overflowed.

        Lightning has just unscaled the gradients; each rank's scaler found infs or NaNs in its own gradients only,
        and the ranks hold different rows of the layer. Were one rank to skip a step the others take, its scale and
        its backbone would drift apart from theirs for good. One ``all_reduce`` (MAX) of the overflow flag, on the
        device, makes every rank skip or step together (as FSDP's sharded scaler does).
        """
        if self.world_size == 1:
            return
        scaler = getattr(module.trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return
        state = scaler._per_optimizer_states.get(id(optimizer), {})
        for found in state.get("found_inf_per_device", {}).values():
            dist.all_reduce(found, op=dist.ReduceOp.MAX, group=self.group)

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, sample_rate={self.sample_rate}"
                f", rows=[{self.start}, {self.end}) of rank {self.rank}/{self.world_size}")


def gather_rows(rows: torch.Tensor, layer: ShardedClassifier, every_rank: bool = False) -> Optional[torch.Tensor]:
    """The whole ``[C, ...]`` tensor made of every rank's ``rows`` (its shard of it), on the host: on rank 0 only
    (None on the others), or on every rank with ``every_rank``.

    A collective: every rank calls it, in the same order. The shards travel one at a time through a buffer of
    one shard on the rows' device, so no device ever holds the whole tensor.
    """
    if layer.world_size == 1:
        return rows.detach().cpu()
    longest = math.ceil(layer.num_classes / layer.world_size)
    buffer = rows.new_zeros((longest, *rows.shape[1:]))
    whole = (torch.empty((layer.num_classes, *rows.shape[1:]), dtype=rows.dtype)
             if every_rank or layer.rank == 0 else None)
    for source in range(layer.world_size):
        start, end = shard_range(layer.num_classes, layer.world_size, source)
        if source == layer.rank:
            buffer[: end - start] = rows.detach()
        if every_rank:
            dist.broadcast(buffer, src=_global_rank(layer.group, source), group=layer.group)
        elif source != 0 and layer.rank in (0, source):
            if layer.rank == source:
                dist.send(buffer, dst=_global_rank(layer.group, 0), group=layer.group)
            else:
                dist.recv(buffer, src=_global_rank(layer.group, source), group=layer.group)
        if whole is not None:
            whole[start:end] = buffer[: end - start].cpu()
    return whole


def _global_rank(group: Any, rank: int) -> int:
    return rank if group is None or group is dist.group.WORLD else dist.get_global_rank(group, rank)


def slice_rows(whole: torch.Tensor, layer: ShardedClassifier) -> torch.Tensor:
    """This rank's rows of a whole ``[C, ...]`` tensor (a checkpoint's); ValueError naming both sizes otherwise."""
    if whole.shape[0] != layer.num_classes:
        raise ValueError(f"the checkpoint's sharded layer has {whole.shape[0]} rows but this model has "
                         f"{layer.num_classes} identities")
    return whole[layer.start : layer.end].clone()


def _classifier_state(optimizer_state: Mapping[str, Any]) -> tuple[Any, Any, float]:
    """(index, state entry, momentum setting) of the classifier's weight in an optimizer's ``state_dict`` (its group
    is named ``classifier``); (None, None, 0) when there is none."""
    for group in optimizer_state.get("param_groups", []):
        if group.get("name") == "classifier" and group.get("params"):
            index = group["params"][0]
            return index, optimizer_state.get("state", {}).get(index), float(group.get("momentum", 0) or 0)
    return None, None, 0.0
