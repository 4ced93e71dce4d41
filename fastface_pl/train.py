"""Train a face-recognition model with the FastFace scheduler.

    python -m fastface_pl.train                                   # the CPU demo (synthetic identities, ~2 min)
    python -m fastface_pl.train +experiment=r100_ms1mv3 data.root=/data/ms1m-retinaface-t1
    python -m fastface_pl.train +experiment=r100_ms1mv3 data.root=... ckpt_path=runs/<date>/<time>-<id>/checkpoints/last.ckpt
    python -m fastface_pl.train +experiment=r100_ms1mv3 data.root=... ckpt_path=runs/<date>/<time>   # its newest
    python -m fastface_pl.train -m scheduler.threshold=2e-5,5e-5,1e-4 scheduler.patience_fraction=0.025,0.05

Each run writes a folder (``runs/<date>/<time>-<id>/`` by default): ``checkpoints/`` (``last.ckpt`` and the one
after every epoch), ``logs/metrics.csv`` (and TensorBoard events where installed), ``config.yaml`` (the
resolved config), ``schedule.png`` (loss, its EMA, the detector signal and threshold, the LR and the
decisions) and ``results.json`` (the final verification accuracies and the scheduler's decisions).

Faults end with a message and an exit code (docs/fault_tolerance.md): 2 for a usage error (a bad config value,
checkpoint or path), 3 when the training diverges, 128 + the signal number after SIGTERM (143) or Ctrl+C
(130), with a checkpoint of the step reached and the command that resumes it.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger("fastface_pl.train")

ACCEPTED_LAYOUTS = (
    "  - InsightFace record files: <root>/train.rec + <root>/train.idx (+ lfw.bin, cfp_fp.bin, agedb_30.bin)\n"
    "  - an image folder: <root>/<identity>/<image>.jpg (WebFace style)\n"
    "  - data.root=synthetic (generated identities, for trying things out)"
)


# keys of the checkpoint's hyper-parameters that a resume restores from the checkpoint (the optimizer state,
# whose parameter groups hold them); every other difference takes the config's value from the resumed step on
RESTORED_FROM_CHECKPOINT = ("lr", "momentum", "weight_decay")
# the F2C pool keeps the size it was saved with (its entries and LRU table are restored as they are)
POOL_FROM_CHECKPOINT = ("dcp_pool_size", "dcp_pool_fraction")
# keys that change the shapes of the weights: a resume with other values cannot load the checkpoint
MODEL_SHAPE_KEYS = ("backbone", "backbone_kwargs", "embedding_size", "num_classes", "classifier")


def _run_id() -> str:
    """A random suffix of the run folder's name, drawn once per process: two runs started in the same second
    never share a folder (``runs/<date>/<time>-<id>``; the multirun sweep folder gets one too)."""
    global _RUN_ID
    if _RUN_ID is None:
        _RUN_ID = os.urandom(3).hex()
    return _RUN_ID


_RUN_ID: Optional[str] = None
if not OmegaConf.has_resolver("fastface_run_id"):
    OmegaConf.register_new_resolver("fastface_run_id", _run_id)


class UsageError(Exception):
    """A problem in the command line or the data that the user must fix; reported without a traceback."""


def validate_config(cfg: DictConfig) -> None:
    """Check the composed config before any data or model is built: every value resolves, the keys and value
    types fit the classes they configure, and the training keys of ``conf/train.yaml`` are in range."""
    from hydra.utils import get_object

    from fastface_pl.config_check import check_arguments

    problems: list[str] = []
    for group in ("trainer", "model", "data", "scheduler"):
        section = {}
        for key in cfg[group]:
            if group == "trainer" and key == "default_root_dir":
                continue  # Hydra's run folder
            try:
                value = OmegaConf.select(cfg[group], str(key), throw_on_resolution_failure=True)
                section[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            except OmegaConfBaseException as err:
                problems.append(f"{group}.{key}: {str(err).splitlines()[0]}")
        if group == "model" and section.get("num_classes") is None:
            section.pop("num_classes", None)  # taken from the data
        try:
            target = get_object(section["_target_"])
        except Exception as err:  # noqa: BLE001  (an unknown _target_: its own message)
            problems.append(f"{group}._target_={section.get('_target_')!r} cannot be imported: {err}")
            continue
        problems += check_arguments(section, target, group)
    checks = {
        "seed": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "checkpoint_every_n_steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "validate_at_end": lambda v: isinstance(v, bool),
        "plot": lambda v: isinstance(v, bool),
        "ckpt_path": lambda v: v is None or isinstance(v, str),
        "divergence.max_nonfinite_steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "divergence.check_every_n_steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    }
    expected = {"seed": "an integer", "validate_at_end": "true/false", "plot": "true/false",
                "ckpt_path": "a path, a run folder, 'last' or null"}
    for key, ok in checks.items():
        value = OmegaConf.select(cfg, key, default=None)
        if not ok(value):
            problems.append(f"{key}={value!r}: expected {expected.get(key, 'an integer >= 1')}")
    if problems:
        raise UsageError("invalid configuration (fix these values on the command line or in the config):\n  "
                         + "\n  ".join(problems))


def _require_dataset(cfg: DictConfig) -> None:
    root = cfg.data.get("root")
    if root is None or str(root).strip() in ("", "???"):
        raise UsageError(
            "no dataset given: this configuration needs data.root=/path/to/dataset (or the environment "
            "variable FASTFACE_DATA_ROOT).\nAccepted layouts:\n" + ACCEPTED_LAYOUTS
        )


def _loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    if "tensorboard" in cfg.loggers:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            log.info("TensorBoard is not installed: logging to CSV only (pip install tensorboard)")
        else:
            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="logs", version="tb"))
    return loggers


def build(cfg: DictConfig, run_dir: Path, resume_from: Optional[dict[str, Any]] = None) -> tuple[Any, Any, Any, Any]:
    """Instantiate (trainer, module, datamodule, lr callback or None) from a composed config.

    ``resume_from``: the checkpoint a resume starts from, to compare its settings with the config's first.
    """
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint

    from fastface_pl.safety import DivergenceGuard, PreemptionCheckpoint

    _require_dataset(cfg)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")  # validates the data before anything is built (layout, labels, classes)

    schedule = instantiate(cfg.scheduler, _convert_="all")
    lr_callback = schedule if isinstance(schedule, Callback) else None
    model_kwargs: dict[str, Any] = {"lr_schedule": None if lr_callback is not None else schedule}
    if cfg.model.get("num_classes") is None:
        model_kwargs["num_classes"] = datamodule.num_classes
    elif int(cfg.model.num_classes) != datamodule.num_classes:
        raise UsageError(
            f"model.num_classes={cfg.model.num_classes} but the data at {cfg.data.root} has "
            f"{datamodule.num_classes} identities: fix model.num_classes (or leave it null to take the data's)"
        )
    module = instantiate(cfg.model, **model_kwargs, _convert_="all")
    if resume_from is not None:
        _compare_with_checkpoint(resume_from, module, datamodule)

    checkpoint_dir = run_dir / "checkpoints"
    callbacks: list[Any] = [
        # one checkpoint per epoch, all kept, and last.ckpt: the state at the latest epoch end (or end of training)
        ModelCheckpoint(dirpath=checkpoint_dir, filename="epoch{epoch:02d}-step{step:07d}",
                        auto_insert_metric_name=False, save_top_k=-1, save_last=True),
        # mid-epoch checkpoints every `checkpoint_every_n_steps` optimizer steps (the two latest kept), so an
        # interrupted run resumes close to where it stopped: ckpt_path=<run>/checkpoints/step<N>.ckpt
        ModelCheckpoint(dirpath=checkpoint_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg.checkpoint_every_n_steps, monitor="step", mode="max", save_top_k=2),
        LearningRateMonitor(logging_interval="step"),
        DivergenceGuard(max_nonfinite_steps=cfg.divergence.max_nonfinite_steps,
                        check_every_n_steps=cfg.divergence.check_every_n_steps),
        PreemptionCheckpoint(dirpath=checkpoint_dir),
    ]
    if lr_callback is not None:
        callbacks.insert(0, lr_callback)
    from fastface_pl.checkpoints import AtomicCheckpointIO  # checkpoints written to a temporary name, then renamed

    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=_loggers(cfg, run_dir),
                          plugins=[AtomicCheckpointIO()])
    return trainer, module, datamodule, lr_callback


def _compare_with_checkpoint(checkpoint: dict[str, Any], module: Any, datamodule: Any) -> None:
    """Before a resume: refuse a model of other shapes, and say which changed settings win."""
    from fastface_pl.checkpoints import differing_hyperparameters

    def common(saved: Any, current: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        saved, current = dict(saved or {}), dict(current or {})
        keys = set(saved) & set(current)
        return {k: saved[k] for k in keys}, {k: current[k] for k in keys}

    differences = differing_hyperparameters(*common(checkpoint.get("hyper_parameters"), module.hparams))
    shape = [d for d in differences if d[0].split(".")[0] in MODEL_SHAPE_KEYS]
    if shape:
        rows = "\n  ".join(f"model.{key}: checkpoint {a!r}, config {b!r}" for key, a, b in shape)
        raise UsageError(f"the checkpoint holds another model than this config builds:\n  {rows}\n"
                         "resume with the settings it was trained with (see config.yaml in its run folder)")
    def winner(key: str) -> str:
        if key in RESTORED_FROM_CHECKPOINT:
            return "the checkpoint's value is used (restored with the optimizer state)"
        if key in POOL_FROM_CHECKPOINT:
            return "the checkpoint's pool size is kept (its entries are restored as they are)"
        return "the config's value is used"

    rows = [(f"model.{key}", a, b, winner(key)) for key, a, b in differences]
    rows += [(f"data.{key}", a, b, "the config's value is used") for key, a, b in
             differing_hyperparameters(*common(checkpoint.get("datamodule_hyper_parameters"), datamodule.hparams))]
    if rows:
        lines = "\n  ".join(f"{key}: checkpoint {a!r}, config {b!r} -> {outcome}" for key, a, b, outcome in rows)
        log.warning("resuming with settings that differ from the checkpoint's:\n  %s", lines)


def resolve_checkpoint(ckpt_path: Optional[str], run_dir: Path) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
    """The checkpoint a run resumes from and its content (read weights-only), or ``(None, None)``.

    ``ckpt_path`` is a checkpoint file, a run folder (or its ``checkpoints/``: the newest checkpoint that loads),
    or ``last``: the newest checkpoint of this run's own folder (a fixed ``hydra.run.dir``, e.g. in a Slurm
    script that requeues itself); a fresh start when that folder has none yet.
    """
    from fastface_pl.checkpoints import CheckpointError, load_lightning_checkpoint, newest_checkpoint

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


def check_writable_folder(path: Path, what: str = "run folder") -> None:
    """Raise :class:`UsageError` unless ``path`` is, or can be created as, a folder this process can write."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"the {what} {path} cannot be created: {existing} is a file, not a folder; "
                         "give another hydra.run.dir=...")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to the {what} {path}: {existing} is not writable (permission denied); "
                         "give a writable hydra.run.dir=... or fix the folder's permissions")


