"""Evaluate a checkpoint, or raw backbone weights, on verification sets (LFW, CFP-FP, AgeDB-30 … or synthetic pairs).

    python -m fastface_pl.evaluate runs/<date>/<time>-<id>/checkpoints/last.ckpt
    python -m fastface_pl.evaluate model.ckpt --data /data/ms1m-retinaface-t1 --sets lfw cfp_fp agedb_30
    python -m fastface_pl.evaluate backbone.pth --backbone r100 --data /data/faces_emore --sets lfw
    python -m fastface_pl.evaluate model.ckpt --ijb /data/IJB_release/IJBC        # IJB-C 1:1 TAR at FAR

Only the verification files are read: ``--data`` may be a folder that holds nothing but ``lfw.bin``. Without
``--data`` the sets the checkpoint was validated on are used (the demo's synthetic pairs, or the ``.bin`` files
beside its training data). Raw weights (arcface_torch's ``backbone.pth``, a state dict) need ``--backbone``.
Every file is read weights-only (fastface_pl.checkpoints): none can run code. Prints one row per set: 10-fold
accuracy ± std, VAL@FAR=1e-3 ± std, XNorm.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from fastface_pl.checkpoints import (SAFE_GLOBALS, CheckpointError, describe_load_error, load_backbone_weights,
                                     load_checkpoint)
from fastface_pl.atomic import write_json_atomic
from fastface_pl.data.bin_format import check_enough_pairs, find_bin_files, load_bin
from fastface_pl.data.datamodule import LAYOUT_SYNTHETIC, FaceDataModule
from fastface_pl.data.datasets import FaceTransform
from fastface_pl.data.errors import DatasetError
from fastface_pl.errors import ConfigurationError
from fastface_pl.evaluation.ijb import evaluate_ijb
from fastface_pl.evaluation.report import format_results
from fastface_pl.faults import reason_of
from fastface_pl.models.module import FaceRecognitionModule


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastface_pl.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path,
                   help="a checkpoint written by fastface_pl.train (or Trainer.fit), or raw backbone weights "
                        "(a state dict such as arcface_torch's backbone.pth; give --backbone)")
    p.add_argument("--backbone", default=None,
                   help="backbone of raw weights: r18 r34 r50 r100 r200 mbf … (a checkpoint names its own)")
    p.add_argument("--embedding-size", type=int, default=None,
                   help="embedding size of raw weights (default: read from the weights, else 512)")
    p.add_argument("--input-size", type=int, default=112, help="image side of raw weights (default 112)")
    p.add_argument("--data", default=None,
                   help="folder holding the .bin sets, or 'synthetic' (default: the checkpoint's own sets)")
    p.add_argument("--sets", nargs="*", default=None,
                   help="verification set names (<name>.bin in --data) or .bin paths, e.g. lfw cfp_fp agedb_30 "
                        "(default: the checkpoint's, else every .bin in --data)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--accelerator", default="auto", help="cpu | gpu | auto")
    p.add_argument("--precision", default="32-true", help="32-true | 16-mixed | bf16-mixed")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--ijb", type=Path, default=None,
                   help="an IJBB or IJBC folder (loose_crop/, meta/): IJB 1:1 verification instead of the .bin sets "
                        "(add --data or --sets to run both)")
    p.add_argument("--ijb-out", type=Path, default=Path("ijb_results"),
                   help="folder for the IJB table (JSON), ROC plot and pair scores (default: ./ijb_results)")
    return p


def evaluate_ijb_command(args: argparse.Namespace, backbone: Any) -> dict[str, Any]:
    """IJB-B/C 1:1 verification of ``backbone`` (see :mod:`fastface_pl.evaluation.ijb`)."""
    accelerator = {"gpu": "cuda", "auto": None}.get(args.accelerator, args.accelerator)
    return evaluate_ijb(backbone, args.ijb, args.ijb_out, name=args.checkpoint.stem,
                        image_size=getattr(backbone, "input_size", 112), batch_size=args.batch_size,
                        num_workers=args.num_workers, device=accelerator, precision=args.precision)


def load_model(path: Path, backbone: Optional[str] = None, embedding_size: Optional[int] = None,
               input_size: int = 112) -> tuple[Any, dict[str, Any]]:
    """The model to evaluate and the data settings it was trained with (``{}`` for raw weights).

    ``path`` is a Lightning checkpoint (its hyper-parameters name the backbone) or raw backbone weights, loaded
    strictly into ``build_backbone(backbone, embedding_size, input_size=input_size)``.

    Raises:
        CheckpointError: the file is refused, corrupt, or its weights do not fit the backbone.
    """
    content = load_checkpoint(path)  # weights-only, memory-mapped: the weights are read once, below
    if isinstance(content, dict) and "state_dict" in content and "hyper_parameters" in content:
        data_settings = dict(content.get("datamodule_hyper_parameters") or {})
        del content
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                module = FaceRecognitionModule.load_from_checkpoint(path, map_location="cpu", weights_only=True,
                                                                    val_set_names=None)
        except (RuntimeError, TypeError, KeyError) as err:
            raise CheckpointError(f"checkpoint {path} does not rebuild a FaceRecognitionModule: "
                                  f"{describe_load_error(err)}") from None
        return module, data_settings

    del content
    state, _ = load_backbone_weights(path)
    if backbone is None:
        raise CheckpointError(f"{path} holds raw weights (a state dict), which do not say their backbone: "
                              "give --backbone (e.g. --backbone r100)")
    if embedding_size is None:
        embedding_size = int(state["fc.weight"].shape[0]) if "fc.weight" in state else 512
    module = FaceRecognitionModule(num_classes=1, backbone=backbone, embedding_size=embedding_size,
                                   backbone_kwargs={"input_size": input_size})
    try:
        module.backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"the weights in {path} do not fit --backbone {backbone} (embedding "
                              f"{embedding_size}, input {input_size}): {describe_load_error(err)}") from None
    return module, {}


def verification_sets(data: Optional[str], sets: Optional[Sequence[str]], data_settings: dict[str, Any],
                      image_size: Optional[int]) -> list[Any]:
    """The verification datasets to evaluate on; only the ``.bin`` files (or synthetic pairs) are read.

    ``.bin`` names are looked up in the data folder and the folder above it (an image folder keeps them there).
    """
    root = data if data is not None else data_settings.get("root")
    if not root:
        raise DatasetError("the checkpoint does not say which data it was trained on: pass --data /path/to/bins")
    if str(root) == LAYOUT_SYNTHETIC:
        synthetic = data_settings.get("synthetic") if data_settings.get("root") == LAYOUT_SYNTHETIC else None
        datamodule = FaceDataModule(root=LAYOUT_SYNTHETIC, image_size=image_size,
                                    **({"synthetic": synthetic} if synthetic else {}))
        datamodule.setup("validate")
        return list(datamodule.val_datasets)
    base = Path(root)
    if base.is_file():
        base = base.parent
    if not base.is_dir():
        raise DatasetError(f"--data {root} is not a folder: give the folder that holds the .bin sets")
    places = [base, base.parent]
    names = list(sets) if sets is not None else (list(data_settings.get("val_sets") or []) if data is None else [])
    if not names:
        names = sorted(p.name for p in base.glob("*.bin"))
        if not names:
            raise DatasetError(f"no .bin verification sets in {base}: give --data the folder that holds them")
    transform = FaceTransform(image_size=image_size)
    paths = find_bin_files(names, places, "Give --sets the ones you have.")
    sets = [load_bin(path, transform=transform) for path in paths]
    check_enough_pairs(sets, "give --sets without them")
    return sets


def check_output_file(path: Path, option: str) -> None:
    """Refuse an output file that cannot be written, before the evaluation that would fill it.

    Raises:
        ConfigurationError: If ``path`` is a folder, or its folder is missing or not writable.
    """
    if path.is_dir():
        raise ConfigurationError(f"{option} {path} is a folder: give the path of a file to write (e.g. {path / 'results.json'})")
    folder = path.parent
    if not folder.is_dir():
        raise ConfigurationError(f"{option} {path}: the folder {folder} does not exist; create it or give another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{option} {path}: the folder {folder} is not writable; give another path")


def evaluate(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    if args.json is not None:  # before the evaluation: its results must not be lost at the end
        check_output_file(args.json, "--json")
    module, data_settings = load_model(args.checkpoint, args.backbone, args.embedding_size, args.input_size)
    run_bins = args.ijb is None or args.data is not None or args.sets is not None
    datasets: list[Any] = []
    if run_bins:  # looked up first: a wrong --sets is reported before a long IJB pass
        image_size = data_settings.get("image_size") or module.hparams.get("backbone_kwargs", {}).get("input_size")
        datasets = verification_sets(args.data, args.sets, data_settings, image_size)
    results: dict[str, Any] = {}
    if args.ijb is not None:
        results["ijb"] = evaluate_ijb_command(args, module.backbone)
    if datasets:
        names = [getattr(d, "name", None) or LAYOUT_SYNTHETIC for d in datasets]
        module.hparams.val_set_names = names
        loaders = [DataLoader(d, batch_size=args.batch_size, num_workers=args.num_workers, shuffle=False)
                   for d in datasets]
        trainer = pl.Trainer(accelerator=args.accelerator, devices=1, precision=args.precision, logger=False,
                             enable_checkpointing=False, enable_model_summary=False)
        table, per_set = format_results(trainer.validate(module, dataloaders=loaders, verbose=False))
        print(f"\n{args.checkpoint}\n{table}")
        results.update(per_set)
    if args.json is not None:
        write_json_atomic(args.json, results, "results file")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        evaluate(args)
    except PermissionError as err:
        print(f"fastface_pl.evaluate: error: permission denied: {err.filename or err}: fix its permissions",
              file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, ValueError) as err:  # CheckpointError, DatasetError, argument checks
        print(f"fastface_pl.evaluate: error: {reason_of(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
