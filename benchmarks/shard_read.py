"""How fast training reads webdataset shards by random access, against the same images in folders.

Writes ``--samples`` small JPEGs as a class-per-folder tree and as ``--shards`` tar shards, then
times: the shard index built cold (one pass over the tar headers) and loaded from its kept file,
and ``--reads`` random-order reads (decode + resize to 224) through
:class:`mmtard.data.IndexedShardDataset` and :class:`mmtard.data.ImageFolderDataset`.

    python benchmarks/shard_read.py --samples 20000 --reads 2000

Every result line starts with ``RESULT`` and holds ``key=value`` fields.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))


def write_data(root: Path, samples: int, shards: int, classes: int, size: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    per_shard = -(-samples // shards)
    tar = None
    for i in range(samples):
        label = i % classes
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        data = buffer.getvalue()
        folder = root / "folder" / f"class{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:07d}.jpg").write_bytes(data)
        if i % per_shard == 0:
            if tar is not None:
                tar.close()
            (root / "shards").mkdir(exist_ok=True)
            tar = tarfile.open(root / "shards" / f"train-{i // per_shard:06d}.tar", "w")
        for name, payload in ((f"{i:07d}.jpg", data), (f"{i:07d}.cls", str(label).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    tar.close()
    return str(root / "shards" / f"train-{{000000..{shards - 1:06d}}}.tar")


def time_reads(dataset, order) -> float:
    t0 = time.perf_counter()
    for i in order:
        dataset[int(i)]
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--image-px", type=int, default=96, help="side of the stored JPEGs")
    p.add_argument("--reads", type=int, default=2000)
    args = p.parse_args(argv)

    from mmtard.data import ImageFolderDataset, IndexedShardDataset
    from mmtard.data.shard_index import build_index, expand_shards

    with tempfile.TemporaryDirectory(prefix="mmtard-shards-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        pattern = write_data(root, args.samples, args.shards, args.classes, args.image_px)
        print(f"RESULT write samples={args.samples} shards={args.shards} seconds={time.perf_counter() - t0:.2f}")
        urls = expand_shards(pattern)
        t0 = time.perf_counter()
        build_index(urls, index_dir=root / "index")
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_index(urls, index_dir=root / "index")
        kept = time.perf_counter() - t0
        print(f"RESULT index samples={args.samples} cold_s={cold:.3f} per_1k_samples_s={cold / args.samples * 1000:.4f} "
              f"kept_s={kept:.4f}")
        names = [f"c{k}" for k in range(args.classes)]
        shards = IndexedShardDataset(pattern, image_size=224, classnames=names, index_dir=root / "index")
        folder = ImageFolderDataset(root / "folder", image_size=224)
        order = np.random.default_rng(1).permutation(args.samples)[: args.reads]
        for name, dataset in (("shards", shards), ("folder", folder)):
            seconds = time_reads(dataset, order)
            print(f"RESULT read source={name} reads={args.reads} seconds={seconds:.3f} "
                  f"samples_per_s={args.reads / seconds:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