class RunFolderCheck(HydraCallback):
    """Hydra callback: check that the run (or sweep) folder can be written before Hydra creates it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(folder: Any) -> None:
        try:
            check_writable_folder(Path(str(folder)))
        except UsageError as err:
            _fail(str(err), 2)


RUN_FILES = ("config.yaml", "results.json", "schedule.png", "logs/metrics.csv")


def claim_run_folder(run_dir: Path, resume_in_place: bool) -> None:
    """Write ``config.yaml`` only into a folder that holds no run yet; a resume in place (``ckpt_path=last``)
    first renames the earlier run's files (``config.1.yaml``, ``logs/metrics.1.csv`` …) so nothing is lost."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if (run_dir / "config.yaml").exists():
            if not resume_in_place:
                raise UsageError(f"the run folder {run_dir} already holds a run (config.yaml): give another "
                                 "hydra.run.dir, or resume that run in place with ckpt_path=last")
            n = 1
            while any((run_dir / _numbered(name, n)).exists() for name in RUN_FILES):
                n += 1
            for name in RUN_FILES:
                if (run_dir / name).exists():
                    (run_dir / name).rename(run_dir / _numbered(name, n))
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        probe = run_dir / "checkpoints" / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except PermissionError as err:
        raise UsageError(f"cannot write to the run folder {err.filename or run_dir} (permission denied): give a "
                         "writable hydra.run.dir=... or fix the folder's permissions") from None


