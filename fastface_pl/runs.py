"""Run folders: their names, the checks before Hydra creates them, claiming one, and ``results.json``.

Each run writes ``runs/<date>/<time>-<id>/`` (``conf/train.yaml``'s ``hydra.run.dir``): ``config.yaml``,
``checkpoints/``, ``logs/metrics.csv``, ``schedule.png`` and ``results.json``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from fastface_pl.atomic import write_json_atomic
from fastface_pl.errors import EXIT_DIVERGED, UsageError
from fastface_pl.faults import fail
from fastface_pl.locks import FolderInUseError, FolderLock, remove_stale_temporaries

__all__ = ["RANK_VARIABLES", "RUN_FILES", "RUN_LOCK_NAME", "RunFolderCheck", "check_writable_folder",
           "claim_run_folder", "is_launching_rank", "lock_run_folder", "run_id", "write_results"]

RUN_FILES = ("config.yaml", "results.json", "schedule.png", "logs/metrics.csv")
RUN_LOCK_NAME = ".fastface_run.lock"
# the environment variables that give a process its rank under DDP: torchrun (RANK, LOCAL_RANK, GROUP_RANK), Slurm
# (SLURM_PROCID), Lightning's own launcher (LOCAL_RANK, NODE_RANK) and LSF (JSM_NAMESPACE_RANK)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_launching_rank() -> bool:
    """Whether this process is global rank 0, as the environment tells before any trainer exists.

    Lightning's ``ddp`` launcher starts the other ranks at ``trainer.fit``, with ``LOCAL_RANK`` (and ``NODE_RANK``)
    set; torchrun and Slurm set theirs for every rank. A process with no such variable runs alone: rank 0.
    """
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value and value != "0":
            return False
    return True


@functools.lru_cache(maxsize=None)
def run_id() -> str:
    """A random suffix of the run folder's name, drawn once per process: two runs started in the same second
    never share a folder (``runs/<date>/<time>-<id>``; the multirun sweep folder gets one too)."""
    return os.urandom(3).hex()


if not OmegaConf.has_resolver("fastface_run_id"):
    OmegaConf.register_new_resolver("fastface_run_id", run_id)


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
    """Hydra callback: check that the run (or sweep) folder can be written before Hydra creates it; at the end of
    a sweep, exit 3 when some of its jobs diverged (each job reported itself; the others still ran)."""

    def __init__(self) -> None:
        self.diverged: list[str] = []

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        value = getattr(job_return, "_return_value", None)  # a failed job's exception is not read here
        if isinstance(value, dict) and value.get("status") == "diverged":
            self.diverged.append(str(value["run_dir"]))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.diverged:
            fail(f"{len(self.diverged)} run(s) of the sweep diverged: {', '.join(self.diverged)}", EXIT_DIVERGED,
                 label="")

    @staticmethod
    def _check(folder: Any) -> None:
        try:
            check_writable_folder(Path(str(folder)))
        except UsageError as err:
            fail(str(err), err.exit_code)


def lock_run_folder(run_dir: Path) -> FolderLock:
    """Make this process the run folder's only writer (:mod:`fastface_pl.locks`), and remove the temporary files
    a killed run left there. A lock left by a dead process does not count.

    Raises:
        UsageError: If a live process holds the folder (the message names the folder and the process).
    """
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(run_dir / RUN_LOCK_NAME, run_dir, "run folder",
                          "give another hydra.run.dir=... (a resume in place needs the run to have ended)").acquire()
    except FolderInUseError as err:
        raise UsageError(str(err)) from None
    except PermissionError as err:
        raise UsageError(f"cannot write to the run folder {err.filename or run_dir} (permission denied): give a "
                         "writable hydra.run.dir=... or fix the folder's permissions") from None
    for folder in (run_dir, run_dir / "checkpoints", run_dir / "logs"):
        remove_stale_temporaries(folder)
    return lock


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
    write_json_atomic(run_dir / "results.json", summary, "results file")
