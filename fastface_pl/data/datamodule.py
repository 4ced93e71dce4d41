"""FaceDataModule: one LightningDataModule for record packs, image folders and synthetic identities.

Example::

    dm = FaceDataModule("faces_emore", batch_size=128, val_sets=["lfw", "cfp_fp", "agedb_30"])
    model = FaceRecognitionModule(num_classes=dm.num_classes)
    Trainer(...).fit(model, datamodule=dm)

    demo = FaceDataModule("synthetic", batch_size=32,
                          synthetic={"num_identities": 50, "images_per_identity": 16, "image_size": 32})
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from fastface_pl.data.datasets import (
    IMAGE_EXTENSIONS,
    FaceTransform,
    ImageFolderDataset,
    RecordDataset,
    SyntheticFaces,
    SyntheticPairs,
    max_image_side_for,
)
from fastface_pl.data.errors import DatasetError, reading
from fastface_pl.data.samplers import (
    DEFAULT_IDENTITY_FRACTION, IdentityPairSampler, SeededRandomSampler, identity_index,
)
from fastface_pl.checkpoints import SavedStateError
from fastface_pl.data.bin_format import find_bin_files, load_bin
from fastface_pl.errors import ConfigurationError
from fastface_pl.argument_checks import bound_workers, check_int

log = logging.getLogger(__name__)

LAYOUT_RECORD = "record"
LAYOUT_IMAGE_FOLDER = "image_folder"
LAYOUT_SYNTHETIC = "synthetic"

ACCEPTED_LAYOUTS = (
    "  - 'synthetic' (generated identities, no files);\n"
    "  - an InsightFace/MXNet pack: a folder with train.rec + train.idx (and <name>.bin verification sets), "
    "or the path of a .rec with its .idx beside it;\n"
    "  - an image folder: <root>/<identity>/<image>.jpg|.jpeg|.png (e.g. WebFace42M)."
)

SYNTHETIC_DEFAULTS = {
    "num_identities": 100, "images_per_identity": 20, "image_size": 112, "num_val_pairs": 200, "seed": 0,
    "unseen_identities": 0, "noise": 8.0,
}


def _describe(path: Path, limit: int = 10) -> str:
    try:
        names = sorted(os.listdir(path))
    except OSError as error:
        return f"(cannot list: {error})"
    if not names:
        return "an empty folder"
    shown = ", ".join(n + ("/" if (path / n).is_dir() else "") for n in names[:limit])
    return f"{len(names)} entries: {shown}" + (", ..." if len(names) > limit else "")


def detect_layout(root: Union[str, os.PathLike]) -> str:
    """Which reader fits ``root``: ``"synthetic"``, ``"record"`` or ``"image_folder"``.

    Raises:
        DatasetError: If the path does not exist, cannot be read or matches no accepted layout; the message
            lists the accepted layouts and what was found.
    """
    if str(root) == LAYOUT_SYNTHETIC:
        return LAYOUT_SYNTHETIC
    with reading("data root", root):
        return _detect_file_layout(Path(root))


def _detect_file_layout(path: Path) -> str:
    if not path.exists():
        raise DatasetError(f"data root {path} does not exist. Accepted layouts:\n{ACCEPTED_LAYOUTS}")
    if path.is_file():
        if path.suffix == ".rec":
            if not path.with_suffix(".idx").is_file():
                raise DatasetError(f"{path} has no index {path.with_suffix('.idx')} beside it")
            return LAYOUT_RECORD
        raise DatasetError(f"data root {path} is a file, not a .rec. Accepted layouts:\n{ACCEPTED_LAYOUTS}")
    if not path.is_dir():
        raise DatasetError(f"data root {path} is neither a folder nor a .rec file (a device, a pipe or a socket). "
                           f"Accepted layouts:\n{ACCEPTED_LAYOUTS}")
    if (path / "train.rec").is_file():
        if not (path / "train.idx").is_file():
            raise DatasetError(
                f"{path} holds train.rec but no train.idx; the reader needs the index ('key<TAB>offset' lines). "
                f"Accepted layouts:\n{ACCEPTED_LAYOUTS}"
            )
        return LAYOUT_RECORD
    wanted = tuple(IMAGE_EXTENSIONS)
    with os.scandir(path) as entries:
        folders = sorted(e.path for e in entries if e.is_dir() and not e.name.startswith("."))
    for folder in folders[:20]:  # a few identity folders are enough to recognise the layout
        with reading("identity folder", folder), os.scandir(folder) as entries:
            if any(e.name.lower().endswith(wanted) and e.is_file() for e in entries):
                return LAYOUT_IMAGE_FOLDER
    raise DatasetError(
        f"no recognised dataset layout at {path}: found {_describe(path)}. Accepted layouts:\n{ACCEPTED_LAYOUTS}"
    )


def ignore_sigint_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a worker ignores Ctrl+C (SIGINT), which a terminal sends to the whole
    process group; the main process decides (it saves a checkpoint and stops, see ``fastface_pl.safety``) and
    shuts the workers down. The worker was started with SIGINT blocked (:class:`WorkerSafeDataLoader`), so a
    Ctrl+C that arrived while it started is pending: ignoring the signal discards it, and only then is it
    unblocked. Lightning's per-worker seeding still runs when ``seed_everything(workers=True)`` asked for it (the
    data order and flips do not depend on it: they come from the sampler)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if os.environ.get("PL_SEED_WORKERS") == "1":
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)


class WorkerSafeDataLoader(DataLoader):
    """A ``DataLoader`` whose workers cannot be killed by a Ctrl+C, from their first instruction on.

    The workers are started with SIGINT blocked in the starting thread. A child inherits the signal mask (through
    ``fork``, and through the ``exec`` of ``spawn`` and of a fork server started then), so a SIGINT that reaches a
    worker before its ``worker_init_fn`` (:func:`ignore_sigint_in_worker`) stays pending, and is discarded when
    the worker ignores the signal. The main process's mask is restored as soon as the workers exist: a Ctrl+C that
    reached it meanwhile is delivered then, to its usual handler. See docs/fault_tolerance.md ("Ctrl+C and
    DataLoader workers").
    """

    def _get_iterator(self) -> Any:  # where DataLoader starts the worker processes
        if self.num_workers == 0:
            return super()._get_iterator()
        context = self.multiprocessing_context
        method = context.get_start_method() if context is not None else multiprocessing.get_start_method()
        if method != "fork":  # the resource tracker unblocks SIGINT in this thread when it starts: start it first
            resource_tracker.ensure_running()
        previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)


def check_state(state: Any) -> None:
    """Checks a :meth:`FaceDataModule.state_dict` read from a checkpoint: types and ranges, before any is used.

    Raises:
        SavedStateError: Naming the first entry that is not what ``state_dict`` writes.
    """
    if not isinstance(state, dict):
        raise SavedStateError(f"the data module's saved state is a {type(state).__name__}, expected a dict")
    required = ("epoch", "batches_done") if "epoch" in state or "batches_done" in state else ()
    for key in ("seed", "num_skipped", "epoch", "batches_done"):
        if key not in state:
            if key in required:
                raise SavedStateError(f"the data module's saved state has no {key} (it has {sorted(state)})")
            continue
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SavedStateError(f"the data module's saved state has {key}={value!r}, expected an int >= 0")
    finished = state.get("epoch_finished")
    if finished is not None and not isinstance(finished, bool):
        raise SavedStateError(f"the data module's saved state has epoch_finished={finished!r}, expected true, false "
                         "or null")


class ContiguousShardSampler(DistributedSampler):
    """Pairs in file order, split into contiguous blocks per rank, without padding (validation).

    The 10-fold verification protocol takes the pairs in their order. Lightning's default distributed sampler
    would interleave the ranks and repeat pairs to pad; with contiguous blocks, gathering the ranks' results in
    rank order (as torchmetrics does) restores the original order exactly, each pair once.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.num_samples_total = int(num_samples)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.start = self.num_samples_total * self.rank // self.num_replicas
        self.stop = self.num_samples_total * (self.rank + 1) // self.num_replicas
        self.num_samples = self.stop - self.start
        self.shuffle, self.seed, self.epoch, self.drop_last = False, 0, 0, False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.num_samples


class IndexedFlip(Dataset):
    """Applies the flip chosen by :class:`SeededRandomSampler`: item ``(index, flip)`` → ``dataset[index]``, flipped."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: Any) -> Any:
        index, flip = item if isinstance(item, tuple) else (item, False)
        image, label = self.dataset[index]
        return (image.flip(-1) if flip else image), label

    def __getattr__(self, name: str) -> Any:  # num_classes, num_skipped, ... of the wrapped dataset
        # Never forward dunders: the DataLoader would call a wrapped ``__getitems__`` (e.g. a Subset's) with the
        # ``(index, flip)`` items, and pickle would find the wrapped dataset's hooks.
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableDataLoader(WorkerSafeDataLoader):
    """The training loader: a ``DataLoader`` that tells Lightning it resumes mid-epoch.

    Its position is saved and restored by :meth:`FaceDataModule.state_dict` and
    :meth:`~FaceDataModule.load_state_dict`: the trainer's batch count is the exact record of what was trained
    on (the loader's own count runs ahead by the batches its workers prefetch). The two methods below make it
    match Lightning's ``_Stateful`` protocol, so that a mid-epoch resume is not met by Lightning's warning that
    the loader cannot resume.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class FaceDataModule(pl.LightningDataModule):
    """Training and verification data for face recognition, picked from what lies at ``root``.

    Args:
        root: ``"synthetic"``, a folder with ``train.rec`` + ``train.idx`` (or a ``.rec`` path), or an image
            folder ``<root>/<identity>/<image>.jpg``.
        batch_size: Images per training batch (per device); also pairs per validation batch.
        num_workers: DataLoader worker processes.
        pin_memory: Pin host memory (only applied when CUDA is available).
        persistent_workers: Keep workers between epochs (only applied when ``num_workers > 0``).
        drop_last: Drop the last incomplete training batch.
        seed: Seed of the shuffling order (and of the workers' flip decisions); under DDP the
            ``DistributedSampler`` uses it too, so every rank agrees on the permutation.
        flip: Random horizontal flip of training images (the paper's only augmentation).
        val_sets: Verification sets beside the training data: names (``"lfw"`` -> ``<root>/lfw.bin``, for an image
            folder also ``<root>/../lfw.bin``) or paths to ``.bin`` files; a missing one raises, an empty list
            disables validation. Ignored for ``"synthetic"``,
            which validates on one synthetic pair set named ``"synthetic"``.
        num_classes: Expected number of identities; checked against the data when given.
        skip_corrupt: Skip corrupt records/images (counted in :attr:`num_skipped`) instead of raising.
        synthetic: Options of the synthetic data: ``num_identities``, ``images_per_identity``, ``image_size``,
            ``num_val_pairs``, ``seed``, ``unseen_identities``.
        index_cache: Where an image folder's file index is cached (default: in the folder, else
            ``$XDG_CACHE_HOME/fastface_pl``).
        image_size: Resize images to this side (None: as stored, 112 for InsightFace data).
        train_transform: Extra augmentation applied to ``uint8 [3, H, W]`` after the flip, before normalisation.
        val_batch_size: Pairs per validation batch (default: ``batch_size``).
        identity_fraction: Share of each training batch in identity pairs (F2C's dual loader,
            :class:`~fastface_pl.data.samplers.IdentityPairSampler`); 0: plain shuffled batches; None: 0.5 when
            the model asks for pairs (``needs_identity_pairs``, i.e. ``classifier="dcp"``), else 0.
        max_image_side: Largest side an image header may declare; a larger image is refused before it is decoded
            (a decompression bomb). None: 1024, or 8 x ``image_size`` when larger (docs/fault_tolerance.md).

    Raises:
        ValueError: On invalid arguments (at construction).
        DatasetError: On missing or inconsistent data (at :meth:`setup`, or when a property needs the data).
    """

    def __init__(
        self,
        root: str = "synthetic",
        batch_size: int = 128,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = True,
        seed: int = 3407,
        flip: bool = True,
        val_sets: Optional[Sequence[str]] = ("lfw", "cfp_fp", "agedb_30"),
        num_classes: Optional[int] = None,
        skip_corrupt: bool = False,
        synthetic: Optional[dict] = None,
        index_cache: Optional[str] = None,
        image_size: Optional[int] = None,
        train_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        val_batch_size: Optional[int] = None,
        identity_fraction: Optional[float] = None,
        max_image_side: Optional[int] = None,
    ) -> None:
        super().__init__()
        if not isinstance(root, (str, os.PathLike)) or not str(root):
            raise ConfigurationError(f"root must be 'synthetic' or a path, got {root!r}")
        self.root = str(root)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.val_batch_size = check_int("val_batch_size", val_batch_size, 1) if val_batch_size is not None else None
        self.num_workers = bound_workers("data.num_workers", num_workers)
        self.seed = check_int("seed", seed, 0)
        if num_classes is not None:
            check_int("num_classes", num_classes, 1)
        if image_size is not None:
            check_int("image_size", image_size, 1)
        if val_sets is None:
            val_sets = ()
        if isinstance(val_sets, str) or not all(isinstance(v, (str, os.PathLike)) for v in val_sets):
            raise ConfigurationError(f"val_sets must be a list of set names or .bin paths, got {val_sets!r}")
        self.val_sets = [str(v) for v in val_sets]
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.drop_last = bool(drop_last)
        self.flip = bool(flip)
        self.expected_num_classes = num_classes
        self.skip_corrupt = bool(skip_corrupt)
        self.index_cache = index_cache
        self.image_size = image_size
        self.train_transform = train_transform
        if identity_fraction is not None and (isinstance(identity_fraction, bool) or not 0 <= identity_fraction <= 1):
            raise ConfigurationError(f"identity_fraction must be null or in [0, 1], got {identity_fraction!r}")
        self.identity_fraction = identity_fraction
        self.max_image_side = (check_int("max_image_side", max_image_side, 1) if max_image_side is not None
                               else max_image_side_for(image_size))
        unknown = set(synthetic or {}) - set(SYNTHETIC_DEFAULTS)
        if unknown:
            raise ConfigurationError(f"synthetic has unknown keys {sorted(unknown)}; allowed: {sorted(SYNTHETIC_DEFAULTS)}")
        self.synthetic = {**SYNTHETIC_DEFAULTS, **(synthetic or {})}
        if image_size is not None and "image_size" not in (synthetic or {}):
            self.synthetic["image_size"] = image_size  # generate synthetic faces at that size directly
        self.train_dataset: Optional[Dataset] = None
        self.val_datasets: list[Dataset] = []
        self._layout: Optional[str] = None
        self._resume: Optional[dict] = None  # where the checkpoint of a resume stood (load_state_dict)
        self._identity_index: Optional[Any] = None  # identity -> images, read once for identity-pair batches
        self.save_hyperparameters(ignore=["train_transform"])

    # -- what is at root ----------------------------------------------------------------------------------------
    @property
    def layout(self) -> str:
        """``"synthetic"``, ``"record"`` or ``"image_folder"`` (detected on first use)."""
        if self._layout is None:
            self._layout = detect_layout(self.root)
        return self._layout

    def _build_train_dataset(self) -> Dataset:
        # the flip is drawn by the sampler (reproducible and resumable), not by the transform
        transform = FaceTransform(flip=False, extra=self.train_transform, image_size=self.image_size)
        if self.layout == LAYOUT_SYNTHETIC:
            s = self.synthetic
            return SyntheticFaces(s["num_identities"], s["images_per_identity"], s["image_size"], s["seed"],
                                  transform=transform, noise=s["noise"])
        if self.layout == LAYOUT_RECORD:
            # With a header record the identity count comes from the pack (and a different num_classes raises);
            # without one, the given num_classes avoids scanning every record's label.
            dataset: Dataset = RecordDataset(self.root, transform=transform, skip_corrupt=self.skip_corrupt,
                                             num_classes=self.expected_num_classes,
                                             max_image_side=self.max_image_side)
        else:
            dataset = ImageFolderDataset(self.root, transform=transform, skip_corrupt=self.skip_corrupt,
                                         index_cache=self.index_cache, max_image_side=self.max_image_side)
        return dataset

    def _train(self) -> Dataset:
        if self.train_dataset is None:
            dataset = self._build_train_dataset()
            found = dataset.num_classes  # type: ignore[attr-defined]
            if self.expected_num_classes is not None and found != self.expected_num_classes:
                raise DatasetError(
                    f"num_classes={self.expected_num_classes} was given but {self.root} holds {found} identities; "
                    f"set num_classes: {found} (or null to take it from the data)"
                )
            if found < 2:
                raise DatasetError(
                    f"{self.root} holds {found} identity: a margin softmax over one class learns nothing (its loss "
                    "is 0 at every step); face recognition training needs at least 2 identities (thousands, in "
                    "practice)"
                )
            if isinstance(dataset, RecordDataset):
                dataset.validate()
            self.train_dataset = dataset
            if self.hparams.get("num_classes") is None:  # record the count found (checkpoints, logged hparams)
                self.save_hyperparameters({**self.hparams, "num_classes": int(found)})
        return self.train_dataset

    @property
    def num_classes(self) -> int:
        """Number of identities in the training data (reads the header/index on first use)."""
        return int(self._train().num_classes)  # type: ignore[attr-defined]

    @property
    def num_images(self) -> int:
        """Number of training images."""
        return len(self._train())  # type: ignore[arg-type]

    @property
    def val_set_names(self) -> list[str]:
        """Names of the validation dataloaders, in order (``"synthetic"`` for synthetic data)."""
        if self.root == LAYOUT_SYNTHETIC:
            return [LAYOUT_SYNTHETIC]
        return [Path(v).stem if v.endswith(".bin") else v for v in self.val_sets]

    def _val_paths(self) -> list[Path]:
        base = Path(self.root)
        if base.is_file():
            base = base.parent
        # Beside train.rec; for an image folder also one level up (keeping the identity folders pure).
        places = [base] + ([base.parent] if self.layout == LAYOUT_IMAGE_FOLDER else [])
        return find_bin_files(self.val_sets, places,
                              "Set val_sets to the ones you have, or to [] to train without validation.")

    @property
    def num_skipped(self) -> int:
        """Corrupt training samples skipped so far (``skip_corrupt=True``), over all workers."""
        return int(getattr(self.train_dataset, "num_skipped", 0)) if self.train_dataset is not None else 0

    # -- Lightning hooks ----------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Check the data once (rank 0): layout, validation files, and the image-folder index (built and cached)."""
        self._train()
        if self.layout != LAYOUT_SYNTHETIC:
            self._val_paths()

    def setup(self, stage: Optional[str] = None) -> None:
        """Build the datasets; raises :class:`DatasetError` on missing or inconsistent data."""
        if stage in (None, "fit"):
            dataset = self._train()
            rank_zero_info(
                f"FaceDataModule: {type(dataset).__name__} at {self.root}: {len(dataset)} images, "  # type: ignore
                f"{dataset.num_classes} identities"  # type: ignore[attr-defined]
            )
        if stage in (None, "fit", "validate") and not self.val_datasets:
            self.val_datasets = self._build_val_datasets()

    def _build_val_datasets(self) -> list[Dataset]:
        transform = FaceTransform(image_size=self.image_size)
        if self.layout == LAYOUT_SYNTHETIC:
            s = self.synthetic
            return [SyntheticPairs(s["num_val_pairs"], s["num_identities"], s["images_per_identity"], s["image_size"],
                                   s["seed"], unseen_identities=s["unseen_identities"], transform=transform,
                                   noise=s["noise"])]
        return [load_bin(p, transform=transform, max_image_side=self.max_image_side) for p in self._val_paths()]

    def _distributed(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            return trainer.world_size, trainer.global_rank
        return 1, 0

    def _loader_kwargs(self) -> dict:
        workers = self.num_workers
        return {
            "num_workers": workers,
            "pin_memory": self.pin_memory and torch.cuda.is_available(),
            "persistent_workers": self.persistent_workers and workers > 0,
            "worker_init_fn": ignore_sigint_in_worker if workers > 0 else None,
        }

    def _pair_fraction(self) -> float:
        """Share of a batch in identity pairs: the configured one, else what the model asks for."""
        module = getattr(getattr(self, "trainer", None), "lightning_module", None)
        wants_pairs = bool(getattr(module, "needs_identity_pairs", False))
        if self.identity_fraction is None:
            return DEFAULT_IDENTITY_FRACTION if wants_pairs else 0.0
        if wants_pairs and not self.identity_fraction:
            raise ConfigurationError("the model (classifier=dcp) trains on identity pairs but identity_fraction=0; "
                             "set data.identity_fraction to a value in (0, 1] or null")
        return float(self.identity_fraction)

    def train_dataloader(self) -> DataLoader:
        dataset = self._train()
        world_size, rank = self._distributed()
        pair_fraction = self._pair_fraction()
        if pair_fraction:
            if self._identity_index is None:  # read once (a record pack: one record per identity)
                self._identity_index = identity_index(dataset)
            sampler: Sampler = IdentityPairSampler(self._identity_index, self.batch_size, pair_fraction, self.seed,
                                                   flip=self.flip, num_replicas=world_size, rank=rank)
        else:
            sampler = SeededRandomSampler(len(dataset), self.seed, flip=self.flip,  # type: ignore[arg-type]
                                          num_replicas=world_size, rank=rank)
        size = len(dataset)  # type: ignore[arg-type]
        # The position must be right before the loader is iterated: with workers, creating the iterator already
        # draws the first batches, and Lightning creates it before calling set_epoch (see _start_position).
        epoch, batches = self._start_position(len(sampler))
        sampler.set_position(epoch, batches * self.batch_size)
        if size < self.batch_size * world_size and self.drop_last:
            raise DatasetError(
                f"{self.root} holds {size} images, fewer than one batch of {self.batch_size} per device "
                f"x {world_size} devices with drop_last=True; lower batch_size or set drop_last=False"
            )
        return ResumableDataLoader(IndexedFlip(dataset), batch_size=self.batch_size, sampler=sampler,
                                   drop_last=self.drop_last, **self._loader_kwargs())

    def _start_position(self, samples_per_rank: int) -> tuple[int, int]:
        """``(epoch, batches already trained on)`` at which the training loader starts.

        After a resume: where the checkpoint stood, or the start of the next epoch when it was saved after the
        last batch of an epoch (at the last step, at the epoch end, or after the epoch-end validation), as
        Lightning continues there. Otherwise the trainer's current epoch (0 without a trainer): Lightning calls
        ``train_dataloader`` again at an epoch start when it reloads the loaders.
        """
        resume, self._resume = self._resume, None
        if resume is not None:
            epoch, batches = resume["epoch"], resume["batches_done"]
            per_epoch = (samples_per_rank // self.batch_size if self.drop_last
                         else -(-samples_per_rank // self.batch_size))
            if batches > max(per_epoch, 1):
                raise SavedStateError(
                    f"the data module's saved state says {batches} batches of epoch {epoch} were trained on, but an "
                    f"epoch of {self.root} has {per_epoch} batches of {self.batch_size}: the checkpoint was altered, "
                    "or the data or data.batch_size changed since it was saved"
                )
            finished = resume.get("epoch_finished")
            if finished is None:  # a checkpoint written before the flag existed
                finished = batches >= per_epoch
            return (epoch + 1, 0) if finished else (epoch, batches)
        trainer = getattr(self, "trainer", None)
        return (int(trainer.current_epoch), 0) if trainer is not None else (0, 0)

    def val_dataloader(self) -> list[DataLoader]:
        if not self.val_datasets:
            self.val_datasets = self._build_val_datasets()
        batch = self.val_batch_size or self.batch_size
        world_size, rank = self._distributed()
        return [WorkerSafeDataLoader(d, batch_size=batch, drop_last=False, **self._loader_kwargs(),
                           sampler=ContiguousShardSampler(len(d), world_size, rank))  # type: ignore[arg-type]
                for d in self.val_datasets]

    def teardown(self, stage: Optional[str] = None) -> None:
        if self.num_skipped:
            rank_zero_warn(f"FaceDataModule: skipped {self.num_skipped} corrupt training samples in {self.root}")

    def state_dict(self) -> dict:
        """Saved in checkpoints: where the training epoch stood, so that a resume continues the same order."""
        state: dict[str, Any] = {"seed": self.seed, "num_skipped": self.num_skipped}
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:  # also when saved after validation
            batch_progress = trainer.fit_loop.epoch_loop.batch_progress
            state["epoch"] = int(trainer.current_epoch)
            state["batches_done"] = int(batch_progress.current.processed)
            state["epoch_finished"] = bool(batch_progress.is_last_batch)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores the position in the epoch.

        Lightning calls this before it asks for the training loader, so :meth:`train_dataloader` builds the
        sampler already at the checkpoint's position (a different ``seed`` changes the order, not the position).

        Raises:
            SavedStateError: If the saved state is not what :meth:`state_dict` writes (a tampered or damaged
                checkpoint): each value is checked for its type and range before any is used.
        """
        check_state(state_dict)
        if "epoch" in state_dict:
            self._resume = {
                "epoch": int(state_dict["epoch"]), "batches_done": int(state_dict["batches_done"]),
                "epoch_finished": state_dict.get("epoch_finished"),
            }

    def __repr__(self) -> str:
        return f"FaceDataModule(root={self.root!r}, batch_size={self.batch_size}, val_sets={self.val_set_names})"


__all__ = [
    "ACCEPTED_LAYOUTS", "ContiguousShardSampler", "FaceDataModule", "IndexedFlip", "ResumableDataLoader",
    "SeededRandomSampler", "WorkerSafeDataLoader", "detect_layout", "ignore_sigint_in_worker",
]
