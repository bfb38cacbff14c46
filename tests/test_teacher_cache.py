"""The clean-teacher cache: shared by the ranks of a node, safe to reopen, strict about its size."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmtard import teacher_cache
from mmtard.distributed import node_index
from mmtard.errors import ConfigError, DataError
from mmtard.teacher_cache import CleanTeacherCache

IDS = [f"img{i}.png" for i in range(10)]


class _Teacher(nn.Module):
    """What the cache needs of a teacher: ``text_weights`` (d x K) and unit ``image_embed``."""

    def __init__(self, dim: int = 6):
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 4, dim)
        self.text_weights = torch.zeros(dim, 3)
        self.calls = 0
        self.batch_sizes: list[int] = []

    def image_embed(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += x.shape[0]
        self.batch_sizes.append(x.shape[0])
        return F.normalize(self.proj(x.flatten(1)), dim=-1)


@pytest.fixture
def data():
    torch.manual_seed(0)
    return _Teacher(), torch.rand(10, 3, 4, 4)


def test_ranks_of_a_node_share_rows(tmp_path, data):
    teacher, images = data
    rank0 = CleanTeacherCache(tmp_path, IDS, node=0)
    rank1 = CleanTeacherCache(tmp_path, IDS, node=0)
    ids = torch.tensor([1, 4, 7])
    first = rank0.lookup(0, teacher, images[ids], ids)
    again = rank1.lookup(0, teacher, images[ids], ids)  # the other rank: no forward
    torch.testing.assert_close(again, first)
    assert (rank0.misses, rank1.misses, rank1.hits, teacher.calls) == (3, 0, 3, 3)
    torch.testing.assert_close(first, teacher.image_embed(images[ids]))
    other_node = CleanTeacherCache(tmp_path, IDS, node=1)
    other_node.lookup(0, teacher, images[ids], ids)
    assert other_node.misses == 3
    digest = rank0.samples
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"teacher0-node0-{digest}.f32", f"teacher0-node0-{digest}.mask",
        f"teacher0-node1-{digest}.f32", f"teacher0-node1-{digest}.mask"]


def test_a_batch_with_misses_runs_the_teacher_at_its_own_size(tmp_path, data):
    """A nearly full cache (the second epoch) misses a few rows of some batches: the teacher sees
    the whole micro-batch, never a batch of the misses' changing count (a compiled tower would
    recompile for each), only the misses' rows are stored, and hits keep their stored rows."""
    teacher, images = data
    cache = CleanTeacherCache(tmp_path, IDS)
    cache.lookup(0, teacher, images[:4], torch.arange(4))
    stored = cache.lookup(0, teacher, images[:4], torch.arange(4))
    ids = torch.tensor([0, 5, 1, 6])  # two hits, two misses
    shifted = images[ids].clone()
    shifted[0] += 1.0  # a hit whose image changed: its stored row is kept
    got = cache.lookup(0, teacher, shifted, ids)
    assert teacher.batch_sizes == [4, 4] and cache.misses == 6 and cache.hits == 6
    torch.testing.assert_close(got[[0, 2]], stored[[0, 1]])
    torch.testing.assert_close(got[[1, 3]], teacher.image_embed(images[[5, 6]]))
    # all hits now: no teacher call (the last one is this test's own, of 2 images)
    assert cache.lookup(0, teacher, images[ids], ids).equal(got) and teacher.batch_sizes[-1] == 2


def test_a_marked_row_that_was_never_written_is_recomputed(tmp_path, data):
    teacher, images = data
    cache = CleanTeacherCache(tmp_path, IDS)
    ids = torch.arange(4)
    expected = cache.lookup(0, teacher, images[ids], ids)
    cache.flush()
    # the machine went down after the mask reached the disk but before row 2 and a stray row 8 did
    stem = f"teacher0-node0-{cache.samples}"
    values = np.memmap(tmp_path / f"{stem}.f32", dtype=np.float32, mode="r+", shape=(10, 6))
    mask = np.memmap(tmp_path / f"{stem}.mask", dtype=np.bool_, mode="r+", shape=(10,))
    values[2] = 0.0
    values[3, :3] = 0.0
    mask[8] = True
    values.flush()
    mask.flush()
    reopened = CleanTeacherCache(tmp_path, IDS)
    got = reopened.lookup(0, teacher, images[ids], ids)
    assert reopened.invalid == 3 and reopened.misses == 2 and reopened.hits == 2
    torch.testing.assert_close(got, expected)


