"""Resuming a run: which checkpoint ``ckpt_path`` names, and how its settings compare with the config's.

``ckpt_path`` is a checkpoint file, a run folder (or its ``checkpoints/``: the newest checkpoint that loads), or
``last``: the newest checkpoint of this run's own folder (docs/fault_tolerance.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from fastface_pl.checkpoints import (CheckpointError, differing_hyperparameters, load_lightning_checkpoint,
                                     newest_checkpoint)
from fastface_pl.errors import UsageError

__all__ = ["MODEL_SHAPE_KEYS", "POOL_FROM_CHECKPOINT", "RESTORED_FROM_CHECKPOINT", "compare_with_checkpoint",
           "resolve_checkpoint"]

log = logging.getLogger("fastface_pl.train")

# keys of the checkpoint's hyper-parameters that a resume restores from the checkpoint (the optimizer state,
# whose parameter groups hold them); every other difference takes the config's value from the resumed step on
RESTORED_FROM_CHECKPOINT = ("lr", "momentum", "weight_decay")
# the F2C pool keeps the size it was saved with (its entries and LRU table are restored as they are)
POOL_FROM_CHECKPOINT = ("classifier_kwargs.pool_size", "classifier_kwargs.pool_fraction")
# keys that change the shapes of the weights: a resume with other values cannot load the checkpoint
MODEL_SHAPE_KEYS = ("backbone", "backbone_kwargs", "embedding_size", "num_classes", "classifier")


def resolve_checkpoint(ckpt_path: Optional[str], run_dir: Path) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
    """The checkpoint a run resumes from and its content (read weights-only), or ``(None, None)``.

    ``ckpt_path=last`` starts fresh when this run's folder has no checkpoint yet (a fixed ``hydra.run.dir``, e.g.
    a Slurm script that requeues itself).
    """
    if ckpt_path is None:
        return None, None
    folder = run_dir if ckpt_path == "last" else Path(ckpt_path)
    if ckpt_path != "last" and not folder.exists():
        raise UsageError(f"ckpt_path={ckpt_path} is not a file: give a checkpoint written by an earlier run "
                         "(or its run folder, or ckpt_path=last)")
    if ckpt_path == "last" or folder.is_dir():
        skipped: list[tuple[Path, str]] = []
        found = newest_checkpoint(folder, skipped=skipped)
        for path, reason in skipped:
            log.warning("passing over %s: %s", path, reason)
        if found is None:
            if ckpt_path == "last":
                log.info("ckpt_path=last: no checkpoint in %s yet, starting from scratch", run_dir)
                return None, None
            raise UsageError(f"ckpt_path={ckpt_path}: no usable checkpoint in this folder or its checkpoints/")
        log.info("resuming from %s (the newest checkpoint of %s)", found[0], folder)
        return found
    try:
        return folder, load_lightning_checkpoint(folder, what=f"ckpt_path={ckpt_path}:")
    except CheckpointError as err:
        raise UsageError(str(err)) from None


def _common(saved: Any, current: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    saved, current = dict(saved or {}), dict(current or {})
    keys = set(saved) & set(current)
    return {k: saved[k] for k in keys}, {k: current[k] for k in keys}


def _winner(key: str) -> str:
    if key in RESTORED_FROM_CHECKPOINT:
        return "the checkpoint's value is used (restored with the optimizer state)"
    if key in POOL_FROM_CHECKPOINT:
        return "the checkpoint's pool size is kept (its entries are restored as they are)"
    return "the config's value is used"


def compare_with_checkpoint(checkpoint: dict[str, Any], module: Any, datamodule: Any) -> None:
    """Before a resume: refuse a model of other shapes, and say which changed settings win."""
    differences = differing_hyperparameters(*_common(checkpoint.get("hyper_parameters"), module.hparams))
    shape = [d for d in differences if d[0].split(".")[0] in MODEL_SHAPE_KEYS]
    if shape:
        rows = "\n  ".join(f"model.{key}: checkpoint {a!r}, config {b!r}" for key, a, b in shape)
        raise UsageError(f"the checkpoint holds another model than this config builds:\n  {rows}\n"
                         "resume with the settings it was trained with (see config.yaml in its run folder)")
    rows = [(f"model.{key}", a, b, _winner(key)) for key, a, b in differences]
    rows += [(f"data.{key}", a, b, "the config's value is used") for key, a, b in
             differing_hyperparameters(*_common(checkpoint.get("datamodule_hyper_parameters"), datamodule.hparams))]
    if rows:
        lines = "\n  ".join(f"{key}: checkpoint {a!r}, config {b!r} -> {outcome}" for key, a, b, outcome in rows)
        log.warning("resuming with settings that differ from the checkpoint's:\n  %s", lines)