def _numbered(name: str, n: int) -> str:
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}.{n}.{suffix}" if dot else f"{name}.{n}"


def write_results(run_dir: Path, summary: dict[str, Any]) -> None:
    """``results.json``, strict JSON: a non-finite number (a diverged loss, an undefined accuracy) is ``null``."""
    from fastface_pl.safety import finite_or_none

    from fastface_pl.atomic import write_text_atomic

    write_text_atomic(run_dir / "results.json", json.dumps(finite_or_none(summary), indent=2, allow_nan=False),
                      "results file")


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train (and validate, plot) as the config says; returns a summary (also written to results.json)."""
    import lightning.pytorch as pl

    from fastface_pl.evaluation.report import format_results

    _require_dataset(cfg)
    validate_config(cfg)
    ckpt_path, checkpoint = resolve_checkpoint(cfg.ckpt_path, run_dir)  # before the data and model are built
    claim_run_folder(run_dir, resume_in_place=cfg.ckpt_path == "last")
    pl.seed_everything(cfg.seed, workers=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    trainer, module, datamodule, lr_callback = build(cfg, run_dir, resume_from=checkpoint)
    del checkpoint  # (memory-mapped) read again by Lightning, weights-only
    summary: dict[str, Any] = {"run_dir": str(run_dir), "status": "running",
                               "resumed_from": str(ckpt_path) if ckpt_path else None}
    try:
        import torch

        from fastface_pl.checkpoints import SAFE_GLOBALS, restoring_from

        # Lightning's own load: weights-only, same allow-list; a state the components reject names the file
        with torch.serialization.safe_globals(SAFE_GLOBALS), restoring_from(ckpt_path):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except BaseException as caught:
        from fastface_pl.safety import TrainingDiverged
        from fastface_pl.scheduling.detectors import NonFiniteLossError

        err = caught
        if isinstance(caught, NonFiniteLossError):  # the FastFace callback with on_nonfinite="raise"
            err = TrainingDiverged(int(trainer.global_step), str(caught))
        summary.update(global_step=int(trainer.global_step), **_fault_summary(err, run_dir))
        if trainer.is_global_zero and summary["status"] != "running":
            write_results(run_dir, summary)
        if err is caught:
            raise
        raise err from caught
    summary.update(status="completed", global_step=int(trainer.global_step))
    if lr_callback is not None:
        summary["decisions"] = [list(d) for d in lr_callback.decisions]
        log.info("%d LR decision(s), at optimizer steps %s", len(lr_callback.decisions),
                 [step for step, _, _ in lr_callback.decisions])
    if cfg.validate_at_end:
        results = trainer.validate(module, datamodule=datamodule, verbose=False)
        table, per_set = format_results(results)
        summary["verification"] = per_set
        if trainer.is_global_zero:
            print("\nVerification (10-fold accuracy, VAL@FAR, XNorm):\n" + table)
    if trainer.is_global_zero:
        if cfg.plot:
            from fastface_pl.plotting import plot_run_metrics

            metrics_csv = run_dir / "logs" / "metrics.csv"
            if metrics_csv.is_file():
                name = cfg.scheduler._target_.rsplit(".", 1)[-1].replace("_callback", "")
                plot_run_metrics(metrics_csv, run_dir / "schedule.png",
                                 title=f"{run_dir.name}: {cfg.model.backbone}, {name} scheduler")
                summary["plot"] = str(run_dir / "schedule.png")
        write_results(run_dir, summary)
        print(f"\nRun folder: {run_dir}")
    return summary


def _fault_summary(err: BaseException, run_dir: Path) -> dict[str, Any]:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from fastface_pl.checkpoints import checkpoint_candidates
    from fastface_pl.safety import TrainingDiverged, TrainingInterrupted

    newest = checkpoint_candidates(run_dir)
    if isinstance(err, TrainingDiverged):
        return {"status": "diverged", "diverged_at_step": err.step, "reason": err.reason,
                "last_good_checkpoint": str(newest[0]) if newest else None}
    if isinstance(err, TrainingInterrupted):
        return {"status": "interrupted", "signal": signal.Signals(err.signum).name,
                "checkpoint": str(err.checkpoint) if err.checkpoint else None}
    if isinstance(err, SIGTERMException):
        return {"status": "interrupted", "signal": "SIGTERM", "checkpoint": str(newest[0]) if newest else None}
    from fastface_pl.atomic import DiskFullError  # a save failed for lack of space: the older files are intact

    if isinstance(err, DiskFullError):
        return {"status": "disk_full", "reason": str(err), "checkpoint": str(newest[0]) if newest else None}
    return {}


def resume_command(overrides: list[str], checkpoint: Path) -> str:
    """The command line that resumes this run from ``checkpoint`` (its overrides, ``ckpt_path`` replaced)."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("ckpt_path=", "hydra.run.dir="))]
    return shlex.join(["python", "-m", "fastface_pl.train", *kept, f"ckpt_path={checkpoint}"])


