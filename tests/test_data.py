"""Data loaders: contract tuples, image conversions, bad files, bad layouts, helpers."""

import io
import shutil

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from mmtard.data import (
    CaptionCSVDataset,
    ImageFolderDataset,
    ShardDataset,
    build_zeroshot_dataset,
    check_classnames,
    folder_classnames,
    imagenet_classnames,
    imagenet_folder,
    imagenet_val_subset,
    packaged_subset_list,
    read_subset_list,
    subsample_indices,
    to_rgb,
    zeroshot_templates,
)
from mmtard.data.folders import check_imagenet_wnids, imagenet_wnids
from mmtard.errors import DataError


def _img(color=(200, 30, 30), size=(12, 10)):
    return Image.new("RGB", size, color)


def _write(path, img=None, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    (img or _img()).save(path, format=fmt)
    return path


def _png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _assert_contract_image(image, shape):
    assert image.dtype == torch.float32 and tuple(image.shape) == shape
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    for name in ("red_star", "blue_circle"):
        for k in range(3):
            _write(root / name / f"{k}.png")
    _write(root / "blue_circle" / "sub" / "9.jpg", fmt="JPEG")  # nested files count too
    (root / "blue_circle" / "notes.txt").write_text("not an image")
    return root


# ----------------------------------------------------------------------------- ImageFolder
def test_image_folder_contract(folder):
    ds = ImageFolderDataset(folder)
    assert ds.classnames == ["blue circle", "red star"]
    assert len(ds) == 7 and ds.root == folder
    assert ds.sample_ids[:4] == ["blue_circle/0.png", "blue_circle/1.png", "blue_circle/2.png", "blue_circle/sub/9.jpg"]
    image, label, i = ds[4]
    _assert_contract_image(image, (3, 10, 12))
    assert label == 1 and i == 4
    assert torch.allclose(image[:, 0, 0], torch.tensor([200, 30, 30]) / 255.0)
    assert ImageFolderDataset(folder, image_size=8)[0][0].shape == (3, 8, 8)
    assert ImageFolderDataset(folder, image_size=8, augment=True)[0][0].shape == (3, 8, 8)


def test_native_size_mismatch_names_the_file(folder):
    odd = _write(folder / "red_star" / "2.png", _img(size=(20, 20)))
    ds = ImageFolderDataset(folder)
    with pytest.raises(DataError, match=str(odd)):
        ds[len(ds) - 1]
    with pytest.raises(DataError, match=str(odd)):
        ds.verify_sizes()
    assert ImageFolderDataset(folder, image_size=10)[len(ds) - 1][0].shape == (3, 10, 10)


def test_bad_layouts_raise_data_error(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "missing")):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No class folders"):
        ImageFolderDataset(tmp_path / "empty")
    _write(tmp_path / "one" / "a" / "0.png")
    (tmp_path / "one" / "b").mkdir()
    with pytest.raises(DataError, match=r"one/b has no image files.*layout"):
        ImageFolderDataset(tmp_path / "one")


# ----------------------------------------------------------------------------- conversions and bad files
@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("L", (4, 4), 100), (100, 100, 100)),
        (lambda: Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("RGBA", (4, 4), (10, 20, 30, 255)), (10, 20, 30)),
        (lambda: Image.new("LA", (4, 4), (50, 255)), (50, 50, 50)),
        (lambda: Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (lambda: Image.new("I;16", (4, 4), 65535), (255, 255, 255)),
        (lambda: Image.new("I", (4, 4), 257 * 40), (40, 40, 40)),
        (lambda: Image.new("RGB", (4, 4), (1, 2, 3)).convert("P", palette=Image.ADAPTIVE), (1, 2, 3)),
    ],
)
def test_modes_convert_to_rgb8(make, expected):
    out = to_rgb(make())
    assert out.mode == "RGB"
    assert tuple(np.asarray(out)[0, 0]) == expected


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG")])
def test_files_of_other_modes_load(tmp_path, mode, fmt):
    _write(tmp_path / "c" / "x.img", Image.new(mode, (6, 6)), fmt=fmt)
    (tmp_path / "c" / "x.img").rename(tmp_path / "c" / f"x.{fmt.lower()}")
    image, _, _ = ImageFolderDataset(tmp_path)[0]
    _assert_contract_image(image, (3, 6, 6))


