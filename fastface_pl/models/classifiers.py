"""Classification layers with a margin softmax: the full layer (the paper's) and a sampled one (Partial FC), and
:class:`ClassificationLayer`, the base every layer the module trains derives from (``sharded.py``, ``dcp.py``).

The full and the sampled layer return the mean cross-entropy loss (fp32, also under autocast) of a batch of
embeddings. They share :func:`margin_cross_entropy`, a fused autograd function that keeps **one** batch × C
buffer for the whole forward and backward pass:

1. cosines ``ê · w_j / ‖w_j‖`` are computed into a fresh ``[B, C]`` buffer (no normalised copy of the
   C × D weight is made: the row norms ‖w_j‖ are a C-vector), clamped to [−1, 1] in place;
2. the margin changes only the B target entries; the buffer is scaled by s and turned into the softmax in
   place (max-subtracted ``exp_``, divided by the row sums); the loss is ``logsumexp − s·target``;
3. backward turns the same buffer into ``∂L/∂cos`` in place (p − onehot, the margin's derivative on the
   target column), then forms the weight gradient ``(g / ‖w‖)ᵀ ê`` projected orthogonally to each w_j.

A straightforward implementation (``F.normalize`` of the weight, ``one_hot``, ``torch.where``,
``softmax`` + ``log``) keeps several [B, C] and C × D tensors alive: ``benchmarks/bench_classifier_memory.py``
measures both. Gradients are identical (``tests/test_classifiers.py`` compares them); the clamp to [−1, 1]
is treated as the identity in backward (it only trims rounding errors of a few ulps).

.. note:: the buffer is reused for the gradient, so the graph can be backpropagated once only
   (``retain_graph=True`` then a second ``backward`` raises a RuntimeError).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastface_pl.errors import ConfigurationError
from fastface_pl.models.margins import IGNORE_LABEL, MarginHead, build_margin
from fastface_pl.models.optim import RowSparseSGD
from fastface_pl.argument_checks import check_int, check_real

if TYPE_CHECKING:
    from fastface_pl.models.module import FaceRecognitionModule

__all__ = ["margin_cross_entropy", "ClassificationLayer", "FullClassifier", "SampledClassifier"]

_NORM_EPS = 1e-12


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


class _MarginCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeddings, weight, labels, margin, reuse_buffer):  # type: ignore[override]
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            # the single [B, C] buffer: cosines → logits → softmax → gradient
            emb_hat, emb_norm, w, w_norm, buffer = _cosines(embeddings, weight)
            rows = (labels != IGNORE_LABEL).nonzero().squeeze(1)
            cols = labels[rows]
            target, d_target = _target_logits(margin, buffer[rows, cols])

            s = margin.s
            buffer.index_put_((rows, cols), target)
            buffer.mul_(s)
            row_max = buffer.amax(dim=1, keepdim=True)
            buffer.sub_(row_max).exp_()
            row_sum = buffer.sum(dim=1, keepdim=True)
            buffer.div_(row_sum)  # softmax p
            log_sum_exp = (row_sum.log() + row_max).squeeze(1)
            num_valid = rows.numel()
            loss = (log_sum_exp[rows] - s * target).sum() / max(num_valid, 1)

        ctx.save_for_backward(emb_hat, emb_norm, w, w_norm, buffer, rows, cols, d_target)
        ctx.s, ctx.num_valid, ctx.used, ctx.reuse_buffer = s, num_valid, False, reuse_buffer
        ctx.input_dtypes = (embeddings.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        if ctx.used:
            raise RuntimeError(
                "margin_cross_entropy reuses its softmax buffer for the gradient and supports one backward pass; "
                "recompute the loss, or pass reuse_buffer=False, to backpropagate twice (retain_graph=True)"
            )
        emb_hat, emb_norm, w, w_norm, grad, rows, cols, d_target = ctx.saved_tensors
        if ctx.reuse_buffer:
            ctx.used = True
        else:
            grad = grad.clone()
        need_emb, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(device_type=grad.device.type, enabled=False):
            # ∂L/∂z = (p − onehot) / N over valid rows; ∂z/∂cos = s (target: s·f'(cos)).
            grad[rows, cols] = (grad[rows, cols] - 1.0) * d_target
            if ctx.num_valid < grad.shape[0]:
                valid = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
                valid[rows] = True
                grad[~valid] = 0.0
            grad.mul_(grad_loss.to(grad.dtype) * (ctx.s / max(ctx.num_valid, 1)))
            grad_emb, grad_w = _input_gradients(grad, emb_hat, emb_norm, w, w_norm, (need_emb, need_w),
                                                ctx.input_dtypes)
        return grad_emb, grad_w, None, None, None


def _cosines(embeddings: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(ê, ‖e‖, w, ‖w‖, cos)`` in the compute dtype: the cosines ``ê · w_j / ‖w_j‖`` in a fresh ``[B, C]``
    buffer, clamped to [−1, 1] in place (no normalised copy of the weight). Call with autocast off."""
    dtype = _compute_dtype(embeddings, weight)
    emb = embeddings.to(dtype)
    w = weight.to(dtype)
    emb_norm = emb.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
    emb_hat = emb / emb_norm
    w_norm = w.norm(dim=1).clamp_min(_NORM_EPS)
    buffer = emb_hat @ w.t()
    buffer.div_(w_norm).clamp_(-1.0, 1.0)
    return emb_hat, emb_norm, w, w_norm, buffer