@hydra.main(version_base="1.3", config_path="pkg://fastface_pl.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    import lightning.pytorch  # noqa: F401  (its import installs the log handlers removed here)

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # Hydra's root handler prints them once
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    try:
        run(cfg, run_dir)
    except UsageError as err:
        _fail(str(err), 2)
    except PermissionError as err:
        _fail(f"permission denied: {err.filename or err}: fix its permissions, or point the config elsewhere "
              "(data.root=..., hydra.run.dir=...)", 2)
    except BaseException as err:
        try:
            _exit_on_fault(err, list(HydraConfig.get().overrides.task))  # a diverged or interrupted run
        except _JobDiverged:
            return
        message = _usage_message(err) if isinstance(err, (ValueError, RuntimeError)) else None
        if message is None:
            raise
        _fail(message, 2)  # DatasetError and argument checks: the message says what to fix


def _fail(message: str, code: int) -> None:
    print(f"fastface_pl.train: error: {message.rstrip()}", file=sys.stderr)
    sys.exit(code)


def _usage_message(err: Exception) -> Optional[str]:
    """The message of an error about the user's configuration or data (reported without a traceback), else None."""
    from fastface_pl.checkpoints import CheckpointError, describe_load_error
    from fastface_pl.data.errors import DatasetError
    from fastface_pl.safety import TrainingDiverged

    if isinstance(err, TrainingDiverged):
        return None
    message = str(err).rstrip()
    if isinstance(err, (DatasetError, CheckpointError)) or (isinstance(err, ValueError)
                                                             and type(err).__module__.startswith("fastface_pl")):
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep the reason only
            message = message.splitlines()[-1]
        return message
    if "Error(s) in loading state_dict" in message or "size mismatch" in message:  # a checkpoint of another model
        return (f"the checkpoint does not fit the model this config builds ({describe_load_error(err)}): resume "
                "with the model settings it was trained with (see config.yaml in its run folder)")
    if type(err).__module__.startswith(("lightning", "torch")) and isinstance(err, ValueError):
        return message  # Lightning and torch check the arguments the config passed them
    return None


def _exit_on_fault(err: BaseException, overrides: list[str]) -> None:
    """A diverged or interrupted run: say what happened and what to do, exit with the documented code."""
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from fastface_pl.checkpoints import checkpoint_candidates
    from fastface_pl.safety import EXIT_DIVERGED, TrainingDiverged, TrainingInterrupted

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if isinstance(err, TrainingDiverged):
        from hydra.types import RunMode

        newest = checkpoint_candidates(run_dir)
        keep = (f"The newest checkpoint, {newest[0]}, holds finite weights (checkpoints of non-finite weights "
                "are never written); to resume from it, change model.lr (or trainer.precision) in:\n  "
                f"{resume_command(overrides, newest[0])}") if newest else "No checkpoint was written before it."
        message = (f"{err}.\nTry a lower learning rate (model.lr=...), bf16 instead of fp16 "
                   f"(trainer.precision=bf16-mixed), or gradient clipping (model.clip_grad_norm=...).\n{keep}\n"
                   f"results.json in {run_dir} records it.")
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # the other jobs of the sweep still run; exit 3 at the end
            print(f"fastface_pl.train: error: {message}", file=sys.stderr)
            _DIVERGED_RUNS.append(str(run_dir))
            raise _JobDiverged from None
        _fail(message, EXIT_DIVERGED)
    # a second Ctrl+C: Lightning's KeyboardInterrupt path ignores SIGINT from then on and exits 1
    stopped_at_once = (isinstance(err, SystemExit) and not isinstance(err, SIGTERMException) and err.code == 1
                       and signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
    if stopped_at_once or isinstance(err, (TrainingInterrupted, SIGTERMException, KeyboardInterrupt)):
        signum = getattr(err, "signum", signal.SIGTERM if isinstance(err, SIGTERMException) else signal.SIGINT)
        checkpoint = getattr(err, "checkpoint", None)
        where = "the state of the step reached is in"
        if checkpoint is None:
            candidates = checkpoint_candidates(run_dir)
            checkpoint = candidates[0] if candidates else None
            where = "the step in flight was not saved; the newest checkpoint is"
        name = signal.Signals(signum).name
        if checkpoint is None:
            print(f"fastface_pl.train: stopped by {name}; no checkpoint had been written yet", file=sys.stderr)
        else:
            print(f"fastface_pl.train: stopped by {name}; {where}\n  {checkpoint}\n"
                  f"Resume with:\n  {resume_command(overrides, Path(checkpoint))}", file=sys.stderr)
        sys.exit(128 + int(signum))


class _JobDiverged(Exception):
    """A job of a multirun sweep diverged (reported); the sweep goes on."""


_DIVERGED_RUNS: list[str] = []


def main() -> None:
    """Console entry point (``fastface-train``)."""
    _hydra_main()
    if _DIVERGED_RUNS:  # a sweep finished with diverged jobs
        from fastface_pl.safety import EXIT_DIVERGED

        print(f"fastface_pl.train: {len(_DIVERGED_RUNS)} run(s) of the sweep diverged: {', '.join(_DIVERGED_RUNS)}",
              file=sys.stderr)
        sys.exit(EXIT_DIVERGED)


if __name__ == "__main__":
    main()
