"""The zero-shot evaluation suite of METHOD.md section 8, read through clip-benchmark.

clip-benchmark's ``build_dataset`` knows where each dataset's files go; this module never lets it
download (its fallbacks for ImageNet-R/Sketch shell out to wget/gdown when the root is missing), and
wraps what it returns into the project's ``(image, label, i)`` contract with ``classnames``.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mmtard.data.base import first_readable
from mmtard.data.images import ImageTransform, SkipLog, corrupt_error, to_rgb
from mmtard.errors import DataError

_logger = logging.getLogger(__name__)

# Where each dataset's files must sit under ``root`` (the torchvision / clip-benchmark layouts).
SUITE_LAYOUTS = {
    "cifar10": "<root>/cifar-10-batches-py/ (torchvision CIFAR10)",
    "cifar100": "<root>/cifar-100-python/ (torchvision CIFAR100)",
    "stl10": "<root>/stl10_binary/ (torchvision STL10)",
    "cars": "<root>/stanford_cars/ with devkit/, cars_test/, cars_test_annos_withlabels.mat (torchvision StanfordCars)",
    "caltech101": "<root>/caltech101/101_ObjectCategories/ and Annotations/ (torchvision Caltech101)",
    "pets": "<root>/oxford-iiit-pet/images/ and annotations/ (torchvision OxfordIIITPet)",
    "flowers": "<root>/flowers-102/jpg/, imagelabels.mat, setid.mat (torchvision Flowers102)",
    "dtd": "<root>/dtd/dtd/images/ and labels/ (torchvision DTD)",
    "eurosat": "<root>/eurosat/2750/<class>/*.jpg (torchvision EuroSAT)",
    "fgvc_aircraft": "<root>/fgvc-aircraft-2013b/data/ (torchvision FGVCAircraft)",
    "pcam": "<root>/pcam/camelyonpatch_level_2_split_test_{x,y}.h5 (torchvision PCAM, needs h5py)",
    "imagenet-r": "<root>/<wnid>/*.jpg: the extracted imagenet-r.tar itself (200 wnid folders)",
    "imagenet_sketch": "<root>/<wnid>/*.JPEG: the extracted 'sketch' folder of ImageNet-Sketch (1000 wnid folders)",
    "dummy": "nothing (clip-benchmark's built-in one-image test set)",
}
ZEROSHOT_SUITE = tuple(name for name in SUITE_LAYOUTS if name != "dummy")


@lru_cache(maxsize=None)
def clip_benchmark_json(filename: str) -> dict:
    """One of the metadata files clip-benchmark ships beside its dataset builders (English class
    names, prompt templates); read once per process. The one reader of those files in mmtard."""
    import clip_benchmark.datasets as cbd

    path = Path(cbd.__file__).parent / filename
    return json.loads(path.read_text(encoding="utf-8"))


def zeroshot_templates(name: str) -> list[str]:
    """clip-benchmark's English prompt templates for ``name``, with its ``{c}`` slot written
    ``{}`` (the form :func:`mmtard.zeroshot.compute_text_weights` formats and hashes).

    A set without templates of its own (ImageNet-R, ImageNet-Sketch, ...) gets ImageNet's, as in
    clip-benchmark itself; ImageNet's are the 80 of OpenAI's ensemble, the same list and order as
    ``open_clip.OPENAI_IMAGENET_TEMPLATES`` (a test holds the two equal).
    """
    templates = clip_benchmark_json("en_zeroshot_classification_templates.json")
    return [template_slot(t) for t in templates.get(suite_key(name), templates["imagenet1k"])]


def suite_key(name: str) -> str:
    """The key clip-benchmark's metadata files use for a set (``imagenet`` is ``imagenet1k``)."""
    return {"imagenet": "imagenet1k"}.get(name, name)


def template_slot(template: str) -> str:
    """clip-benchmark's ``{c}`` class slot as ``{}``."""
    return template.replace("{c}", "{}")


class _SuiteTransform:
    """PIL image from a torchvision dataset -> contract tensor (a class so workers can pickle it)."""

    def __init__(self, image_size: int | None):
        self.inner = ImageTransform(image_size, augment=False)

    def __call__(self, img) -> torch.Tensor:
        if isinstance(img, torch.Tensor):  # e.g. clip-benchmark's dummy set
            return img.float().clamp(0, 1)
        return self.inner(to_rgb(img))


