"""The clean-teacher cache: image embeddings of clean, un-augmented training images, per sample id.

A frozen teacher's output on a fixed image never changes, so after the first epoch the clean
teacher's forward pass (a large ViT-L in the paper) is replaced by a read from a memory-mapped
file. One file per teacher and rank; a second mask file says which rows are filled. Only valid
when the training images are not augmented (the trainer checks this).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmtard.methods.base import TeacherEmbeddingCache


class CleanTeacherCache(TeacherEmbeddingCache):
    def __init__(self, folder: str | Path, num_samples: int, rank: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.num_samples = num_samples
        self.rank = rank
        self._tables: dict[int, tuple[np.memmap, np.memmap]] = {}
        self.hits = 0
        self.misses = 0

    def _table(self, teacher_index: int, dim: int) -> tuple[np.memmap, np.memmap]:
        if teacher_index not in self._tables:
            stem = self.folder / f"teacher{teacher_index}-rank{self.rank}"
            values_path, mask_path = stem.with_suffix(".f32"), stem.with_suffix(".mask")
            mode = "r+" if values_path.exists() and mask_path.exists() else "w+"
            values = np.memmap(values_path, dtype=np.float32, mode=mode, shape=(self.num_samples, dim))
            mask = np.memmap(mask_path, dtype=np.bool_, mode=mode, shape=(self.num_samples,))
            self._tables[teacher_index] = (values, mask)
        return self._tables[teacher_index]

    @torch.no_grad()
    def lookup(self, teacher_index: int, model: nn.Module, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings of ``images`` (sample ids ``indices``), computing only the misses."""
        ids = indices.detach().cpu().numpy()
        dim = model.text_weights.shape[0]
        values, mask = self._table(teacher_index, dim)
        missing = ~mask[ids]
        if missing.any():
            rows = torch.from_numpy(np.nonzero(missing)[0]).to(images.device)
            fresh = model.image_embed(images[rows]).float()
            values[ids[missing]] = fresh.cpu().numpy()
            mask[ids[missing]] = True
        self.hits += int((~missing).sum())
        self.misses += int(missing.sum())
        rows = torch.from_numpy(np.ascontiguousarray(values[ids]))
        if images.device.type == "cuda":
            # A copy from pageable memory waits for the whole stream first (a host-device sync per
            # step); from pinned memory it is queued like any kernel.
            return rows.pin_memory().to(images.device, non_blocking=True)
        return rows.to(images.device)

    def flush(self) -> None:
        for values, mask in self._tables.values():
            values.flush()
            mask.flush()
