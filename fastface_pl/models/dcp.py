"""F2C's Dynamic Class Pool: a small, gradient-free classification layer written by a gallery network.

Instead of a weight row per identity (C × D), :class:`DynamicClassPool` keeps the features of at most Q
identities (Q ≪ C), two feature slots per identity, written each step by the gallery network (an EMA copy of
the backbone, kept with the pool by :class:`DCPClassifier`, the ``dcp`` layer). See ``docs/f2c.md``.

* **Pool**: ``features float[2, Q, D]``: ``features[r, q]`` is the r-th stored gallery feature of the identity
  held by entry q (L2-normalised).
* **LRU**: ``identity_entry long[C]`` (the entry of each identity, −1 when absent), ``entry_identity long[Q]``,
  ``entry_last_used long[Q]`` (the step that last wrote it, −1 never), ``entry_next_row long[Q]`` (the row the
  next write goes to: rows alternate) and ``entry_rows_filled long[Q]`` (0, 1 or 2 rows hold the identity).
  A new identity takes the least recently used entry (empty entries first) that no identity of the same
  batch holds. Every update is a fixed-shape tensor operation: no Python loop, no dict, no host-device sync.
* **Loss** of probe features against the pool, in fp32 (also under autocast): for a probe whose identity is in
  the pool, the margin softmax (the module's ArcFace/CosFace head) over the Q entries; for one whose identity
  is absent, the push-away loss: the mean of the clipped top-k cosines, ``mean(max(0, topk(cos)))``. Both are
  computed twice, against row 0 and against row 1 (row 0 where the entry holds a single feature), and averaged.

All tables are buffers: checkpoints hold them, ``.to(device)`` moves them. :meth:`write` returns an undo record
and :meth:`restore` rolls the pool and LRU back, as F2C's symmetric step needs after its first pass.

A gallery batch holding a non-finite feature (an fp16 overflow of the gallery network) is never written: once in
the pool it would make every later loss NaN until evicted. Such a write leaves pool and LRU as they were (the
full layer skips such a step likewise) and adds one to ``skipped_writes``; the check is a tensor operation, so
it costs no host-device sync (``docs/f2c.md``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fastface_pl.errors import ConfigurationError
from fastface_pl.models.classifiers import ClassificationLayer
from fastface_pl.models.margins import MarginHead, build_margin
from fastface_pl.argument_checks import check_int, check_real

if TYPE_CHECKING:
    from fastface_pl.models.module import FaceRecognitionModule

__all__ = ["DynamicClassPool", "DCPClassifier", "PoolUndo", "default_pool_size", "default_push_topk"]

_LRU_TABLES = ("entry_identity", "entry_last_used", "entry_next_row", "entry_rows_filled")


def default_pool_size(num_classes: int, fraction: float, minimum: int = 1) -> int:
    """Entries of the pool: ``ceil(fraction · C)``, at least ``minimum`` (the identities of one step's batch)."""
    return max(int(math.ceil(fraction * num_classes)), int(minimum), 1)


def default_push_topk(pool_size: int) -> int:
    """k of the push-away loss as in the F2C reference code: 0.02 % of the pool, clipped to [3, 10] (and ≤ Q)."""
    return min(min(max(int(pool_size * 0.0002), 3), 10), pool_size)


@dataclass
class PoolUndo:
    """What :meth:`DynamicClassPool.write` changed, to put back with :meth:`DynamicClassPool.restore`."""

    lru_tables: dict[str, torch.Tensor]
    identities: torch.Tensor          # indices into identity_entry that were touched
    identity_values: torch.Tensor     # their values before the write
    rows: torch.Tensor                # (row, entry) of the written features
    entries: torch.Tensor
    features: torch.Tensor            # their values before the write
    clock: torch.Tensor


class DynamicClassPool(nn.Module):
    """The Dynamic Class Pool of F2C (CVPR 2022) with its LRU map and loss.

    Args:
        embedding_size: D.
        num_classes: C, the number of identities (sizes the identity → entry table).
        pool_size: Q, the number of identities the pool holds (see :func:`default_pool_size`).
        margin: margin head (or its name) of the softmax over pool entries.
        push_topk: k of the push-away loss (default :func:`default_push_topk`).

    Example::

        pool = DynamicClassPool(512, num_classes=2_000_000, pool_size=20_000, margin="cosface")
        undo = pool.write(gallery_labels, gallery_features)      # no gradient
        loss, present = pool.loss(probe_features, pool.lookup(probe_labels))
    """

    def __init__(self, embedding_size: int, num_classes: int, pool_size: int, margin: MarginHead | str = "cosface",
                 push_topk: int | None = None) -> None:
        super().__init__()
        check_int("embedding_size", embedding_size, 1)
        check_int("num_classes", num_classes, 1)
        check_int("pool_size", pool_size, 1)
        if push_topk is not None:
            check_int("push_topk", push_topk, 1)
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.margin = build_margin(margin) if isinstance(margin, str) else margin
        self._push_topk = push_topk
        self.register_buffer("identity_entry", torch.full((num_classes,), -1, dtype=torch.long))
        self.register_buffer("clock", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_writes", torch.zeros((), dtype=torch.long))
        self._allocate(int(pool_size), torch.device("cpu"))

    # ------------------------------------------------------------------ state
    def _allocate(self, pool_size: int, device: torch.device) -> None:
        self.register_buffer("features", torch.zeros(2, pool_size, self.embedding_size, device=device))
        self.register_buffer("entry_identity", torch.full((pool_size,), -1, dtype=torch.long, device=device))
        self.register_buffer("entry_last_used", torch.full((pool_size,), -1, dtype=torch.long, device=device))
        self.register_buffer("entry_next_row", torch.zeros(pool_size, dtype=torch.long, device=device))
        self.register_buffer("entry_rows_filled", torch.zeros(pool_size, dtype=torch.long, device=device))

    @property
    def pool_size(self) -> int:
        return int(self.features.shape[1])

    @property
    def push_topk(self) -> int:
        return min(self._push_topk, self.pool_size) if self._push_topk else default_push_topk(self.pool_size)

    def resize(self, pool_size: int) -> None:
        """Empties the pool and gives it ``pool_size`` entries (before training starts)."""
        check_int("pool_size", pool_size, 1)
        self._allocate(int(pool_size), self.features.device)
        self.identity_entry.fill_(-1)
        self.clock.zero_()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "features")
        if saved is not None and saved.dim() == 3 and saved.shape[1] != self.pool_size:
            self._allocate(int(saved.shape[1]), self.features.device)  # the checkpoint's pool size wins
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def occupancy(self) -> torch.Tensor:
        """Number of entries holding an identity (a tensor: reading it is a host sync)."""
        return (self.entry_identity >= 0).sum()

    # ------------------------------------------------------------------ LRU + writes
    @torch.no_grad()
    def write(self, labels: torch.Tensor, features: torch.Tensor) -> PoolUndo:
        """Writes gallery ``features float[N, D]`` of identities ``labels long[N]`` into the pool.

        Identities already in the pool keep their entry; the others take the least recently used entries
        (evicting their identities). Each occurrence of an identity writes the entry's next row (rows
        alternate; of more than two occurrences the last two are kept, as a sequential write would). All
        identities of the batch become the most recently used. Returns the undo record of :meth:`restore`.
        A batch with a non-finite feature changes nothing and counts in ``skipped_writes``.

        Raises:
            ValueError: on shape errors, or when the batch holds more images than the pool has entries.
        """
        if labels.dim() != 1 or features.dim() != 2 or features.shape[0] != labels.shape[0]:
            raise ValueError(f"expected labels [N] and features [N, D], got {list(labels.shape)} and "
                             f"{list(features.shape)}")
        if features.shape[1] != self.embedding_size:
            raise ValueError(f"features have D={features.shape[1]}, the pool D={self.embedding_size}")
        n, q = labels.shape[0], self.pool_size
        if n > q:
            raise ValueError(
                f"the gallery batch holds {n} images (all ranks) but the pool has only {q} entries: one step could "
                f"evict identities it has just written; set model.classifier_kwargs.pool_size >= {n} (or a larger pool_fraction)"
            )
        device = self.features.device
        labels = labels.to(device=device, dtype=torch.long)
        features = features.detach().float()
        refused = ~torch.isfinite(features).all()  # a tensor: no host sync
        features = F.normalize(features, dim=1)
        positions = torch.arange(n, device=device)

        # Group the occurrences of each identity (sorted, stable: occurrences keep their batch order).
        order = torch.argsort(labels, stable=True)
        sorted_labels = labels[order]
        first = torch.ones(n, dtype=torch.bool, device=device)
        first[1:] = sorted_labels[1:] != sorted_labels[:-1]
        segment = torch.cumsum(first.long(), 0) - 1
        segment_start = torch.cummax(torch.where(first, positions, torch.zeros_like(positions)), 0).values
        rank = positions - segment_start
        count = torch.zeros(n, dtype=torch.long, device=device).index_add_(0, segment, torch.ones_like(segment))[segment]

        entry_before = self.identity_entry[sorted_labels]
        present = entry_before >= 0

        # Candidate entries for new identities: least recently used first (never-used first, then by index),
        # excluding the entries of identities of this batch.
        taken = torch.zeros(q, dtype=torch.long, device=device).index_add_(
            0, entry_before.clamp_min(0), present.long())
        key = self.entry_last_used * q + torch.arange(q, device=device)
        key = torch.where(taken > 0, torch.full_like(key, torch.iinfo(torch.long).max), key)
        candidates = torch.topk(key, k=n, largest=False, sorted=True).indices
        new_first = first & ~present
        new_rank = (torch.cumsum(new_first.long(), 0) - 1).clamp(0, n - 1)
        new_entry = torch.where(new_first, candidates[new_rank], torch.full_like(new_rank, -1))
        segment_new_entry = torch.full((n,), -1, dtype=torch.long, device=device).scatter_reduce(
            0, segment, new_entry, reduce="amax")[segment]
        entry = torch.where(present, entry_before, segment_new_entry)

        # Evict the identities that held the new identities' entries.
        evicted = self.entry_identity[entry]
        evicts = ~present & (evicted >= 0)
        touched = torch.cat([sorted_labels, torch.where(evicts, evicted, sorted_labels)])
        undo_identities = self.identity_entry[touched].clone()

        start_row = torch.where(present, self.entry_next_row[entry], torch.zeros_like(entry))
        filled_before = torch.where(present, self.entry_rows_filled[entry], torch.zeros_like(entry))
        row = (start_row + rank) % 2
        # Of the occurrences writing the same (row, entry), the last one wins: every duplicate writes its value.
        winner = torch.where((count - 1 - rank) % 2 == 0, count - 1, count - 2)
        source = order[segment_start + winner]
        undo = PoolUndo(
            lru_tables={name: getattr(self, name).clone() for name in _LRU_TABLES},
            identities=touched, identity_values=undo_identities,
            rows=row, entries=entry, features=self.features[row, entry].clone(), clock=self.clock.clone(),
        )

        keep = torch.where(evicts, torch.full_like(evicted, -1), self.identity_entry[sorted_labels])
        self.identity_entry[torch.where(evicts, evicted, sorted_labels)] = keep
        self.identity_entry[sorted_labels] = entry
        self.entry_identity[entry] = sorted_labels
        self.entry_last_used[entry] = self.clock.expand_as(entry)
        self.entry_next_row[entry] = (start_row + count) % 2
        self.entry_rows_filled[entry] = (filled_before + count).clamp_max(2)
        self.features[row, entry] = features[source]
        self.clock += 1
        self._restore(undo, refused)
        self.skipped_writes += refused.long()
        return undo

    @torch.no_grad()
    def restore(self, undo: PoolUndo) -> None:
        """Puts the pool and the LRU back as they were before the :meth:`write` that returned ``undo``."""
        self._restore(undo, None)

    def _restore(self, undo: PoolUndo, when: torch.Tensor | None) -> None:
        """:meth:`restore`, or, with a 0-dim bool ``when``, a restore where it is true (no host sync)."""
        def back(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
            return before if when is None else torch.where(when, before, now)

        self.features[undo.rows, undo.entries] = back(self.features[undo.rows, undo.entries], undo.features)
        self.identity_entry[undo.identities] = back(self.identity_entry[undo.identities], undo.identity_values)
        for name, value in undo.lru_tables.items():
            table = getattr(self, name)
            table.copy_(back(table, value))
        self.clock.copy_(back(self.clock, undo.clock))

    def lookup(self, labels: torch.Tensor) -> torch.Tensor:
        """Pool entry of each identity in ``labels long[N]``, −1 where it is absent."""
        return self.identity_entry[labels.to(device=self.identity_entry.device, dtype=torch.long)]

    # ------------------------------------------------------------------ loss
    def loss(self, probe: torch.Tensor, entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The F2C loss of unnormalised probe features ``float[N, D]`` whose identities sit at ``entries``.

        Returns ``(loss, present_fraction)``: the mean over the two pool rows of (margin softmax over rows whose
        entry is ≥ 0) + (push-away over the others), fp32; and the fraction of probes present in the pool.
        """
        if probe.dim() != 2 or probe.shape[1] != self.embedding_size or entries.shape != probe.shape[:1]:
            raise ValueError(f"expected probe [N, {self.embedding_size}] and entries [N], got {list(probe.shape)} "
                             f"and {list(entries.shape)}")
        with torch.autocast(device_type=probe.device.type, enabled=False):
            probe_hat = F.normalize(probe.float(), dim=1)
            present = entries >= 0
            occupied = self.entry_identity >= 0
            both = (self.entry_rows_filled == 2).unsqueeze(1)
            # Copies: later writes (the next pass, a rollback) change the pool before backward runs.
            first = self.features[0].clone()
            second = torch.where(both, self.features[1], first)
            total = probe_hat.new_zeros(())
            for weight in (first, second):
                cosine = (probe_hat @ weight.t()).clamp(-1.0, 1.0)
                total = total + self._margin_softmax(cosine, entries, present, occupied)
                total = total + self._push_away(cosine, present, occupied)
            fraction = present.float().mean()
        return total / 2, fraction

    def _margin_softmax(self, cosine: torch.Tensor, entries: torch.Tensor, present: torch.Tensor,
                        occupied: torch.Tensor) -> torch.Tensor:
        s = self.margin.s
        column = entries.clamp_min(0).unsqueeze(1)
        target = self.margin.target_logit(cosine.gather(1, column).squeeze(1))
        logits = (cosine * s).masked_fill(~occupied, float("-inf"))
        logits = logits.scatter(1, column, (s * target).unsqueeze(1))
        per_row = torch.logsumexp(logits, dim=1) - s * target
        per_row = torch.where(present, per_row, torch.zeros_like(per_row))
        return per_row.sum() / present.sum().clamp_min(1)

    def _push_away(self, cosine: torch.Tensor, present: torch.Tensor, occupied: torch.Tensor) -> torch.Tensor:
        masked = cosine.masked_fill(~occupied, float("-inf"))
        hardest = torch.topk(masked, k=self.push_topk, dim=1).values.clamp_min(0.0).mean(dim=1)
        absent = ~present
        hardest = torch.where(absent, hardest, torch.zeros_like(hardest))
        return hardest.sum() / absent.sum().clamp_min(1)

    def forward(self, probe: torch.Tensor, probe_labels: torch.Tensor, gallery: torch.Tensor,
                gallery_labels: torch.Tensor, rollback: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One F2C pass: write the gallery features, score the probes against the pool; ``rollback`` undoes
        the write afterwards. Returns ``(loss, present_fraction)``."""
        undo = self.write(gallery_labels, gallery)
        result = self.loss(probe, self.lookup(probe_labels))
        if rollback:
            self.restore(undo)
        return result

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
                f"pool_size={self.pool_size}, push_topk={self.push_topk}")


class DCPClassifier(DynamicClassPool, ClassificationLayer):
    """The ``dcp`` classification layer: the pool, F2C's gallery network and its symmetric training step.

    The gallery network (``gallery_backbone``) is an EMA of the module's backbone, never trained by gradients:
    ``gallery ← m · gallery + (1 − m) · probe``, parameter by parameter, once per optimizer step (BatchNorm
    statistics are the gallery's own, as in the F2C reference).

    Args:
        embedding_size: D.
        num_classes: C.
        margin: margin head (or its name) of the softmax over pool entries.
        backbone: the module's backbone, copied as the gallery network's start.
        pool_fraction: pool entries as a fraction of ``num_classes`` when ``pool_size`` is None.
        pool_size: pool entries; a pool smaller than one step's gallery images over all ranks is enlarged at
            :meth:`setup_fit` when it came from ``pool_fraction``, an error when given.
        momentum: m, the gallery network's EMA momentum.
        push_topk: k of the push-away loss (default :func:`default_push_topk`).
    """

    SETTINGS: ClassVar[dict[str, Any]] = {"pool_fraction": 0.01, "pool_size": None, "momentum": 0.99,
                                          "push_topk": None}
    needs_identity_pairs = True

    def __init__(self, embedding_size: int, num_classes: int, margin: MarginHead | str, backbone: nn.Module,
                 pool_fraction: float = 0.01, pool_size: int | None = None, momentum: float = 0.99,
                 push_topk: int | None = None) -> None:
        super().__init__(embedding_size, num_classes, pool_size or default_pool_size(num_classes, pool_fraction),
                         margin, push_topk)
        self.pool_fraction, self.requested_pool_size, self.momentum = pool_fraction, pool_size, float(momentum)
        self.gallery_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self._gallery_step: int | None = None  # the optimizer step of the last gallery update
        self._skipped_reported = 0  # refused pool writes already warned about

    @classmethod
    def check_settings(cls, settings: dict[str, Any]) -> None:
        check_real("pool_fraction", settings["pool_fraction"], 0.0, 1.0)
        check_real("momentum", settings["momentum"], 0.0, 1.0, low_open=False)
        check_int("pool_size", settings["pool_size"], 1, allow_none=True, none_means="from pool_fraction")
        check_int("push_topk", settings["push_topk"], 1, allow_none=True, none_means="0.02 % of the pool")

    @classmethod
    def from_settings(cls, embedding_size: int, num_classes: int, margin: MarginHead, settings: dict[str, Any],
                      backbone: nn.Module) -> DCPClassifier:
        return cls(embedding_size, num_classes, margin, backbone, **settings)

    def ddp_ignored(self) -> list[str]:
        """The pool's tables: every rank writes the same gathered features into its pool, no need to broadcast."""
        return [name for name, _ in self.named_buffers(recurse=False)]

    # ------------------------------------------------------------------ training
    def training_loss(self, module: FaceRecognitionModule, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """F2C's symmetric step: view A (even positions) is probe against the pool written from view B (odd
        positions), with pool and LRU rolled back afterwards; then B is probe against A's gallery features,
        which stay in the pool. The loss is the mean of the two passes."""
        if images.shape[0] % 2:
            raise ConfigurationError(f"classifier='dcp' needs an even batch of identity pairs, got {images.shape[0]} images; "
                             "use an even batch_size with FaceDataModule (it lays out the pairs itself)")
        self._update_gallery(module)
        view_a, view_b = images[0::2], images[1::2]
        labels_a, labels_b = labels[0::2], labels[1::2]
        probe_a = module.training_embeddings(view_a)
        gallery_b, gallery_labels_b = self._gallery_features(module, view_b, labels_b)
        loss_a, present_a = self(probe_a, labels_a, gallery_b, gallery_labels_b, rollback=True)
        probe_b = module(view_b)
        gallery_a, gallery_labels_a = self._gallery_features(module, view_a, labels_a)
        loss_b, present_b = self(probe_b, labels_b, gallery_a, gallery_labels_a, rollback=False)
        module.log("train/dcp_present", (present_a + present_b) / 2, on_step=True, on_epoch=False)
        module.log("train/dcp_skipped_writes", self.skipped_writes.float(), on_step=True, on_epoch=False)
        return (loss_a + loss_b) / 2

    def _gallery_features(self, module: FaceRecognitionModule, images: torch.Tensor,
                          labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gallery features and labels of ``images``, gathered over all ranks (rank order), no gradient."""
        with torch.no_grad():
            if module.hparams.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            features = self.gallery_backbone(images).float()
            trainer = module._trainer  # None outside Trainer.fit (e.g. a step called by hand)
            if trainer is not None and trainer.world_size > 1:
                features = module.all_gather(features).reshape(-1, features.shape[1])
                labels = module.all_gather(labels).reshape(-1)
        return features, labels

    @torch.no_grad()
    def _update_gallery(self, module: FaceRecognitionModule) -> None:
        """The EMA update of the gallery network from ``module.backbone``, once per optimizer step.

        Called by every micro-batch, it updates only at the first one after an optimizer step (the probe has not
        changed since): with ``accumulate_grad_batches=N`` the momentum per optimizer step stays m, not mᴺ. Outside
        a Trainer (a step called by hand) every call updates.
        """
        trainer = module._trainer
        if trainer is not None:
            step = int(trainer.global_step)  # a Python counter: no host sync
            if step == self._gallery_step:
                return
            self._gallery_step = step
        gallery = list(self.gallery_backbone.parameters())
        probe = [p.detach() for p in module.backbone.parameters()]
        torch._foreach_mul_(gallery, self.momentum)
        torch._foreach_add_(gallery, probe, alpha=1.0 - self.momentum)

    # ------------------------------------------------------------------ hooks of FaceRecognitionModule
    @staticmethod
    def _gallery_images_per_step(module: FaceRecognitionModule) -> int | None:
        """The gallery images of one step over all ranks (half the datamodule's batch per rank), None unknown."""
        batch_size = getattr(getattr(module.trainer, "datamodule", None), "batch_size", None)
        if not isinstance(batch_size, int):
            return None
        return (batch_size // 2) * max(1, int(module.trainer.world_size))

    def setup_fit(self, module: FaceRecognitionModule) -> None:
        """Enlarges a pool from ``pool_fraction`` to hold one step's gallery view of all ranks (a given
        ``pool_size`` that is too small raises), before a checkpoint loads."""
        from lightning.pytorch.utilities import rank_zero_info

        needed = self._gallery_images_per_step(module)
        if needed is None or needed <= self.pool_size:
            return
        if self.requested_pool_size is not None:
            raise ConfigurationError(
                f"classifier_kwargs.pool_size={self.requested_pool_size} is smaller than one step's gallery view "
                f"({needed} images over all ranks); set pool_size >= {needed} or leave it null"
            )
        rank_zero_info(f"F2C pool: {self.pool_size} entries ({self.pool_fraction:g} of {self.num_classes} "
                       f"identities) raised to {needed}, the gallery images of one step")
        self.resize(needed)
        self.requested_pool_size = needed
        module.hparams.classifier_kwargs["pool_size"] = needed  # checkpoints rebuild the same pool

    def on_fit_start(self, module: FaceRecognitionModule) -> None:
        """Refuses a pool (from a checkpoint) smaller than one step's gallery view."""
        needed = self._gallery_images_per_step(module)
        if needed is not None and needed > self.pool_size:
            raise ConfigurationError(
                f"the F2C pool has {self.pool_size} entries (from the checkpoint) but one step writes "
                f"{needed} gallery images over all ranks; resume with the batch size and devices it was "
                "trained with, or start a new run"
            )

    def on_train_start(self, module: FaceRecognitionModule) -> None:
        """After a resume, warn only about the refused writes of this run."""
        self._skipped_reported = int(self.skipped_writes)

    def on_train_epoch_end(self, module: FaceRecognitionModule) -> None:
        """Warns when gallery writes were refused this epoch (non-finite features; one read per epoch)."""
        from lightning.pytorch.utilities import rank_zero_warn

        skipped = int(self.skipped_writes)
        if skipped > self._skipped_reported:
            rank_zero_warn(
                f"F2C pool: {skipped - self._skipped_reported} gallery write(s) refused this epoch ({skipped} in "
                "all) because the gallery network gave non-finite features (e.g. an fp16 overflow); the pool kept "
                "its previous features. Many refusals mean the gallery network has diverged: lower the learning "
                "rate or train in bf16/fp32"
            )
        self._skipped_reported = skipped
