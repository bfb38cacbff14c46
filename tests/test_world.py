"""The offline world: determinism, world.json, and every set read back through the loaders."""

import hashlib
import json

import pytest
import torch

from mmtard.errors import DataError
from mmtard.world import SIZES, generate_world, load_world, main_generate


def _hashes(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_world(tmp_path_factory.mktemp("world"), seed=0, size="test")


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = _hashes(generate_world(tmp_path / "a", seed=3, size="test", image_size=24).root)
    b = _hashes(generate_world(tmp_path / "b", seed=3, size="test", image_size=24).root)
    c = _hashes(generate_world(tmp_path / "c", seed=4, size="test", image_size=24).root)
    assert a == b
    assert a.keys() == c.keys()
    pngs = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != c[k] for k in pngs) > 0.9 * len(pngs)


def test_world_json_describes_the_sets(world):
    meta = json.loads((world.root / "world.json").read_text())
    assert meta["seed"] == 0 and meta["size"] == "test" and meta["image_size"] == 48
    loaded = load_world(world.root)
    assert loaded == world
    assert len(world.classnames) >= 20
    assert "red shape on a black background" in world.classnames
    assert len(world.zeroshot_names) >= 3
    for name in world.zeroshot_names:
        spec = world.zeroshot[name]
        assert spec["classnames"] and all("{}" in t for t in spec["templates"])
    assert world.counts["train"] == SIZES["test"]["train"] * len(world.classnames)


def test_classification_split_reads_back(world):
    ds = world.classification("train")
    assert len(ds) == world.counts["train"]
    assert ds.classnames == world.classnames
    image, label, i = ds[len(ds) - 1]
    assert image.dtype == torch.float32 and image.shape == (3, 48, 48)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert label == len(world.classnames) - 1 and i == len(ds) - 1
    assert ds.sample_ids[0].startswith("green_shape_on_a_black_background/")
    small = world.classification("val", image_size=32, augment=True)
    assert small[0][0].shape == (3, 32, 32)


def test_zeroshot_sets_read_back(world):
    for name in world.zeroshot_names:
        ds = world.zeroshot_set(name)
        assert ds.classnames == world.zeroshot[name]["classnames"]
        assert ds.templates == world.zeroshot[name]["templates"]
        image, label, _ = ds[0]
        assert image.shape == (3, 48, 48) and label == 0
    assert "diamond" in world.zeroshot["shapes"]["classnames"]
    assert "purple" in world.zeroshot["colors"]["classnames"]
    with pytest.raises(DataError, match="no zero-shot set"):
        world.zeroshot_set("nope")


def test_captions_csv_and_shards_agree(world):
    csv_ds = world.captions()
    assert len(csv_ds) == world.counts["captions"]
    image, text, i = csv_ds[5]
    assert isinstance(text, str) and text and i == 5 and image.shape == (3, 48, 48)
    from_shards = {key: (img, txt) for img, txt, key in world.caption_shard_dataset()}
    assert len(from_shards) == len(csv_ds)
    shard_img, shard_txt = from_shards["000005"]
    assert shard_txt == text and torch.equal(shard_img, image)


def test_load_world_errors(tmp_path):
    with pytest.raises(DataError, match="world.json"):
        load_world(tmp_path)
    (tmp_path / "world.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid world"):
        load_world(tmp_path)
    with pytest.raises(DataError, match="size"):
        generate_world(tmp_path / "x", size="huge")


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "classification").mkdir()
    with pytest.raises(DataError, match="refusing"):
        generate_world(tmp_path, size="test")


def test_main_generate_summary(tmp_path):
    summary = main_generate(tmp_path / "w", seed=1, size="test", image_size=16)
    assert summary["counts"]["val"] == SIZES["test"]["val"] * 24
    assert set(summary["counts"]) >= {"train", "val", "captions", "shapes", "colors", "textures"}
    # regenerating over a world replaces it
    again = main_generate(tmp_path / "w", seed=1, size="test", image_size=16)
    assert again["counts"] == summary["counts"]


def test_an_interrupted_generation_is_replaced_by_the_next(tmp_path, monkeypatch):
    """The demo regenerates a world that has no world.json; one whose generation was cut short
    (Ctrl-C) must not then be refused as a foreign folder."""
    from mmtard import world

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(world, "_write_captions", interrupted)
        with pytest.raises(KeyboardInterrupt):
            generate_world(tmp_path / "w", size="test")
    assert (tmp_path / "w" / "classification").is_dir() and not (tmp_path / "w" / "world.json").exists()
    info = generate_world(tmp_path / "w", size="test")
    assert info.counts["captions"] > 0 and not (tmp_path / "w" / ".world-incomplete").exists()
    with pytest.raises(DataError, match="seed must be >= 0"):
        generate_world(tmp_path / "other", seed=-1, size="test")
    assert not (tmp_path / "other").exists()
