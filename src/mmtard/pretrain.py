"""Contrastive pre-training of a CLIP on image-caption pairs (the demo's stand-in for OpenAI CLIP).

The demo needs CLIPs whose zero-shot heads mean something before any robust training, and has
no network to download them: it trains tiny ones on the offline world's captions with open_clip's
own contrastive loss. Both towers train here, unlike in distillation.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mmtard.errors import DataError
from mmtard.models import CLIPClassifier, ModelSpec, create_clip, export_open_clip
from mmtard.trainer import cosine_lr

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig:
    model: str = "mmtard-tiny-vit"
    steps: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_frac: float = 0.05
    seed: int = 0


def pretrain_clip(captions, cfg: PretrainConfig, out_file: str | Path, show_progress: bool = True) -> Path:
    """Train ``cfg.model`` from scratch on ``captions`` ((image, caption, i) samples) and export it.

    Skipped when ``out_file`` already exists, so a re-run demo reuses finished stages.
    """
    out_file = Path(out_file)
    if out_file.exists():
        return out_file
    if len(captions) < cfg.batch_size:  # not one whole batch: the loop would never run
        raise DataError(f"pre-training {cfg.model}: {len(captions)} image-caption pairs, fewer than one batch "
                        f"of {cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    clip = create_clip(ModelSpec(cfg.model)).train()
    wrapper = CLIPClassifier(clip)  # for its resize + normalisation of [0, 1] images
    tokenizer = open_clip.get_tokenizer(cfg.model)
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_frac * cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, cfg.steps, warmup))
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(captions, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=generator)
    epochs = math.ceil(cfg.steps / max(1, len(loader)))
    bar = tqdm(total=cfg.steps, desc=f"pretrain {cfg.model}", disable=not show_progress, dynamic_ncols=True)
    step, start = 0, time.perf_counter()
    for _ in range(epochs):
        for images, texts, _ in loader:
            image_features = clip.encode_image(wrapper.prepare(images), normalize=True)
            text_features = clip.encode_text(tokenizer(list(texts)), normalize=True)
            loss = loss_fn(image_features, text_features, clip.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():  # the usual CLIP clamp of the temperature
                clip.logit_scale.clamp_(0, math.log(100))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step >= cfg.steps:
                break
        if step >= cfg.steps:
            break
    bar.close()
    log.info("pre-trained %s for %d steps in %.0f s (final loss %.3f)", cfg.model, step,
             time.perf_counter() - start, loss.item())
    return export_open_clip(clip.eval(), out_file)
