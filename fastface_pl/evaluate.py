"""Evaluate a checkpoint on verification sets (LFW, CFP-FP, AgeDB-30, ... or synthetic pairs).

    python -m fastface_pl.evaluate runs/<date>/<time>/checkpoints/last.ckpt
    python -m fastface_pl.evaluate model.ckpt --data /data/ms1m-retinaface-t1 --sets lfw cfp_fp agedb_30
    python -m fastface_pl.evaluate model.ckpt --ijb /data/IJB_release/IJBC        # IJB-C 1:1 TAR at FAR

Without ``--data`` the data module the checkpoint was trained with is rebuilt from its saved arguments
(e.g. the demo's synthetic pairs). Prints one row per set: 10-fold accuracy ± std, VAL@FAR=1e-3 ± std, XNorm.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastface_pl.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint written by fastface_pl.train (or Trainer.fit)")
    p.add_argument("--data", default=None,
                   help="dataset folder holding the .bin sets, or 'synthetic' (default: the checkpoint's own data)")
    p.add_argument("--sets", nargs="*", default=None,
                   help="verification set names (.bin files in --data), e.g. lfw cfp_fp agedb_30")
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
    from fastface_pl.evaluation.ijb import evaluate_ijb

    accelerator = {"gpu": "cuda", "auto": None}.get(args.accelerator, args.accelerator)
    return evaluate_ijb(backbone, args.ijb, args.ijb_out, name=args.checkpoint.stem,
                        image_size=getattr(backbone, "input_size", 112), batch_size=args.batch_size,
                        num_workers=args.num_workers, device=accelerator, precision=args.precision)


def evaluate(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    import lightning.pytorch as pl
    import torch

    from fastface_pl.data.datamodule import FaceDataModule
    from fastface_pl.models.module import FaceRecognitionModule
    from fastface_pl.evaluation.report import format_results

    if not args.checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist: give the path of a .ckpt file")
    if args.ijb is not None:
        module = FaceRecognitionModule.load_from_checkpoint(args.checkpoint, map_location="cpu", val_set_names=None)
        ijb_result = evaluate_ijb_command(args, module.backbone)
        if args.data is None and args.sets is None:
            return {"ijb": ijb_result}
    # mmap: only the small data-module entry is read here; the weights are loaded once, below
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False, mmap=True)
    data_kwargs: dict[str, Any] = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    if args.data is not None:  # other data, the same preprocessing (image size) as in training
        data_kwargs = {"root": args.data, "image_size": data_kwargs.get("image_size"),
                       **({"synthetic": data_kwargs.get("synthetic")} if args.data == "synthetic" else {})}
    if not data_kwargs.get("root"):
        raise ValueError("the checkpoint does not say which data it was trained on: pass --data /path/to/dataset")
    if args.sets is not None:
        data_kwargs["val_sets"] = list(args.sets)
    data_kwargs.update(batch_size=args.batch_size, num_workers=args.num_workers)
    datamodule = FaceDataModule(**data_kwargs)
    datamodule.prepare_data()
    datamodule.setup("validate")

    module = FaceRecognitionModule.load_from_checkpoint(args.checkpoint, map_location="cpu", val_set_names=None)
    trainer = pl.Trainer(accelerator=args.accelerator, devices=1, precision=args.precision, logger=False,
                         enable_checkpointing=False, enable_model_summary=False)
    results = trainer.validate(module, datamodule=datamodule, verbose=False)
    table, per_set = format_results(results)
    print(f"\n{args.checkpoint}\n{table}")
    if args.json is not None:
        args.json.write_text(json.dumps(per_set, indent=2))
    return per_set


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        evaluate(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"fastface_pl.evaluate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