def test_corrupt_file_skipped_and_counted(folder):
    bad = folder / "blue_circle" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    ds = ImageFolderDataset(folder)
    image, label, i = ds[1]
    assert i == 2 and label == 0  # replaced by the next readable sample
    _assert_contract_image(image, (3, 10, 12))
    assert len([x for x in ds]) == len(ds)  # a full pass never crashes
    count, paths = ds.pop_skipped()
    assert count == 2 and paths == [str(bad)]
    assert ds.pop_skipped() == (0, [])
    with pytest.raises(DataError, match=str(bad)):
        ImageFolderDataset(folder, strict=True)[1]


def test_skip_count_crosses_dataloader_workers(folder):
    (folder / "red_star" / "0.png").write_bytes(b"garbage")
    ds = ImageFolderDataset(folder, image_size=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)
    assert sum(len(b[0]) for b in loader) == len(ds)
    assert ds.pop_skipped()[0] == 1


# ----------------------------------------------------------------------------- ImageNet style
@pytest.fixture
def imagenet(tmp_path):
    wnids = ["n01440764", "n01443537", "n01484850"]
    for split in ("train", "val"):
        for w in wnids:
            for k in range(2):
                _write(tmp_path / split / w / f"ILSVRC2012_{split}_{w}_{k}.JPEG", fmt="JPEG")
    return tmp_path, wnids


def test_imagenet_folder_partial(imagenet):
    """A subset of ImageNet-1k's classes (ImageNet-100 style) trains with ImageNet's names for its
    wnids; a folder that is not one of them would take a label and a meaningless name."""
    root, wnids = imagenet
    ds = imagenet_folder(root, "val", image_size=8)
    assert ds.classnames == ["tench", "goldfish", "great white shark"] and len(ds) == 6 and ds[5][1] == 2
    with pytest.raises(DataError, match="train"):
        imagenet_folder(root / "nothing", "train")
    for stray in ("extra", "n99999999"):  # a stray folder, a wnid outside ImageNet-1k
        _write(root / "val" / stray / "a.JPEG", fmt="JPEG")
        with pytest.raises(DataError, match=f"1 class folders are not ImageNet-1k wnids \\({stray}\\); remove them"):
            imagenet_folder(root, "val", image_size=8)
        shutil.rmtree(root / "val" / stray)


def test_imagenet_val_subset(imagenet):
    root, wnids = imagenet
    lst = root / "subset.txt"
    lst.write_text(f"{wnids[2]}/ILSVRC2012_val_{wnids[2]}_1.JPEG\n{wnids[0]}/ILSVRC2012_val_{wnids[0]}_0.JPEG\n")
    ds = imagenet_val_subset(root, list_file=lst, image_size=8)
    assert [ds[k][1] for k in range(2)] == [2, 0]
    assert ds.sample_ids[0] == f"{wnids[2]}/ILSVRC2012_val_{wnids[2]}_1.JPEG"
    assert ds.classnames == wnids
    lst.write_text(lst.read_text() + f"{wnids[1]}/gone_1.JPEG\n{wnids[1]}/gone_2.JPEG\n")
    with pytest.raises(DataError, match=r"2 of 4 .*gone_1.JPEG"):
        imagenet_val_subset(root, list_file=lst)


