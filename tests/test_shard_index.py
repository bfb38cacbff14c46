"""Webdataset classification shards as a map-style training set: same samples as the folder they
were written from, random access, a reusable index, and clear errors for what cannot work."""

from __future__ import annotations

import csv
import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest
import torch

from mmtard.cli import main
from mmtard.data import ImageFolderDataset
from mmtard.data import shard_index
from mmtard.data.shard_index import IndexedShardDataset
from mmtard.errors import DataError
from test_trainer import tiny_overrides


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: ImageFolderDataset, out: Path, per_shard: int, limit: int | None = None) -> list[Path]:
    """The folder's samples as webdataset shards: ``<key>.png`` + ``<key>.cls``, in index order."""
    out.mkdir(parents=True, exist_ok=True)
    n = len(folder) if limit is None else limit
    paths = []
    for start in range(0, n, per_shard):
        path = out / f"train-{start // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, n)):
                _add(tar, f"s{i:06d}.png", Path(folder.files[i]).read_bytes())
                _add(tar, f"s{i:06d}.cls", str(folder.targets[i]).encode())
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def folder(world_dir):
    return ImageFolderDataset(world_dir / "classification" / "train")


@pytest.fixture
def shards(folder, tmp_path):
    paths = write_shards(folder, tmp_path / "shards", per_shard=10, limit=30)
    return str(tmp_path / "shards" / "train-{000000..000002}.tar"), paths


def test_shards_give_the_folders_samples_in_any_order(folder, shards):
    pattern, _ = shards
    names = [f"class {k}" for k in range(len(folder.classnames))]
    ds = IndexedShardDataset(pattern, classnames=names)
    assert len(ds) == 30 and ds.classnames == names
    for i in (17, 3, 29, 0, 10):  # random access across shards
        image, label, index = ds[i]
        expected, expected_label, _ = folder[i]
        assert index == i and label == expected_label
        torch.testing.assert_close(image, expected, rtol=0, atol=0)
    assert ds.sample_ids[12] == "train-000001.tar:s000012"


def test_the_index_is_kept_and_rebuilt_when_a_shard_changes(folder, shards, tmp_path, monkeypatch):
    pattern, paths = shards
    names = [str(k) for k in range(len(folder.classnames))]
    IndexedShardDataset(pattern, classnames=names, index_dir=tmp_path / "index")
    assert len(list((tmp_path / "index").glob("shard-index-*.npz"))) == 1

    def no_scan(*args, **kwargs):
        raise AssertionError("the kept index should have been used")

    real_scan = shard_index._scan_shard
    monkeypatch.setattr(shard_index, "_scan_shard", no_scan)
    again = IndexedShardDataset(pattern, classnames=names, index_dir=tmp_path / "index")
    assert len(again) == 30 and again[5][1] == folder.targets[5]
    os.utime(paths[1], ns=(1, 1))  # a shard changed: new fingerprint, new scan
    with pytest.raises(AssertionError, match="kept index"):
        IndexedShardDataset(pattern, classnames=names, index_dir=tmp_path / "index")
    monkeypatch.setattr(shard_index, "_scan_shard", real_scan)
    assert len(IndexedShardDataset(pattern, classnames=names, index_dir=tmp_path / "index")) == 30
    # other bytes under the same size and modification time (a shard copied over with cp -p)
    monkeypatch.setattr(shard_index, "_scan_shard", no_scan)
    kept = os.stat(paths[2])
    data = bytearray(paths[2].read_bytes())
    data[0] ^= 1  # the first member's name
    paths[2].write_bytes(bytes(data))
    os.utime(paths[2], ns=(kept.st_atime_ns, kept.st_mtime_ns))
    assert os.stat(paths[2]).st_size == kept.st_size
    with pytest.raises(AssertionError, match="kept index"):
        IndexedShardDataset(pattern, classnames=names, index_dir=tmp_path / "index")


