"""Train a face-recognition model with the FastFace scheduler.

    python -m fastface_pl.train                                   # the CPU demo (synthetic identities, about 70 s)
    python -m fastface_pl.train trainer=ddp trainer.accelerator=cpu trainer.devices=2   # the demo on 2 CPU ranks (DDP)
    python -m fastface_pl.train +experiment=r100_ms1mv3 data.root=/data/ms1m-retinaface-t1
    python -m fastface_pl.train +experiment=r100_ms1mv3 data.root=... ckpt_path=runs/<date>/<time>-<id>/checkpoints/last.ckpt
    python -m fastface_pl.train +experiment=r100_ms1mv3 data.root=... ckpt_path=runs/<date>/<time>   # its newest
    python -m fastface_pl.train -m scheduler.threshold=2e-5,5e-5,1e-4 scheduler.patience_fraction=0.025,0.05

Each run writes a folder (``runs/<date>/<time>-<id>/`` by default): ``checkpoints/`` (``last.ckpt`` and the one
after every epoch), ``logs/metrics.csv`` (and TensorBoard events where installed), ``config.yaml`` (the
resolved config), ``schedule.png`` (loss, its EMA, the detector signal and threshold, the LR and the
decisions) and ``results.json`` (the final verification accuracies and the scheduler's decisions).
Under DDP (``trainer=ddp``) the other ranks train in rank 0's folder and only rank 0 writes these files.

Faults end with a message and an exit code (:mod:`fastface_pl.faults`, docs/fault_tolerance.md): 2 for a usage
error (a bad config value, checkpoint or path, a run folder another run is writing), 3 when the training diverges,
128 + the signal number after SIGTERM (143) or Ctrl+C (130), with a checkpoint of the step reached and the command
that resumes it. A crash (a bug) exits 1 with its traceback.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from fastface_pl.checkpoints import SAFE_GLOBALS, AtomicCheckpointIO, restoring_from
from fastface_pl.config_check import check_group_choices, require_dataset, validate_config
from fastface_pl.data.bin_format import check_enough_pairs
from fastface_pl.evaluation.report import format_results
from fastface_pl.errors import EXIT_USAGE, UsageError
from fastface_pl.faults import classify_fault, exit_for, fail
from fastface_pl.plotting import plot_run_metrics
from fastface_pl.resume import compare_with_checkpoint, resolve_checkpoint
from fastface_pl.runs import claim_run_folder, is_launching_rank, lock_run_folder, write_results
from fastface_pl.safety import DistributedFaults, DivergenceGuard, PreemptionCheckpoint, end_started_ranks

log = logging.getLogger("fastface_pl.train")
_job_started = False


def build(cfg: DictConfig, run_dir: Path, resume_from: Optional[dict[str, Any]] = None) -> tuple[Any, Any, Any, Any]:
    """Instantiate (trainer, module, datamodule, lr callback or None) from a composed, validated config.

    ``resume_from``: the checkpoint a resume starts from, to compare its settings with the config's first.
    """
    schedule = instantiate(cfg.scheduler, _convert_="all")
    lr_callback = schedule if isinstance(schedule, Callback) else None
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")  # reads the data once: layout, labels, classes

    num_classes = cfg.model.get("num_classes")
    if num_classes is not None and int(num_classes) != datamodule.num_classes:
        raise UsageError(f"model.num_classes={num_classes} but the data at {cfg.data.root} has "
                         f"{datamodule.num_classes} identities: fix model.num_classes (or leave it null to take the data's)")
    module = instantiate(cfg.model, num_classes=datamodule.num_classes,
                         lr_schedule=None if lr_callback is not None else schedule, _convert_="all")
    if resume_from is not None:
        compare_with_checkpoint(resume_from, module, datamodule)

    checkpoints = run_dir / "checkpoints"
    callbacks: list[Any] = [
        # one checkpoint per epoch, all kept, and last.ckpt: the state at the latest epoch end (or end of training)
        # (no versioned names: a resume in a moved run folder replaces last.ckpt, not writes last-v1.ckpt beside it)
        ModelCheckpoint(dirpath=checkpoints, filename="epoch{epoch:02d}-step{step:07d}",
                        auto_insert_metric_name=False, save_top_k=-1, save_last=True, enable_version_counter=False),
        # mid-epoch checkpoints every `checkpoint_every_n_steps` optimizer steps (the two latest kept, across
        # resumes too), so an interrupted run resumes close to where it stopped: ckpt_path=<run>/checkpoints/step<N>.ckpt
        StepCheckpoints(dirpath=checkpoints, filename="step{step:07d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg.checkpoint_every_n_steps, monitor="step", mode="max", save_top_k=2,
                        enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
        DivergenceGuard(max_nonfinite_steps=cfg.divergence.max_nonfinite_steps,
                        check_every_n_steps=cfg.divergence.check_every_n_steps),
        PreemptionCheckpoint(dirpath=checkpoints),
    ]
    if lr_callback is not None:
        callbacks.insert(0, lr_callback)
    callbacks.insert(0, DistributedFaults())  # first: before a SIGTERM checkpoint is saved in on_exception
    # checkpoints are written to a temporary name and renamed: a full disk never leaves a truncated one
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=_loggers(cfg, run_dir),
                          plugins=[AtomicCheckpointIO()])
    return trainer, module, datamodule, lr_callback


class StepCheckpoints(ModelCheckpoint):
    """The mid-epoch checkpoints ``step<N>.ckpt``: after each save only the ``save_top_k`` of the highest steps in
    the folder are kept, those of earlier runs resumed in place included (Lightning forgets them when the run
    folder moved, or the run was stopped before it saved its state)."""

    def _save_checkpoint(self, trainer: "pl.Trainer", filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero and self.dirpath is not None and self.save_top_k > 0:
            steps = sorted(Path(self.dirpath).glob("step[0-9]*.ckpt"), key=lambda p: (len(p.stem), p.stem))
            for old in steps[:-self.save_top_k]:
                old.unlink(missing_ok=True)


def _loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    if "tensorboard" in cfg.loggers:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            log.info("TensorBoard is not installed: logging to CSV only (pip install tensorboard)")
        else:
            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="logs", version="tb"))
    return loggers


def run(cfg: DictConfig, run_dir: Path, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train (and validate, plot) as the config says; returns a summary (also written to results.json).

    A fault is recorded in results.json (diverged, interrupted) and raised again.
    """
    require_dataset(cfg)
    validate_config(cfg)  # before any data is read
    # Under DDP only rank 0 locks and claims the run folder and writes its files; the other ranks (started by
    # Lightning at trainer.fit with rank 0's hydra.run.dir, or by torchrun/Slurm) train in the same folder.
    lock = lock_run_folder(run_dir) if is_launching_rank() else None  # a second writer is refused at once
    try:
        return _run(cfg, run_dir, overrides)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg: DictConfig, run_dir: Path, overrides: tuple[str, ...]) -> dict[str, Any]:
    ckpt_path, checkpoint = resolve_checkpoint(cfg.ckpt_path, run_dir)  # before the data and model are built
    launching = is_launching_rank()
    if launching:
        claim_run_folder(run_dir, resume_in_place=cfg.ckpt_path == "last")
    pl.seed_everything(cfg.seed, workers=True)
    if launching:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    trainer, module, datamodule, lr_callback = build(cfg, run_dir, resume_from=checkpoint)
    if cfg.validate_at_end or trainer.limit_val_batches:  # before training, not after it
        check_enough_pairs(datamodule.val_datasets, "remove them from data.val_sets (or replace them)")
    del checkpoint  # (memory-mapped) read again by Lightning, weights-only
    summary: dict[str, Any] = {"run_dir": str(run_dir), "status": "running",
                               "resumed_from": str(ckpt_path) if ckpt_path else None}
    try:
        # Lightning's own load: weights-only, same allow-list; a state the components reject names the file
        with torch.serialization.safe_globals(SAFE_GLOBALS), restoring_from(ckpt_path):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except BaseException as err:
        if isinstance(err, SIGTERMException):  # under DDP, SIGTERM's checkpoint is saved in on_exception
            saved = [c.checkpoint for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint) and c.checkpoint]
            if saved:
                err.checkpoint = saved[0]
        outcome = classify_fault(err, run_dir, overrides, step=int(trainer.global_step))
        if outcome is not None and outcome.record and trainer.is_global_zero:
            write_results(run_dir, {**summary, "global_step": int(trainer.global_step), **outcome.record})
        end_started_ranks(trainer)
        raise
    if trainer.global_step == 0:
        raise UsageError("the run trained no optimizer step (trainer.max_epochs, trainer.max_steps or "
                         "trainer.limit_train_batches leave none): nothing was trained or saved")
    summary.update(status="completed", global_step=int(trainer.global_step))
    if lr_callback is not None:
        summary["decisions"] = [list(d) for d in lr_callback.decisions]
        if lr_callback.stop_step is not None and trainer.global_step >= lr_callback.stop_step:
            summary.update(stopped_at=int(trainer.global_step), stop_reason=lr_callback.stop_reason)
        if trainer.is_global_zero:
            log.info("%d LR decision(s), at optimizer steps %s", len(lr_callback.decisions),
                     [step for step, _, _ in lr_callback.decisions])
    if cfg.validate_at_end:  # under DDP every rank validates its contiguous block of the pairs
        table, summary["verification"] = format_results(trainer.validate(module, datamodule=datamodule, verbose=False))
        if trainer.is_global_zero:
            print("\nVerification (10-fold accuracy, VAL@FAR, XNorm):\n" + table)
    if trainer.is_global_zero:
        metrics_csv = run_dir / "logs" / "metrics.csv"
        if cfg.plot and metrics_csv.is_file():
            plot_run_metrics(metrics_csv, run_dir / "schedule.png",
                             title=f"{run_dir.name}: {cfg.model.backbone}, {_schedule_name(cfg)} scheduler")
            summary["plot"] = str(run_dir / "schedule.png")
        write_results(run_dir, summary)
        print(f"\nRun folder: {run_dir}")
    return summary