def test_packaged_subset_list_and_imagenet_names():
    entries = read_subset_list(packaged_subset_list())
    assert len(entries) == 5000 and len(set(entries)) == 5000
    assert all(e.split("/")[1].startswith("ILSVRC2012_val_") for e in entries)
    real = list(imagenet_wnids())
    assert len(real) == 1000 and real[0] == "n01440764"
    assert folder_classnames(real) == imagenet_classnames()
    assert imagenet_classnames()[0] == "tench"
    # 1000 wnid-like folders, one of them not ImageNet-1k's, would shift every later label
    stray = sorted(real[:500] + ["n00000001"] + real[501:])
    assert folder_classnames(stray) == stray  # an image folder of other wnids keeps them as names
    with pytest.raises(DataError, match=r"/data/val: .*not ImageNet-1k: n00000001; missing: " + real[500]):
        check_imagenet_wnids(stray, "/data/val")  # what ImageNet's own loaders check
    with pytest.raises(DataError, match="out of ImageNet's"):
        check_imagenet_wnids(real[::-1], "wnids=")


# ----------------------------------------------------------------------------- captions and shards
def test_caption_csv(tmp_path):
    _write(tmp_path / "im" / "a.png")
    _write(tmp_path / "im" / "b.png", _img((0, 0, 255)))
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text('path,text\nim/a.png,"a red thing, small"\nim/b.png,a blue thing\n')
    ds = CaptionCSVDataset(csv_path, path_column="path", caption_column="text")
    image, text, i = ds[1]
    _assert_contract_image(image, (3, 10, 12))
    assert text == "a blue thing" and i == 1 and ds.sample_ids == ["im/a.png", "im/b.png"]
    assert ds[0][1] == "a red thing, small"
    with pytest.raises(DataError, match="no column 'filepath'"):
        CaptionCSVDataset(csv_path)
    with pytest.raises(DataError, match="does not exist"):
        CaptionCSVDataset(tmp_path / "none.csv")


def _write_shard(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)


def test_webdataset_shards(tmp_path):
    png = _png_bytes(_img())
    for k in range(2):
        _write_shard(
            tmp_path / f"shard-{k:02d}.tar",
            [
                {"__key__": f"s{k}{j}", "png": png, "cls": str(j).encode(), "txt": f"cap {k}{j}".encode()}
                for j in range(3)
            ],
        )
    pattern = str(tmp_path / "shard-{00..01}.tar")
    items = list(ShardDataset(pattern, "cls"))
    assert [key for _, _, key in items] == ["s00", "s01", "s02", "s10", "s11", "s12"]
    assert [label for _, label, _ in items] == [0, 1, 2, 0, 1, 2]
    _assert_contract_image(items[0][0], (3, 10, 12))
    caps = list(ShardDataset(pattern, "txt", image_size=8))
    assert caps[4][1] == "cap 11" and caps[4][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match="does not exist"):
        ShardDataset(str(tmp_path / "shard-{00..02}.tar"))


def test_shuffled_shards_are_read_once_each_across_workers(tmp_path):
    """The shard list is shuffled after it is split among the DataLoader workers: shuffled before,
    each worker would shuffle it differently and their shares would overlap."""
    png = _png_bytes(_img())
    for k in range(8):
        _write_shard(tmp_path / f"shard-{k:02d}.tar",
                     [{"__key__": f"s{k}{j}", "png": png, "cls": b"0"} for j in range(4)])
    dataset = ShardDataset(str(tmp_path / "shard-{00..07}.tar"), "cls", shuffle=10)
    for trial in range(3):
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        keys = [key for _, _, key in loader]
        assert sorted(keys) == sorted(f"s{k}{j}" for k in range(8) for j in range(4)), trial


def test_webdataset_corrupt_sample(tmp_path):
    good = _png_bytes(_img())
    _write_shard(tmp_path / "s.tar", [
        {"__key__": "a", "png": good, "cls": b"0"},
        {"__key__": "b", "png": b"broken", "cls": b"1"},
        {"__key__": "c", "png": good, "cls": b"2"},
    ])
    ds = ShardDataset(str(tmp_path / "s.tar"))
    assert [key for _, _, key in ds] == ["a", "c"]
    count, ids = ds.pop_skipped()
    assert count == 1 and ids[0].endswith("s.tar:b")
    with pytest.raises(DataError, match="s.tar:b"):
        list(ShardDataset(str(tmp_path / "s.tar"), strict=True))