def test_a_damaged_kept_index_is_scanned_again_and_replaced(folder, shards, tmp_path, caplog):
    pattern, _ = shards
    names = [str(k) for k in range(len(folder.classnames))]
    IndexedShardDataset(pattern, classnames=names, index_dir=tmp_path / "index")
    (kept,) = (tmp_path / "index").glob("shard-index-*.npz")
    whole = kept.read_bytes()
    kept.write_bytes(whole[: len(whole) // 2])  # a machine that lost power before the data reached the disk
    with caplog.at_level("WARNING"):
        again = IndexedShardDataset(pattern, classnames=names, index_dir=tmp_path / "index")
    assert f"shard index {kept} is unreadable" in caplog.text
    assert len(again) == 30 and again[5][1] == folder.targets[5]
    assert kept.read_bytes() == whole, "the kept index is written whole again"
    assert {p.name for p in kept.parent.iterdir()} == {kept.name, kept.with_suffix(".lock").name}


def test_incomplete_and_corrupt_samples(folder, tmp_path):
    path = tmp_path / "bad.tar"
    good = Path(folder.files[0]).read_bytes()
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.png", good)
        _add(tar, "a.cls", b"1")
        _add(tar, "nolabel.png", good)            # no .cls
        _add(tar, "broken.png", b"not a png")     # undecodable image
        _add(tar, "broken.cls", b"2")
        _add(tar, "c.png", good)
        _add(tar, "c.cls", b"3")
    ds = IndexedShardDataset(str(path), classnames=list("abcd"))
    assert ds.targets.tolist() == [1, 2, 3]  # the sample without a label is left out of the index
    image, label, index = ds[1]     # the broken image is replaced by the next readable sample
    assert (label, index) == (3, 2)
    count, ids = ds.pop_skipped()
    assert count == 1 and ids == ["bad.tar:broken"]
    with pytest.raises(DataError, match=r"bad\.tar, sample nolabel: no \.cls member"):
        IndexedShardDataset(str(path), classnames=list("abcd"), strict=True)
    # a lenient index kept on disk does not let a strict run through
    IndexedShardDataset(str(path), classnames=list("abcd"), index_dir=tmp_path / "index")
    with pytest.raises(DataError, match="no .cls member"):
        IndexedShardDataset(str(path), classnames=list("abcd"), strict=True, index_dir=tmp_path / "index")


def test_negative_label_truncated_and_empty_shards_are_named(folder, tmp_path):
    good = Path(folder.files[0]).read_bytes()
    negative = tmp_path / "negative.tar"
    with tarfile.open(negative, "w") as tar:
        _add(tar, "a.png", good)
        _add(tar, "a.cls", b"-1")
    with pytest.raises(DataError, match=r"negative\.tar, sample a: \.cls holds '-1', not a label"):
        IndexedShardDataset(str(negative), classnames=["x"], strict=True)
    whole = write_shards(folder, tmp_path / "whole", per_shard=6, limit=6)[0]
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(whole.read_bytes()[:1500])
    with pytest.raises(DataError, match=r"truncated\.tar cannot be read to its end"):
        IndexedShardDataset(str(truncated), classnames=["x"] * 30)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.tar is empty"):
        IndexedShardDataset(str(empty), classnames=["x"])


def test_open_shard_files_are_bounded(folder, shards, monkeypatch):
    pattern, _ = shards
    monkeypatch.setattr(shard_index, "OPEN_SHARDS", 2)
    ds = IndexedShardDataset(pattern, classnames=[str(k) for k in range(len(folder.classnames))])
    for i in (0, 15, 25, 5, 12, 29):  # shards 0, 1, 2, 0, 1, 2: each read past the limit evicts one
        image, _, _ = ds[i]
        torch.testing.assert_close(image, folder[i][0], rtol=0, atol=0)
        assert len(ds._fds) <= 2
    assert list(ds._fds) == [1, 2]
    assert ds.sample_ids[28:] == ["train-000002.tar:s000028", "train-000002.tar:s000029"]


def test_what_cannot_be_read_by_random_access_is_refused(folder, tmp_path):
    plain = write_shards(folder, tmp_path / "plain", per_shard=4, limit=4)[0]
    packed = tmp_path / "packed.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(DataError, match=r"packed\.tar\.gz is not an uncompressed tar"):
        IndexedShardDataset(str(packed), classnames=["x"] * 30)
    with pytest.raises(DataError, match="not a local file"):
        IndexedShardDataset(["https://example.org/train-000000.tar"], classnames=["x"])
    with pytest.raises(DataError, match="set data.classnames"):
        IndexedShardDataset(str(plain))


def test_training_on_shards_with_workers(world_dir, folder, tmp_path, capsys):
    """A real distill run on shards, class names from a file, two DataLoader worker processes."""
    write_shards(folder, tmp_path / "shards", per_shard=16)
    n_shards = len(list((tmp_path / "shards").iterdir()))
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(folder.classnames) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text("student: {name: mmtard-tiny-vit}\n")
    out = tmp_path / "run"
    data = {"data.source": "shards", "data.num_workers": 2, "data.image_size": 32,
            "data.root": str(tmp_path / "shards" / f"train-{{000000..{n_shards - 1:06d}}}.tar")}
    overrides = tiny_overrides(world_dir, **data, **{"data.classnames": str(names)})
    assert main(["-q", "distill", "--config", str(config), "--out", str(out), *overrides]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    missing = tiny_overrides(world_dir, **data, **{"data.classnames": str(tmp_path / "missing.txt")})
    assert main(["-q", "distill", "--config", str(config), "--out", str(tmp_path / "run2"), *missing]) == 2
    assert "data.classnames: cannot read" in capsys.readouterr().err


def test_class_names_file(tmp_path):
    from mmtard.errors import ConfigError
    from mmtard.factory import read_classnames_file

    names = tmp_path / "names.txt"
    names.write_text("cat\n  dog \n\n\n")
    assert read_classnames_file(str(names)) == ["cat", "dog"]  # trailing blank lines are fine
    names.write_text("cat\n\ndog\n")
    with pytest.raises(ConfigError, match=r"names\.txt line 2 is blank"):
        read_classnames_file(str(names))
    names.write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no class name"):
        read_classnames_file(str(names))


def test_unicode_digit_labels_are_refused_not_crashed(folder, tmp_path):
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.png", Path(folder.files[0]).read_bytes())
        _add(tar, "a.cls", "²".encode())
        _add(tar, "b.png", Path(folder.files[0]).read_bytes())
        _add(tar, "b.cls", b"0")
    assert IndexedShardDataset(str(path), classnames=["x"]).targets.tolist() == [0]


def _index_in_child(urls, index_dir, queue):
    index = shard_index.build_index(urls, index_dir=index_dir)
    queue.put(index["offset"].tolist())


def test_processes_building_one_index_at_once_share_it(shards, tmp_path):
    """Ranks starting together: one scans under the lock, the other reads its file."""
    import multiprocessing

    pattern, _ = shards
    urls = shard_index.expand_shards(pattern)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_index_in_child, args=(urls, tmp_path / "index", queue)) for _ in range(2)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert results[0] == results[1] and len(results[0]) == 30
    assert len(list((tmp_path / "index").glob("*.npz"))) == 1
    assert not list((tmp_path / "index").glob(".*tmp*"))


def test_evaluation_digests_see_a_shard_rewritten_in_place(folder, shards, tmp_path):
    """Sample ids (``shard:key``) survive a shard re-written with other images or labels; the
    digests an evaluation record keeps do not."""
    import time

    from mmtard.dataset_digest import dataset_digest

    pattern, paths = shards
    names = [f"class {k}" for k in range(len(folder.classnames))]
    before = IndexedShardDataset(pattern, classnames=names)
    digests = {kind: dataset_digest(before, range(30), kind) for kind in ("files", "bytes")}
    assert all(digests.values()) and digests == {k: dataset_digest(before, range(30), k) for k in digests}
    time.sleep(0.01)
    with tarfile.open(paths[0], "w") as tar:  # the first shard again, same keys, its images in reverse order
        for i in range(10):
            _add(tar, f"s{i:06d}.png", Path(folder.files[9 - i]).read_bytes())
            _add(tar, f"s{i:06d}.cls", str(folder.targets[i]).encode())
    after = IndexedShardDataset(pattern, classnames=names)
    assert list(after.sample_ids) == list(before.sample_ids)
    assert all(dataset_digest(after, range(30), kind) != digests[kind] for kind in digests)
