"""Image-caption pairs from a CSV file, for contrastive pre-training of (tiny) CLIPs."""

from __future__ import annotations

import csv
from pathlib import Path

from mmtard.data.base import ImageListDataset
from mmtard.errors import DataError


class CaptionCSVDataset(ImageListDataset):
    """Rows of ``filepath,caption``; ``dataset[i]`` is ``(image, caption, i)``.

    Relative paths are taken relative to the CSV's folder (its ``root``); ``sample_ids`` are the
    paths as written in the CSV. Files that cannot be read are skipped (counted) unless strict.

    Args:
        csv_path: the CSV file, with a header row.
        image_size: None keeps native size (all images must share it); an int resizes the shorter
            side (bicubic) and centre-crops.
        augment: random resized crop + horizontal flip.
        strict: raise on unreadable files instead of replacing them by the next readable one.
        path_column: header of the image path column.
        caption_column: header of the caption column.
        delimiter: the CSV field separator (``"\\t"`` for TSV files).
    """

    def __init__(
        self,
        csv_path: str | Path,
        image_size: int | None = None,
        augment: bool = False,
        strict: bool = False,
        path_column: str = "filepath",
        caption_column: str = "caption",
        delimiter: str = ",",
    ):
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise DataError(
                f"Caption file {csv_path} does not exist. Expected a CSV with a header row and columns "
                f"{path_column!r},{caption_column!r}; image paths relative to the CSV's folder."
            )
        root = csv_path.parent
        try:  # utf-8-sig: a byte-order mark is not part of the first column's name
            with open(csv_path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f, delimiter=delimiter)
                header = reader.fieldnames or []
                for col in (path_column, caption_column):
                    if col not in header:
                        raise DataError(f"Caption file {csv_path} has no column {col!r}; its columns are {header}.")
                rows = [(r[path_column], r[caption_column]) for r in reader if r.get(path_column)]
        except UnicodeDecodeError as exc:
            raise DataError(f"Caption file {csv_path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        if not rows:
            raise DataError(f"Caption file {csv_path} has no rows.")
        files = [Path(p) if Path(p).is_absolute() else root / p for p, _ in rows]
        captions = [c or "" for _, c in rows]
        super().__init__(root, files, captions, [p for p, _ in rows], image_size, augment, strict)
        self.csv_path = csv_path
        self.captions = captions