def _target_logits(margin: MarginHead, cos_target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The margin head's target logits of ``cos_target`` (detached) and their derivative in cos θ."""
    with torch.enable_grad():
        cos_target = cos_target.detach().requires_grad_(True)
        target = margin.target_logit(cos_target)
        if target.requires_grad:
            (d_target,) = torch.autograd.grad(target.sum(), cos_target)
        else:
            d_target = torch.zeros_like(cos_target)
    return target.detach(), d_target


def _input_gradients(grad: torch.Tensor, emb_hat: torch.Tensor, emb_norm: torch.Tensor, w: torch.Tensor,
                     w_norm: torch.Tensor, needed: tuple[bool, bool],
                     dtypes: tuple[torch.dtype, torch.dtype]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The embeddings' and the weight's gradients from ``grad`` = ∂L/∂cos (divided by ‖w_j‖ in place)."""
    grad.div_(w_norm)  # g / ‖w_j‖  (∂cos_ij/∂ê_i = w_j/‖w_j‖)
    grad_emb = grad_w = None
    if needed[0]:
        grad_emb_hat = grad @ w
        radial = (grad_emb_hat * emb_hat).sum(dim=1, keepdim=True)
        grad_emb = ((grad_emb_hat - radial * emb_hat) / emb_norm).to(dtypes[0])
    if needed[1]:
        grad_w = grad.t() @ emb_hat  # [C, D]
        # remove the component along w_j: ∂(w/‖w‖) = (I − ŵŵᵀ)/‖w‖
        along = torch.bmm(grad_w.unsqueeze(1), w.unsqueeze(2)).view(-1) / (w_norm * w_norm)
        grad_w.addcmul_(w, along.unsqueeze(1), value=-1.0)
        grad_w = grad_w.to(dtypes[1])
    return grad_emb, grad_w


def margin_cross_entropy(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         margin: MarginHead, reuse_buffer: bool = True) -> torch.Tensor:
    """Mean margin-softmax cross-entropy of unnormalised ``embeddings`` against the rows of ``weight``.

    Args:
        embeddings: ``float[B, D]`` (any float dtype; computed in fp32 or fp64).
        weight: ``float[C, D]`` class centres (normalised inside).
        labels: ``long[B]`` in [0, C), or −1 to ignore a row.
        margin: a :class:`~fastface_pl.models.margins.MarginHead` (its ``s`` and ``target_logit``).
        reuse_buffer: turn the saved softmax into the gradient in place (the memory saving; one backward
            pass only). ``False`` copies it in backward, allowing repeated backward passes (gradcheck).

    Returns:
        The scalar loss, averaged over rows whose label is not −1 (0 when there is none), in fp32
        (fp64 if an input is fp64).
    """
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected embeddings [B, D] and weight [C, D] with the same D, got {list(embeddings.shape)} and "
            f"{list(weight.shape)}; check embedding_size against the backbone's output"
        )
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"expected labels [B={embeddings.shape[0]}], got {list(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    return _MarginCrossEntropy.apply(embeddings, weight, labels.long(), margin, reuse_buffer)


def _check_labels(labels: torch.Tensor, num_classes: int) -> None:
    # One host sync; cheap next to the step and catches the classic "num_classes too small" error early.
    bad = (labels < IGNORE_LABEL) | (labels >= num_classes)
    if bool(bad.any()):
        raise ConfigurationError(
            f"labels must be in [0, {num_classes}) (or -1 to ignore), got values "
            f"{labels[bad].unique()[:5].tolist()}; set num_classes to the number of identities in the data"
        )


class ClassificationLayer(nn.Module):
    """A classification layer :class:`~fastface_pl.models.module.FaceRecognitionModule` can train.

    The layer owns its settings (``SETTINGS``, the ``classifier_kwargs`` it takes and their defaults, mirrored by
    ``conf/classifier/<name>.yaml``), how it is built from them, its training loss, its optimizer and its part of
    the Lightning hooks, which the module forwards to it. The defaults suit a layer that every rank holds whole
    and that gradients train.
    """

    SETTINGS: ClassVar[dict[str, Any]] = {}
    optimizer_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.SGD
    needs_identity_pairs: ClassVar[bool] = False  # training batches hold identity pairs at (2i, 2i + 1)

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> None:
        """Raises ValueError for a setting out of range (``settings`` holds exactly the keys of ``SETTINGS``)."""

    @classmethod
    def check_trainer(cls, gradient_clip_val: Any, world_size: Optional[int]) -> None:
        """Raises :class:`~fastface_pl.errors.ConfigurationError` for Trainer settings the layer cannot train with,
        over ``world_size`` ranks (None: not known yet, as when the config is checked before anything is built)."""

    @classmethod
    def from_settings(cls, embedding_size: int, num_classes: int, margin: MarginHead, settings: dict[str, Any],
                      backbone: nn.Module) -> ClassificationLayer:
        """The layer for D = ``embedding_size``, C = ``num_classes`` and checked ``settings``; ``backbone`` is the
        module's (a layer may keep a copy of it)."""
        return cls(embedding_size, num_classes, margin, **settings)

    def ddp_ignored(self) -> list[str]:
        """Names, relative to the layer, of the tensors DDP must neither broadcast nor average."""
        return []

    def training_loss(self, module: FaceRecognitionModule, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of one training batch, embedded by ``module``."""
        return self(module.training_embeddings(images), labels)

    def setup_fit(self, module: FaceRecognitionModule) -> None:
        """At ``setup("fit")`` under a Trainer: before a checkpoint loads and the optimizer is built."""

    def on_fit_start(self, module: FaceRecognitionModule) -> None:
        """After the checkpoint has loaded, before training."""

    def on_train_start(self, module: FaceRecognitionModule) -> None:
        """Lightning's ``on_train_start``."""

    def on_train_epoch_end(self, module: FaceRecognitionModule) -> None:
        """Lightning's ``on_train_epoch_end``."""

    def on_train_end(self, module: FaceRecognitionModule) -> None:
        """Lightning's ``on_train_end``."""

    def on_save_checkpoint(self, module: FaceRecognitionModule, checkpoint: dict[str, Any]) -> None:
        """Edits the checkpoint Lightning is about to save (called on every rank)."""

    def on_load_checkpoint(self, module: FaceRecognitionModule, checkpoint: dict[str, Any]) -> None:
        """Edits a checkpoint before its state is loaded."""

    def on_before_optimizer_step(self, module: FaceRecognitionModule, optimizer: torch.optim.Optimizer) -> None:
        """After gradients are unscaled, before the optimizer steps."""


class FullClassifier(ClassificationLayer):
    """Margin-softmax layer over all C identities (the paper's choice): ``weight float[C, D]``.

    Args:
        embedding_size: D.
        num_classes: C.
        margin: a margin head or its name (``arcface`` …, built with defaults).
        check_labels: verify labels are in range every step (one host sync per step; off by default).
    """

    def __init__(self, embedding_size: int, num_classes: int, margin: MarginHead | str = "arcface",
                 check_labels: bool = False) -> None:
        super().__init__()
        check_int("embedding_size", embedding_size, 1)
        check_int("num_classes", num_classes, 1)
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.margin = build_margin(margin) if isinstance(margin, str) else margin
        self.check_labels = check_labels
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.normal_(self.weight, 0.0, 0.01)  # as arcface_torch

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of unnormalised ``embeddings float[B, D]`` with ``labels long[B]``."""
        if self.check_labels:
            _check_labels(labels, self.num_classes)
        return margin_cross_entropy(embeddings, self.weight, labels, self.margin)

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}"


class SampledClassifier(FullClassifier):
    """Partial-FC-style layer: each training step uses all positive classes of the batch plus random
    negatives, ``max(round(sample_rate·C), #positives)`` classes in all, on one device (no
    ``torch.distributed``). Labels are remapped to the sampled rows.

    The sampled rows are gathered with a sparse-gradient embedding lookup, so ``weight.grad`` is a sparse
    tensor holding only the sampled rows (no dense C × D gradient). Use
    :class:`fastface_pl.models.optim.RowSparseSGD` (its ``optimizer_class``) to update only those rows' momentum
    and weight decay; plain ``torch.optim.SGD`` would apply weight decay and momentum to every row, as
    arcface_torch's Partial FC does. In eval mode, or with ``sample_rate=1``, every class is used.

    Args:
        embedding_size: D.
        num_classes: C.
        margin: margin head or name.
        sample_rate: fraction of classes per step, in (0, 1].
        check_labels: verify labels are in range every step.
    """

    SETTINGS: ClassVar[dict[str, Any]] = {"sample_rate": 0.1}
    optimizer_class = RowSparseSGD

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> None:
        check_real("sample_rate", settings["sample_rate"], 0.0, 1.0)

    def __init__(self, embedding_size: int, num_classes: int, margin: MarginHead | str = "arcface",
                 sample_rate: float = 0.1, check_labels: bool = False) -> None:
        super().__init__(embedding_size, num_classes, margin, check_labels)
        self.sample_rate = check_real("sample_rate", sample_rate, 0.0, 1.0)
        self.num_sample = max(1, int(round(self.sample_rate * num_classes)))
        self.last_sampled: torch.Tensor | None = None  # sorted class indices of the last training step

    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        """Sorted class indices: every positive class of ``labels`` plus random negatives."""
        positives = torch.unique(labels[labels != IGNORE_LABEL])
        if self.num_sample <= positives.numel():
            return positives
        scores = torch.rand(self.num_classes, device=labels.device)
        scores[positives] = 2.0  # positives always win the top-k
        return torch.topk(scores, k=self.num_sample).indices.sort().values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.check_labels:
            _check_labels(labels, self.num_classes)
        if not self.training:
            return margin_cross_entropy(embeddings, self.weight, labels, self.margin)
        index = self.sample(labels)
        self.last_sampled = index
        rows = F.embedding(index, self.weight, sparse=True)  # [S, D], sparse gradient to self.weight
        remapped = torch.where(labels == IGNORE_LABEL, labels,
                               torch.searchsorted(index, labels.clamp_min(0)))
        return margin_cross_entropy(embeddings, rows, remapped, self.margin)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sample_rate={self.sample_rate}"

