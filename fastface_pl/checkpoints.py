"""Load checkpoints and weight files safely, and find the newest checkpoint of a run.

Every file fastface_pl reads with ``torch.load`` goes through :func:`load_checkpoint`: ``weights_only=True``
(torch's restricted unpickler: tensors, plain containers and numbers, nothing that can run code), with an
allow-list of the few extra types a checkpoint may hold (:data:`SAFE_GLOBALS`). A file that is refused or
unreadable (a crafted pickle, a truncated or empty file, random bytes, text, a ``.bin`` verification set)
raises one :class:`CheckpointError` whose message names the file and the problem.

Example::

    checkpoint = load_checkpoint("runs/2026-01-01/10-00-00-1a2b3c/checkpoints/last.ckpt")
    state = load_backbone_weights("backbone.pth")      # arcface_torch's raw state dicts, or a .ckpt
    newest = newest_checkpoint("runs/2026-01-01/10-00-00-1a2b3c")
"""

from __future__ import annotations

import os
import pathlib
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import torch

from fastface_pl.errors import SavedStateError, UsageError

__all__ = ["AtomicCheckpointIO", "CheckpointError", "SAFE_GLOBALS", "restoring_from", "SavedStateError", "load_checkpoint", "load_lightning_checkpoint",
           "load_backbone_weights", "newest_checkpoint", "checkpoint_candidates",
           "differing_hyperparameters", "describe_load_error"]

PathLike = Union[str, "os.PathLike[str]"]

# Types a fastface_pl (or plain Lightning) checkpoint may hold beyond tensors and builtins: a data root given as
# a Path in a data module's hyper-parameters. Each is rebuilt from strings only, so none can run code.
SAFE_GLOBALS: list[Any] = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]

_PICKLE_PROTOCOL_MARK = 0x80  # first byte of a pickle (protocol 2+): a legacy torch.save file or a .bin set
_LIGHTNING_KEYS = ("state_dict", "global_step")


class CheckpointError(UsageError, ValueError):
    """A checkpoint or weight file that cannot be used: missing, unreadable, refused, corrupt or of another kind."""


def _describe_refusal(err: pickle.UnpicklingError) -> str:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for line in str(err).splitlines():  # torch names the refused global in one of its lines
        if "Unsupported global" in line or "GLOBAL" in line:
            reason = line.strip()
            break
    return reason


def load_checkpoint(path: PathLike, *, what: str = "checkpoint", map_location: Any = "cpu",
                    mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors; ``mmap`` reads tensors lazily (zip files).

    Raises:
        CheckpointError: the file is missing, unreadable, empty, not a torch file, corrupt or refused by the
            restricted unpickler (it would need a Python object that could run code).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist: give the path of a .ckpt/.pth file")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except PermissionError:
        raise CheckpointError(f"{what} {path} is not readable (permission denied): fix its permissions "
                              f"(chmod u+r {path}) or copy it somewhere you can read") from None
    except OSError as err:
        raise CheckpointError(f"{what} {path} cannot be read: {err.strerror or err}") from None
    if not head:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): an interrupted copy or save? Use another "
                              "checkpoint (e.g. the previous one in the same folder)")
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and head == b"PK\x03\x04":
        raise CheckpointError(f"{what} {path} is truncated or corrupt (a zip archive without its directory): an "
                              "interrupted save or copy? Use another checkpoint (e.g. the previous one in the "
                              "same folder)")
    if not is_zip and head[0] != _PICKLE_PROTOCOL_MARK:
        kind = "text" if _looks_like_text(path) else "bytes of an unknown format"
        raise CheckpointError(f"{what} {path} is not a torch checkpoint (it holds {kind}): give a file written by "
                              "torch.save / Lightning (.ckpt, .pth, .pt)")
    if not is_zip and _is_verification_bin(path):
        raise CheckpointError(f"{what} {path} is a verification set (.bin), not a checkpoint: give the .bin's "
                              "folder as --data and a .ckpt/.pth as the checkpoint")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and is_zip)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err) or "GLOBAL" in str(err):
            raise CheckpointError(
                f"{what} {path} was refused: it holds Python objects beyond weights and plain values, which "
                f"could run code when loaded ({_describe_refusal(err)}). fastface_pl loads only weights-only "
                "files; re-save it from a trusted copy as a plain state dict (torch.save(model.state_dict(), ...))"
            ) from None
        raise CheckpointError(f"{what} {path} is corrupt (cannot be unpickled: {err})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, IndexError, KeyError, OSError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{what} {path} is corrupt or truncated ({message}): an interrupted save or "
                              "copy? Use another checkpoint (e.g. the previous one in the same folder)") from None