def _sample_ids(ds, name: str, n: int) -> list[str]:
    samples = getattr(ds, "samples", None)
    root = getattr(ds, "root", None)
    if isinstance(samples, list) and len(samples) == n and samples and isinstance(samples[0], tuple):
        paths = [str(s[0]) for s in samples]
        if root is not None:
            prefix = str(root).rstrip("/") + "/"
            paths = [p[len(prefix) :] if p.startswith(prefix) else p for p in paths]
        return paths
    return [f"{name}/{i}" for i in range(n)]


class ZeroShotSuiteDataset(Dataset):
    """A clip-benchmark dataset behind the ``(image, label, i)`` contract.

    Attributes: ``classnames`` (clip-benchmark's cleaned names), ``templates``, ``sample_ids``,
    ``root``, ``name``. Unreadable samples are replaced by the next index and counted in
    ``skip_log`` unless ``strict``. With ``image_size=None`` every image must have the size of the
    first one.
    """

    def __init__(self, name: str, inner, root: Path, image_size: int | None, strict: bool):
        self.name = name
        self.inner = inner
        self.root = Path(root)
        self.image_size = image_size
        self.strict = strict
        self.classnames = list(inner.classes)
        own = getattr(inner, "templates", None)
        self.templates = [template_slot(t) for t in own] if own else zeroshot_templates(name)
        self.sample_ids = _sample_ids(inner, name, len(inner))
        self.skip_log = SkipLog()
        self._native_shape = None
        if image_size is None and len(inner) > 0:
            self._native_shape = tuple(self[0][0].shape)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        (image, label), i = first_readable(index, len(self.inner), self._try_load,
                                           f"No readable sample in {self.name} at {self.root}")
        return image, int(label), i

    def _try_load(self, i: int):
        try:
            image, label = self.inner[i]
        except Exception as exc:  # noqa: BLE001 - torchvision/PIL raise many types
            if self.strict:
                raise corrupt_error(f"{self.name}[{i}] ({self.sample_ids[i]})", exc) from exc
            self.skip_log.record(f"{self.name}:{self.sample_ids[i]}", f"{type(exc).__name__}: {exc}")
            return None
        if self._native_shape is not None and tuple(image.shape) != self._native_shape:
            raise DataError(
                f"{self.name} sample {self.sample_ids[i]} has shape {tuple(image.shape)} but the first "
                f"has {self._native_shape}; pass an image_size to resize the set."
            )
        return image, label

    def pop_skipped(self) -> tuple[int, list[str]]:
        """Number and ids of samples skipped since the last call, then resets them."""
        return self.skip_log.pop()


def build_zeroshot_dataset(
    name: str,
    root: str | Path,
    image_size: int | None = 224,
    split: str = "test",
    strict: bool = False,
) -> ZeroShotSuiteDataset:
    """One set of the zero-shot suite, from files already on disk (never downloads).

    Args:
        name: a clip-benchmark dataset name, e.g. one of ``ZEROSHOT_SUITE``.
        root: the folder clip-benchmark expects for that set (see ``SUITE_LAYOUTS``).
        image_size: shorter-side resize + centre crop; None keeps native size (all equal).
        split: the split clip-benchmark reads (``"test"`` for the paper's protocol).
        strict: raise on unreadable files instead of skipping them.
    """
    from clip_benchmark.datasets.builder import build_dataset

    root = Path(root)
    layout = SUITE_LAYOUTS.get(name, "the clip-benchmark layout of this dataset")
    if name != "dummy" and not root.is_dir():
        raise DataError(f"Zero-shot dataset {name!r}: folder {root} does not exist. clip-benchmark expects {layout}.")
    try:
        inner = build_dataset(
            name, root=str(root), transform=_SuiteTransform(image_size), split=split, download=False
        )
    except (RuntimeError, FileNotFoundError, OSError, AssertionError, ValueError, ImportError) as exc:
        raise DataError(
            f"Zero-shot dataset {name!r} cannot be read from {root} ({type(exc).__name__}: {exc}). "
            f"clip-benchmark expects {layout}."
        ) from exc
    if len(inner) == 0:
        raise DataError(f"Zero-shot dataset {name!r} at {root} is empty. clip-benchmark expects {layout}.")
    folders = getattr(inner, "class_to_idx", None)
    if folders is not None and len(folders) != len(inner.classes):
        # clip-benchmark numbers the labels by the class folders present, then names them with the
        # full list: a missing folder would shift every later label onto the wrong name
        raise DataError(f"Zero-shot dataset {name!r} at {root} has {len(folders)} class folders but the set has "
                        f"{len(inner.classes)} classes; every class folder must be present. clip-benchmark "
                        f"expects {layout}.")
    return ZeroShotSuiteDataset(name, inner, root, image_size, strict)
