"""Robust image decoding and the one transform every dataset uses.

Images leave this module as float32 tensors 3xHxW in [0, 1] with no mean/std normalisation: each
model normalises its own input (see DESIGN.md, "Contracts").
"""

from __future__ import annotations

import logging
import math
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmtard.errors import DataError

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

# Random-resized-crop parameters of the usual ImageNet recipe, with a larger minimum scale because
# the images this project trains on are small and the objects in them should stay visible.
_RRC_SCALE = (0.35, 1.0)
_RRC_RATIO = (3 / 4, 4 / 3)


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` has one of the supported image extensions (case-insensitive)."""
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any PIL image to 8-bit RGB.

    Transparent images are composited on white (a transparent background is usually meant to be
    paper, not black); 16-bit and 32-bit integer images are taken to span 0..65535, which is what
    16-bit PNG and TIFF decode to; float images are taken to span 0..255.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "F":
            arr = arr / 257.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        if arr.ndim == 3:  # e.g. 'I;16' multi-channel variants
            arr = arr[..., 0]
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Decodes ``path`` fully and returns it as 8-bit RGB; raises whatever PIL raises."""
    with Image.open(path) as img:
        img.load()  # decode now: a truncated file must fail here, not later in the transform
        return to_rgb(img)


def decode_image_bytes(data: bytes) -> Image.Image:
    """Same as :func:`load_image`, for bytes read from a tar shard."""
    import io

    return load_image(io.BytesIO(data))


def image_size_of(path: str | Path) -> tuple[int, int] | None:
    """Width and height read from the header only, or None when the header cannot be read."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception:  # noqa: BLE001 - any unreadable header means "unknown", decided later
        return None


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 tensor 3xHxW in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resizes the shorter side to ``size`` (bicubic) and crops the centre ``size`` x ``size``:
    CLIP's evaluation transform, pixel for pixel (torchvision's ``Resize(size)`` truncates the
    longer side, ``int(size * long / short)``; its ``CenterCrop`` rounds the offset)."""
    w, h = img.size
    if (w, h) != (size, size):
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return img


def random_resized_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Inception-style random crop (area and aspect ratio) resized to ``size`` (w, h).

    Draws from torch's generator so that DataLoader workers get distinct, seedable streams.
    """
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(*_RRC_SCALE))
        log_ratio = torch.empty(1).uniform_(math.log(_RRC_RATIO[0]), math.log(_RRC_RATIO[1]))
        ratio = math.exp(float(log_ratio))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(torch.randint(0, w - cw + 1, (1,)))
            top = int(torch.randint(0, h - ch + 1, (1,)))
            return img.resize(size, Image.BICUBIC, box=(left, top, left + cw, top + ch))
    return img.resize(size, Image.BICUBIC)  # fallback: whole image


class ImageTransform:
    """PIL RGB image -> tensor in [0, 1], optionally resized and augmented.

    Args:
        image_size: None keeps the native size; an int resizes the shorter side (bicubic) and
            centre-crops to ``image_size`` x ``image_size``.
        augment: random resized crop (to ``image_size``, or to the native size when None) and a
            horizontal flip with probability 1/2.
    """

    def __init__(self, image_size: int | None = None, augment: bool = False):
        self.image_size = image_size
        self.augment = augment

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.augment:
            out = img.size if self.image_size is None else (self.image_size, self.image_size)
            img = random_resized_crop(img, out)
            if bool(torch.rand(1) < 0.5):
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        elif self.image_size is not None:
            img = resize_center_crop(img, self.image_size)
        return pil_to_tensor(img)

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size}, augment={self.augment})"


class SkipLog:
    """Counts the unreadable files a dataset replaced, across DataLoader worker processes.

    The counter and a bounded buffer of paths live in shared memory created in the parent
    process, so copies of the dataset inside workers (fork or spawn) write to the same place and
    the trainer can read and reset them once per epoch with :meth:`pop`.
    """

    _BUFFER_BYTES = 16384

    def __init__(self):
        ctx = multiprocessing.get_context()
        self._lock = ctx.Lock()
        self._count = ctx.RawValue("q", 0)
        self._used = ctx.RawValue("q", 0)
        self._buffer = ctx.RawArray("c", self._BUFFER_BYTES)

    def record(self, path: str | Path, reason: str) -> None:
        """Counts one skipped file and keeps its path while the buffer has room."""
        line = (str(path) + "\n").encode("utf-8", "replace")
        with self._lock:
            first = self._count.value == 0
            self._count.value += 1
            start = self._used.value
            if start + len(line) <= self._BUFFER_BYTES:
                self._buffer[start : start + len(line)] = line
                self._used.value = start + len(line)
        if first:
            _logger.warning("Skipping unreadable image %s (%s); later ones are counted.", path, reason)

    @property
    def count(self) -> int:
        """Number of skips since the last :meth:`pop`."""
        return int(self._count.value)

    def peek(self) -> tuple[int, list[str]]:
        """Count and the recorded paths (unique, in order; may be truncated), without resetting."""
        with self._lock:
            raw = bytes(self._buffer[: self._used.value])
            count = int(self._count.value)
        paths = list(dict.fromkeys(p for p in raw.decode("utf-8", "replace").split("\n") if p))
        return count, paths

    def pop(self) -> tuple[int, list[str]]:
        """Same as :meth:`peek`, then resets the count and the paths."""
        with self._lock:
            raw = bytes(self._buffer[: self._used.value])
            count = int(self._count.value)
            self._count.value = 0
            self._used.value = 0
        paths = list(dict.fromkeys(p for p in raw.decode("utf-8", "replace").split("\n") if p))
        return count, paths


def corrupt_error(path: str | Path, exc: BaseException) -> DataError:
    """The strict-mode error for an unreadable image."""
    return DataError(
        f"Cannot read image {path}: {type(exc).__name__}: {exc}. Remove or replace the file (training "
        "data: data.strict=false skips unreadable files)."
    )
