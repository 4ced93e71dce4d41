"""The exceptions fastface_pl raises on purpose, and the exit code of each kind (docs/fault_tolerance.md).

Every exception class of the package derives from :class:`FastFaceError` through one category, and the category
alone decides how ``python -m fastface_pl.train`` ends (:mod:`fastface_pl.faults` reads it):

=========================  ============  ====================================================================
category                   exit code     meaning
=========================  ============  ====================================================================
:class:`UsageError`        2             the config, a path, a checkpoint or the data must be fixed
:class:`DiskFullError`     2             a save failed for lack of space (the files written before are whole)
:class:`DivergenceError`   3             the training diverged
:class:`InterruptionError` 128 + signal  a signal stopped the run (143 for SIGTERM, 130 for Ctrl+C)
=========================  ============  ====================================================================

Any other exception is a bug (exit 1, with its traceback), a plain ``ValueError`` raised by the package's own code
included: a check of what the user gave raises :class:`ConfigurationError` (a ``ValueError``) or
:class:`ConfigurationTypeError` (a ``TypeError``). Pure Python: the detectors use it too.
"""

from __future__ import annotations

import signal
from typing import ClassVar

__all__ = ["EXIT_CRASH", "EXIT_DIVERGED", "EXIT_USAGE", "ConfigurationError", "ConfigurationTypeError",
           "DiskFullError", "DivergenceError", "FastFaceError", "InterruptionError", "SavedStateError", "UsageError"]

EXIT_CRASH = 1  # a bug: Python's own exit code for an uncaught exception, with its traceback
EXIT_USAGE = 2  # what argparse and Hydra exit with for a command line they refuse
EXIT_DIVERGED = 3


class FastFaceError(Exception):
    """The base of every exception of fastface_pl; ``status`` and ``exit_code`` come from its category."""

    status: ClassVar[str] = "crash"
    exit_code: int = EXIT_CRASH


class UsageError(FastFaceError):
    """A problem in the command line, a path, a checkpoint or the data that the user must fix (exit 2, one message
    and no traceback)."""

    status: ClassVar[str] = "usage"
    exit_code = EXIT_USAGE


class ConfigurationError(UsageError, ValueError):
    """An argument or config value out of range or inconsistent (a ``ValueError``); the message names the argument,
    what is allowed and what was given."""


class ConfigurationTypeError(UsageError, TypeError):
    """An argument or config value of the wrong type (a ``TypeError``)."""


class SavedStateError(UsageError, ValueError):
    """A component's saved state (a checkpoint's data module, callback or scheduler state, a ``state_dict`` given to
    ``load_state_dict``) is not what the component saves: a value of the wrong type or range, a missing key.

    Every component of the package raises this type (or a subclass) for it; around ``trainer.fit(ckpt_path=...)``,
    :func:`fastface_pl.checkpoints.restoring_from` turns it into a ``CheckpointError`` that names the file.
    """


class DiskFullError(FastFaceError, OSError, ValueError):
    """A file could not be written for lack of space; the message names the path and the space left (exit 2).

    An ``OSError`` whose ``errno`` is the original one (``ENOSPC`` or ``EDQUOT``), and also a ``ValueError``.
    :func:`fastface_pl.atomic.disk_full_error` builds it.
    """

    status: ClassVar[str] = "disk_full"
    exit_code = EXIT_USAGE

    def __str__(self) -> str:
        return str(self.strerror)


class DivergenceError(FastFaceError):
    """The training diverged: the loss or the weights are no longer finite (exit 3)."""

    status: ClassVar[str] = "diverged"
    exit_code = EXIT_DIVERGED


class InterruptionError(FastFaceError):
    """A signal stopped the run (exit 128 + ``signum``)."""

    status: ClassVar[str] = "interrupted"

    def __init__(self, signum: int, *args: object) -> None:
        super().__init__(*args)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name
