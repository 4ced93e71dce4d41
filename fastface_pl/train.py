"""Train a face-recognition model with the FastFace scheduler.

    python -m fastface_pl.train                                   # the CPU demo (synthetic identities, ~2 min)
    python -m fastface_pl.train +experiment=r100_ms1mv3 data.root=/data/ms1m-retinaface-t1
    python -m fastface_pl.train +experiment=r100_ms1mv3 data.root=... ckpt_path=runs/<date>/<time>/checkpoints/last.ckpt
    python -m fastface_pl.train -m scheduler.threshold=2e-5,5e-5,1e-4 scheduler.patience_fraction=0.025,0.05

Each run writes a folder (``runs/<date>/<time>/`` by default): ``checkpoints/`` (``last.ckpt`` and the one
after every epoch), ``logs/metrics.csv`` (and TensorBoard events where installed), ``config.yaml`` (the
resolved config), ``schedule.png`` (loss, its EMA, the detector signal and threshold, the LR and the
decisions) and ``results.json`` (the final verification accuracies and the scheduler's decisions).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("fastface_pl.train")

ACCEPTED_LAYOUTS = (
    "  - InsightFace record files: <root>/train.rec + <root>/train.idx (+ lfw.bin, cfp_fp.bin, agedb_30.bin)\n"
    "  - an image folder: <root>/<identity>/<image>.jpg (WebFace style)\n"
    "  - data.root=synthetic (generated identities, for trying things out)"
)


class UsageError(Exception):
    """A problem in the command line or the data that the user must fix; reported without a traceback."""


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


def build(cfg: DictConfig, run_dir: Path) -> tuple[Any, Any, Any, Any]:
    """Instantiate (trainer, module, datamodule, lr callback or None) from a composed config."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint

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
    ]
    if lr_callback is not None:
        callbacks.insert(0, lr_callback)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=_loggers(cfg, run_dir))
    return trainer, module, datamodule, lr_callback


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train (and validate, plot) as the config says; returns a summary (also written to results.json)."""
    import lightning.pytorch as pl

    from fastface_pl.evaluation.report import format_results

    pl.seed_everything(cfg.seed, workers=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():  # before the data and model are built
        raise UsageError(f"ckpt_path={cfg.ckpt_path} is not a file: give a checkpoint written by an earlier run")
    trainer, module, datamodule, lr_callback = build(cfg, run_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)

    summary: dict[str, Any] = {"run_dir": str(run_dir), "global_step": int(trainer.global_step)}
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
        (run_dir / "results.json").write_text(json.dumps(summary, indent=2))
        print(f"\nRun folder: {run_dir}")
    return summary


@hydra.main(version_base="1.3", config_path="pkg://fastface_pl.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    import lightning.pytorch  # noqa: F401  (its import installs the log handlers removed here)

    from fastface_pl.data.errors import DatasetError

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # Hydra's root handler prints them once
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    try:
        run(cfg, run_dir)
    except UsageError as err:
        print(f"fastface_pl.train: error: {err}", file=sys.stderr)
        sys.exit(2)
    except ValueError as err:  # DatasetError and argument checks: the message says what to fix
        if isinstance(err, DatasetError) or type(err).__module__.startswith("fastface_pl"):
            message = str(err).rstrip()
            if "Original Traceback" in message:  # raised in a DataLoader worker: keep the reason only
                message = message.splitlines()[-1]
            print(f"fastface_pl.train: error: {message}", file=sys.stderr)
            sys.exit(2)
        raise


def main() -> None:
    """Console entry point (``fastface-train``)."""
    _hydra_main()


if __name__ == "__main__":
    main()