def _is_verification_bin(path: Path) -> bool:
    from fastface_pl.data.bin_format import load_bin  # its restricted unpickler runs no code either
    from fastface_pl.data.errors import DatasetError

    try:
        load_bin(path)
    except (DatasetError, OSError, MemoryError):
        return False
    return True


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        sample = f.read(512)
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def load_lightning_checkpoint(path: PathLike, *, what: str = "checkpoint") -> dict[str, Any]:
    """:func:`load_checkpoint`, then check that the file is a Lightning training checkpoint (weights + state)."""
    checkpoint = load_checkpoint(path, what=what)
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in _LIGHTNING_KEYS):
        kind = "raw weights (a state dict)" if _is_state_dict(checkpoint) else f"a {type(checkpoint).__name__}"
        raise CheckpointError(
            f"{what} {path} is not a Lightning checkpoint (it holds {kind}): give a .ckpt written by "
            "fastface_pl.train or Trainer.fit" + (" (raw backbone weights are evaluated with "
                                                  "python -m fastface_pl.evaluate FILE --backbone NAME)"
                                                  if _is_state_dict(checkpoint) else "")
        )
    return checkpoint


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_backbone_weights(path: PathLike) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """The backbone's state dict from raw weights (arcface_torch's ``backbone.pth``) or a Lightning checkpoint.

    Returns ``(state_dict, hyper_parameters)``; the hyper-parameters (backbone name and size) are ``None`` for
    raw weights. The keys of a Lightning checkpoint lose their ``backbone.`` prefix; a ``module.`` prefix
    (weights saved from DistributedDataParallel) is removed too.
    """
    obj = load_checkpoint(path, what="weights file")
    hparams = None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        hparams = obj.get("hyper_parameters") if isinstance(obj.get("hyper_parameters"), dict) else None
        state = {k[len("backbone."):]: v for k, v in obj["state_dict"].items() if k.startswith("backbone.")}
        if not state and _is_state_dict(obj["state_dict"]):
            state = dict(obj["state_dict"])
    elif _is_state_dict(obj):
        state = dict(obj)
    else:
        raise CheckpointError(f"weights file {path} holds a {type(obj).__name__}, not a state dict of tensors: "
                              "give a backbone.pth (torch.save(backbone.state_dict(), ...)) or a .ckpt")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if not state:
        raise CheckpointError(f"weights file {path} holds no backbone weights")
    return state, hparams


