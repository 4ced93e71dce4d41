"""Images per second through a DataLoader: an InsightFace record pack against the same JPEGs as a folder.

Generates ``--num-images`` face-like 112x112 JPEGs (synthetic identities) in a temporary folder, packs them with
``fastface_pl.data.pack`` into ``train.rec``/``train.idx``, then times full shuffled epochs through a
``torch.utils.data.DataLoader`` (``--workers`` processes; decode + random flip + normalisation) from both sources,
alternating which goes first, and reports images/s and the ratio. Both sources sit in the page cache after the
first pass, so this measures the reading and decoding path, not the disk (on a network file system the record
file's advantage, one file and one read per image, is larger).

Run::

    python benchmarks/bench_dataloader.py                       # 2,000 images, 2 workers, 5 rounds
    python benchmarks/bench_dataloader.py --num-images 10000 --workers 4 --rounds 3
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from fastface_pl.data.datasets import FaceTransform, ImageFolderDataset, RecordDataset, SyntheticFaceGenerator
from fastface_pl.data.pack import pack_folder
from _record import add_json_argument, write_json


def make_jpegs(root: Path, num_images: int, per_identity: int, size: int, quality: int) -> None:
    generator = SyntheticFaceGenerator(image_size=size, seed=0)
    for index in range(num_images):
        identity, sample = divmod(index, per_identity)
        folder = root / f"id{identity:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = generator.render(identity, sample).permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
        (folder / f"{sample:04d}.jpg").write_bytes(buffer.getvalue())


def time_epoch(dataset, batch_size: int, workers: int, seed: int) -> float:
    """Seconds for one shuffled epoch, worker start-up included."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=False,
                        generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    count = 0
    for images, _labels in loader:
        count += images.shape[0]
    elapsed = time.perf_counter() - start
    assert count == len(dataset)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--per-identity", type=int, default=20, help="images per identity folder")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the generated images")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="epochs per source (alternating)")
    add_json_argument(parser, "dataloader")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fastface_bench_") as tmp:
        tmp_path = Path(tmp)
        started = time.perf_counter()
        make_jpegs(tmp_path / "folder", args.num_images, args.per_identity, args.size, args.quality)
        made = time.perf_counter()
        pack_folder(tmp_path / "folder", tmp_path / "pack", progress=False, workers=0)
        packed = time.perf_counter()
        transform = FaceTransform(flip=True)
        sources = {
            "jpeg folder": ImageFolderDataset(tmp_path / "folder", transform=transform),
            "record file": RecordDataset(tmp_path / "pack", transform=transform),
        }
        jpeg_bytes = sum(p.stat().st_size for p in (tmp_path / "folder").rglob("*.jpg"))
        print(f"{args.num_images} images {args.size}x{args.size} (JPEG q{args.quality}, {jpeg_bytes / 1e6:.1f} MB) "
              f"in {args.num_images // args.per_identity} identity folders; generated in {made - started:.1f} s, "
              f"packed in {packed - made:.1f} s ({(tmp_path / 'pack' / 'train.rec').stat().st_size / 1e6:.1f} MB)")
        print(f"DataLoader: {args.workers} workers, batch {args.batch_size}, shuffle, decode + flip + normalise; "
              f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads in the main process")
        for dataset in sources.values():  # warm-up: page cache, imports in the workers
            time_epoch(dataset, args.batch_size, args.workers, seed=0)
        # Reading the encoded bytes alone (no decode), in this process: the I/O path each source costs.
        folder_ds, record_ds = sources["jpeg folder"], sources["record file"]
        read_only = {"jpeg folder": lambda i: folder_ds.path(i).read_bytes(),
                     "record file": lambda i: record_ds.record_file.read(record_ds.layout.image_keys[i])}
        read_rates: dict[str, list[float]] = {name: [] for name in read_only}
        for round_index in range(args.rounds):
            order = torch.randperm(len(folder_ds), generator=torch.Generator().manual_seed(round_index)).tolist()
            for name, read in read_only.items():
                start = time.perf_counter()
                for i in order:
                    read(i)
                read_rates[name].append(len(order) / (time.perf_counter() - start))
        times: dict[str, list[float]] = {name: [] for name in sources}
        for round_index in range(args.rounds):
            order = list(sources) if round_index % 2 == 0 else list(reversed(sources))
            for name in order:
                times[name].append(time_epoch(sources[name], args.batch_size, args.workers, seed=round_index + 1))

    rates = {name: [args.num_images / t for t in values] for name, values in times.items()}
    print()
    print(f"{'source':<12} {'median img/s':>13} {'best img/s':>11} {'worst img/s':>12}   per-round img/s")
    for name, values in rates.items():
        rounds = " ".join(f"{v:.0f}" for v in values)
        print(f"{name:<12} {statistics.median(values):>13.0f} {max(values):>11.0f} {min(values):>12.0f}   {rounds}")
    ratio = statistics.median(rates["record file"]) / statistics.median(rates["jpeg folder"])
    print(f"ratio record/folder (medians): {ratio:.2f}x")
    print()
    print("reading the encoded bytes only (no decode), shuffled, one process:")
    for name, values in read_rates.items():
        print(f"{name:<12} {statistics.median(values):>13.0f} img/s (median of {len(values)})")
    read_ratio = statistics.median(read_rates["record file"]) / statistics.median(read_rates["jpeg folder"])
    print(f"ratio record/folder (read only): {read_ratio:.2f}x")
    write_json(args, {"median_images_per_s": {name: statistics.median(values) for name, values in rates.items()},
                      "ratio_record_to_folder": ratio,
                      "read_only_median_images_per_s": {n: statistics.median(v) for n, v in read_rates.items()},
                      "read_only_ratio_record_to_folder": read_ratio}, "dataloader")


if __name__ == "__main__":
    main()