def _schedule_name(cfg: DictConfig) -> str:
    """The schedule's name for the plot title: the detector (fastface, moving_haar) or the fixed schedule's."""
    return str(cfg.scheduler.get("detector") or cfg.scheduler.get("name") or cfg.scheduler._target_.rsplit(".")[-1])


def _pass_sweep_folder_to_ranks() -> None:
    """In a sweep (``-m``) under DDP, Lightning starts the other ranks with this process's command line: they run
    the same sweep, one job beside each of rank 0's. Give them this sweep's folder: its default name holds the time
    and a random id, which a new process would draw again (Lightning passes ``hydra.run.dir`` only)."""
    argument = f'hydra.sweep.dir="{HydraConfig.get().sweep.dir}"'
    if argument not in sys.argv:
        sys.argv.append(argument)


@hydra.main(version_base="1.3", config_path="pkg://fastface_pl.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> Optional[dict[str, Any]]:
    """One run (one job of a sweep): its summary, or ``{"status": "diverged", ...}`` for a diverged sweep job."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # Hydra's root handler prints them once
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    # the verification metrics gather every rank's pairs before they are computed: the same value on each rank
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/.*sync_dist=True")
    if not is_launching_rank():  # rank 0 tells the run's story; the other ranks say only what goes wrong
        logging.getLogger("fastface_pl").setLevel(logging.WARNING)
    elif HydraConfig.get().mode == RunMode.MULTIRUN:
        _pass_sweep_folder_to_ranks()
    overrides = tuple(HydraConfig.get().overrides.task)
    global _job_started
    _job_started = True  # from here on, Hydra's exit 1 is a crash of the job, not a config that did not compose
    try:
        return run(cfg, run_dir, overrides)
    except BaseException as err:
        outcome = classify_fault(err, run_dir, overrides)  # a fault of trainer.fit: as classified there
        if outcome is None:
            raise  # a crash: its traceback
        if outcome.status == "diverged" and HydraConfig.get().mode == RunMode.MULTIRUN:
            print(f"fastface_pl.train: error: {outcome.message}", file=sys.stderr)
            return {"status": "diverged", "run_dir": str(run_dir)}  # the sweep goes on; exit 3 at its end
        exit_for(outcome, rank=None if is_launching_rank() else rank_zero_only.rank)


def main() -> None:
    """Console entry point (``fastface-train``). A config that does not compose (an unknown group choice, key or
    syntax) exits 2, as every usage error does, with Hydra's message (and a group's options)."""
    from hydra._internal.utils import get_args_parser

    args, unknown = get_args_parser().parse_known_args(sys.argv[1:])
    try:
        check_group_choices([*args.overrides, *(a for a in unknown if not a.startswith("-"))])
    except UsageError as err:
        fail(str(err), err.exit_code)
    try:
        _hydra_main()
    except SystemExit as stop:
        if stop.code == 1 and not _job_started:  # the config did not compose (Hydra said why above)
            fail(None, EXIT_USAGE)
        raise  # a crash of the job: exit 1, after Hydra printed its traceback


if __name__ == "__main__":
    main()