def test_another_dataset_or_teacher_width_never_reads_these_rows(tmp_path, data):
    teacher, images = data
    first = CleanTeacherCache(tmp_path, IDS)
    first.lookup(0, teacher, images[:2], torch.arange(2))
    renamed = CleanTeacherCache(tmp_path, IDS[:9] + ["other.png"])  # same size, other samples
    renamed.lookup(0, teacher, images[:2], torch.arange(2))
    assert renamed.misses == 2 and renamed.samples != first.samples
    wider = _Teacher(dim=8)  # same dataset, a teacher of another width: refused by name
    with pytest.raises(DataError, match=rf"teacher0-node0-{first.samples}\.f32 has 240 bytes where \(10, 8\)"):
        CleanTeacherCache(tmp_path, IDS).lookup(0, wider, images[:2], torch.arange(2))


@pytest.mark.parametrize("hard_links", [True, False])
def test_ranks_racing_to_create_the_files_share_one(tmp_path, monkeypatch, hard_links):
    """Another rank creates (and fills) the file between our existence check and our link."""
    path = tmp_path / "table.f32"
    real_link = os.link

    def other_rank_first(src, dst):
        if not Path(dst).exists():
            Path(dst).write_bytes(b"\x01" * 40)  # the other rank's file, already written to
        if not hard_links:
            raise OSError(1, "Operation not permitted")
        return real_link(src, dst)

    monkeypatch.setattr(teacher_cache.os, "link", other_rank_first)
    table = teacher_cache._open(path, np.float32, (10,))
    assert table.shape == (10,) and bytes(table.tobytes()) == b"\x01" * 40  # theirs, not a fresh one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.f32"]  # no temporary left behind


def test_node_index_from_torchrun_environment(monkeypatch):
    for name in ("GROUP_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert node_index(5) == 5  # unknown layout: no sharing between ranks
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert node_index(5) == 1
    monkeypatch.setenv("GROUP_RANK", "3")
    assert node_index(5) == 3
    monkeypatch.setenv("GROUP_RANK", "node-a")  # set by hand, not by torchrun
    with pytest.raises(ConfigError, match="GROUP_RANK='node-a': expected an integer"):
        node_index(5)


def test_files_of_another_dataset_or_layout_are_pointed_out(tmp_path, data, caplog):
    (tmp_path / "teacher0-rank0.f32").write_bytes(b"\0" * 1024)  # the per-rank layout of earlier versions
    with caplog.at_level("WARNING"):
        CleanTeacherCache(tmp_path, IDS)
    assert "1 files" in caplog.text and "are not used; delete them" in caplog.text


def test_a_replaced_teacher_file_never_reads_the_old_teachers_rows(tmp_path, data, caplog):
    """Same run, same dataset, same path: a retrained teacher written over the old file (between two
    sessions of a run) gets rows of its own; the old ones are reported as unused."""
    from mmtard.teacher_cache import weights_digest

    teacher, images = data
    weights = tmp_path / "teacher.safetensors"
    weights.write_bytes(b"old")
    old = weights_digest("ViT-L-14", str(weights))
    cache_dir = tmp_path / "cache"
    CleanTeacherCache(cache_dir, IDS, teacher_weights=[old]).lookup(0, teacher, images[:2], torch.arange(2))
    assert weights_digest("ViT-L-14", str(weights)) == old  # unchanged file: the same rows
    weights.write_bytes(b"retrained")
    new = weights_digest("ViT-L-14", str(weights))
    assert new != old != weights_digest("ViT-B-32", str(weights))
    with caplog.at_level("WARNING"):
        retrained = CleanTeacherCache(cache_dir, IDS, teacher_weights=[new])
    assert "2 files (0.00 GiB) belong to another dataset, teacher or an older layout" in caplog.text
    retrained.lookup(0, teacher, images[:2], torch.arange(2))
    assert retrained.misses == 2 and retrained.hits == 0