def checkpoint_candidates(run_dir: PathLike) -> list[Path]:
    """Checkpoints of a run folder (or of a ``checkpoints/`` folder), newest first (by modification time).

    Includes Lightning's Slurm ``hpc_ckpt_*.ckpt`` files written into the run folder.
    """
    run_dir = Path(run_dir)
    folders = [run_dir, run_dir / "checkpoints"]
    files: set[Path] = set()
    for folder in folders:
        if folder.is_dir():
            files.update(p for p in folder.glob("*.ckpt") if p.is_file())
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def newest_checkpoint(run_dir: PathLike, *, skipped: Optional[list[tuple[Path, str]]] = None
                      ) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest checkpoint of a run folder that loads, with its content; ``None`` when there is none.

    A newest file that is corrupt (a save cut short by a kill) is passed over for the one before it; the files
    passed over and why are appended to ``skipped``.
    """
    for candidate in checkpoint_candidates(run_dir):
        try:
            return candidate, load_lightning_checkpoint(candidate)
        except CheckpointError as err:
            if skipped is not None:
                skipped.append((candidate, str(err)))
    return None


def differing_hyperparameters(saved: dict[str, Any], current: dict[str, Any],
                              keys: Optional[Iterable[str]] = None) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for the keys whose values differ (nested dicts by dotted key)."""
    out: list[tuple[str, Any, Any]] = []
    names = sorted(set(saved) | set(current)) if keys is None else list(keys)
    for key in names:
        a, b = saved.get(key, "<not set>"), current.get(key, "<not set>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend((f"{key}.{k}", x, y) for k, x, y in differing_hyperparameters(a, b))
        elif not _same(a, b):
            out.append((key, a, b))
    return out


def describe_load_error(err: Exception, limit: int = 3) -> str:
    """A short form of ``load_state_dict``'s error: how many keys are missing/unexpected, the first mismatches."""
    import re

    parts = []
    for label, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*?)\.?\s*$"),
                           ("unexpected", r"Unexpected key\(s\) in state_dict: (.*?)\.?\s*$")):
        for line in str(err).splitlines():
            match = re.search(pattern, line.strip())
            if match:
                keys = re.findall(r'"([^"]+)"', match.group(1))
                parts.append(f"{len(keys)} {label} key(s) ({', '.join(keys[:limit])}{', …' if len(keys) > limit else ''})")
    sizes = [line.strip().rstrip(".") for line in str(err).splitlines() if "size mismatch" in line]
    if sizes:
        parts.append(f"{len(sizes)} size mismatch(es), e.g. {sizes[0]}")
    return "; ".join(parts) if parts else str(err).strip().splitlines()[0]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


# ---------------------------------------------------------------------------------------------- writing
def _checkpoint_io_base() -> type:
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    return TorchCheckpointIO


class AtomicCheckpointIO(_checkpoint_io_base()):  # type: ignore[misc]
    """Lightning's checkpoint writer, made atomic for local paths (a ``Trainer(plugins=[...])`` plugin).

    ``torch.save`` writes to a temporary name in the checkpoint's folder, which is fsynced and renamed to the
    final name only when complete (:mod:`fastface_pl.atomic`): a full disk or a kill during a save leaves the
    previous ``last.ckpt`` (or step checkpoint) as it was and no truncated file under a checkpoint name. A full
    disk raises :class:`~fastface_pl.atomic.DiskFullError`, naming the path and the free space (exit 2). Remote
    URLs (``s3://`` ...) are left to Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        from fastface_pl.atomic import atomic_write

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb", what="checkpoint") as handle:
            torch.save(checkpoint, handle)


# ---------------------------------------------------------------------------------------------- restoring
_RESTORE_FRAMES = ("restore_datamodule", "restore_callbacks", "restore_training_state", "restore_model",
                   "_restore_modules_and_callbacks", "restore_optimizers_and_schedulers", "restore_loops",
                   "restore_precision_plugin_state")


def _raised_while_restoring(err: BaseException) -> bool:
    """Whether ``err`` came out of Lightning restoring a checkpoint's state into the components."""
    frame = err.__traceback__
    while frame is not None:
        code = frame.tb_frame.f_code
        if code.co_name in _RESTORE_FRAMES and "checkpoint_connector" in code.co_filename:
            return True
        frame = frame.tb_next
    return False


@contextmanager
def restoring_from(path: Optional[PathLike]) -> Iterator[None]:
    """Around ``trainer.fit(ckpt_path=path)``: a component that rejects its saved state (the data module, a
    callback, the loops: a value of the wrong type or out of range in a tampered or damaged checkpoint) raises
    one :class:`CheckpointError` naming the file and the reason (exit 2), not a traceback."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as err:
        if path is None or isinstance(err, CheckpointError) or not (isinstance(err, SavedStateError)
                                                                    or _raised_while_restoring(err)):
            raise
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        if isinstance(err, KeyError):
            reason = f"missing entry {err}"
        raise CheckpointError(
            f"checkpoint {path} holds a state this run cannot restore: {reason}. The file was altered or damaged; "
            "resume from another checkpoint of the run (e.g. ckpt_path=<run folder> picks the newest)"
        ) from err