# ----------------------------------------------------------------------------- zero-shot suite
def test_zeroshot_suite_wrapper(tmp_path):
    ds = build_zeroshot_dataset("dummy", tmp_path, image_size=None)
    image, label, i = ds[0]
    _assert_contract_image(image, (3, 224, 224))
    assert (label, i) == (0, 0) and ds.classnames == ["blank image", "noisy image"]
    assert ds.templates
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        build_zeroshot_dataset("cifar10", tmp_path / "nowhere")
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        build_zeroshot_dataset("cifar10", tmp_path)  # folder exists, files do not: no download
    assert "a photo of a {}." in zeroshot_templates("cifar10")  # clip-benchmark's {c} slot as {}
    assert all("{c}" not in t for t in ds.templates)
    assert zeroshot_templates("imagenet-r") == zeroshot_templates("imagenet1k")


# ----------------------------------------------------------------------------- helpers
def test_check_classnames_names_first_mismatch():
    check_classnames(["a", "b"], ["a", "b"], "here")
    with pytest.raises(DataError, match=r"here differ at index 1: expected 'b', got 'c'"):
        check_classnames(["a", "b", "x"], ["a", "c", "y"], "here")
    with pytest.raises(DataError, match=r"index 2: expected 'z', got '<none>'"):
        check_classnames(["a", "b", "z"], ["a", "b"], "here")


def test_subsample_indices():
    a = subsample_indices(1000, 50, seed=7)
    assert a == subsample_indices(1000, 50, seed=7)
    assert a == sorted(set(a)) and len(a) == 50 and 0 <= a[0] and a[-1] < 1000
    assert a != subsample_indices(1000, 50, seed=8)
    assert subsample_indices(5, 9, seed=0) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("width,height", [(500, 375), (227, 224), (224, 227), (333, 257), (100, 50), (224, 224)])
def test_evaluation_resize_is_clips_pixel_for_pixel(width, height):
    """Short side to 224 (bicubic) and a centre crop, exactly as CLIP's torchvision transform: it
    truncates the longer side and rounds the crop offset (an image one pixel off would be
    evaluated on other pixels than the reference's)."""
    from torchvision import transforms

    from mmtard.data.images import resize_center_crop

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    clip_transform = transforms.Compose([transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
                                         transforms.CenterCrop(224)])
    assert np.array_equal(np.asarray(resize_center_crop(img, 224)), np.asarray(clip_transform(img)))


def test_a_suite_set_missing_class_folders_is_refused(tmp_path):
    """clip-benchmark numbers ImageNet-R's labels by the wnid folders present and names them with
    all 200 names: with a folder missing, every later label would name the wrong class."""
    for wnid in ("n01443537", "n01484850"):
        (tmp_path / wnid).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / wnid / "a.jpg")
    with pytest.raises(DataError, match=r"'imagenet-r' at .* has 2 class folders but the set has 200 classes"):
        build_zeroshot_dataset("imagenet-r", tmp_path)


def test_text_files_with_a_byte_order_mark_read_as_without(tmp_path):
    from mmtard.data.base import read_classnames

    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n", encoding="utf-8-sig")
    assert read_classnames(names) == ["cat", "dog"]
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    captions = tmp_path / "captions.csv"
    captions.write_text("filepath,caption\na.png,a cat\n", encoding="utf-8-sig")
    assert CaptionCSVDataset(captions).captions == ["a cat"]
    captions.write_bytes(b"filepath,caption\na.png,caf\xe9\n")  # latin-1, not UTF-8
    with pytest.raises(DataError, match=r"captions.csv is not UTF-8 text"):
        CaptionCSVDataset(captions)
