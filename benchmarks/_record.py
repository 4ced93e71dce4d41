"""Where the benchmarks that README quotes keep their figures: ``benchmarks/results/<benchmark>.json``.

Each such benchmark takes ``--json PATH`` (default: its file there) and writes the figures it printed, with the
command line, the date and the machine, so that a README figure names the file it comes from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def add_json_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """``--json PATH``: where the figures go (default ``benchmarks/results/<name>.json``)."""
    parser.add_argument("--json", type=Path, default=None,
                        help=f"write the figures here (default: benchmarks/results/{name}.json)")


def write_json(args: argparse.Namespace, figures: dict[str, Any], name: str) -> None:
    """Write ``figures`` with how they were made to ``args.json``, default ``benchmarks/results/<name>.json``
    (a temporary name, then renamed)."""
    import torch

    script = Path(sys.argv[0]).name
    record = {
        "command": " ".join(["python", f"benchmarks/{script}", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "arguments": {key: value for key, value in vars(args).items() if key != "json"},
        "figures": figures,
    }
    path = args.json or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(partial, path)
    print(f"figures written to {path}")
