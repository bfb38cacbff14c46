"""Zero-shot heads: class names + prompt templates -> class text embeddings, cached on disk.

Each model uses its own text encoder (METHOD.md §1): column k of W is
normalize(mean over templates t of normalize(g(t(class_k)))). Text embeddings of a frozen text
tower never change, so they are computed once per (weights, classes, templates) and reused from a
small cache file; a change of any of the three changes the key and invalidates the entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from mmtard.checkpoint import atomic_save, first_line
from mmtard.config import check_class_template
from mmtard.data.folders import imagenet_classnames
from mmtard.data.zeroshot_suite import clip_benchmark_json, suite_key
from mmtard.errors import DataError, MmtardError

log = logging.getLogger(__name__)

# The release trains with this single template (METHOD.md §1).
TRAIN_TEMPLATES = ("This is a photo of a {}",)


def _template_string(template: str | Callable[[str], str]) -> str:
    """open_clip stores templates as lambdas; a '{}' string form is what we hash and format."""
    return template if isinstance(template, str) else template("{}")


def imagenet_templates() -> list[str]:
    """The 80-template OpenAI ImageNet ensemble used for evaluation (METHOD.md §8)."""
    return [_template_string(t) for t in open_clip.OPENAI_IMAGENET_TEMPLATES]


def suite_classnames(dataset: str) -> list[str] | None:
    """Curated class names from clip-benchmark where it has them; None means: use the dataset's own
    ``classes`` (torchvision datasets such as CIFAR name their classes well)."""
    name = suite_key(dataset)
    if name == "imagenet1k":
        return imagenet_classnames()
    names = clip_benchmark_json("en_classnames.json")
    return list(names[name]) if name in names else None


def fingerprint_text_tower(clip: nn.Module) -> str:
    """Hash of everything the text embeddings depend on: every weight but the image tower's, and
    the activation, which has no weights (a GELU and a QuickGELU tower share their state dict)."""
    from mmtard.models import uses_quick_gelu

    digest = hashlib.sha256(b"quick_gelu" if uses_quick_gelu(clip) else b"gelu")
    for key, value in sorted(clip.state_dict().items()):
        if key.startswith("visual."):
            continue
        digest.update(key.encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


def cache_key(clip: nn.Module, classnames: Sequence[str], templates: Sequence[str],
              fingerprint: str | None = None, model_name: str = "") -> str:
    """``fingerprint`` (of the text tower, from :func:`fingerprint_text_tower`) saves re-hashing a
    large frozen tower when one model gets heads for many datasets. ``model_name`` stands for what
    the weights do not hold: the tokenizer it picks and the text tower's settings (pooling,
    causal mask), with open_clip's version, which implements both."""
    payload = json.dumps({"classes": list(classnames), "templates": list(templates), "model": model_name,
                          "open_clip": open_clip.__version__}, ensure_ascii=False)
    text_hash = hashlib.sha256(payload.encode()).hexdigest()[:24]
    return f"{fingerprint or fingerprint_text_tower(clip)}-{text_hash}"


@torch.no_grad()
def compute_text_weights(
    clip: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    batch_size: int = 256,
) -> torch.Tensor:
    """d x K matrix of class embeddings: template-averaged, normalised (METHOD.md §1)."""
    templates = [_template_string(t) for t in templates]
    if not classnames or not templates:
        raise DataError("a zero-shot head needs at least one class name and one template")
    for i, template in enumerate(templates):
        check_class_template(template, f"zero-shot template {i}")
    device = next(clip.parameters()).device
    prompts = [t.format(c) for c in classnames for t in templates]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size]).to(device)
        chunks.append(F.normalize(clip.encode_text(tokens).float(), dim=-1))
    per_prompt = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1).t().contiguous()


def text_weights(
    clip: nn.Module,
    model_name: str,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    fingerprint: str | None = None,
) -> torch.Tensor:
    """Class text embeddings for ``clip``, read from ``cache_dir`` when already computed.

    The cache only saves time: a file there that cannot be read as this head (damaged, or a
    tensor of another shape) is computed again and replaced, and a failed write is a warning."""
    templates = [_template_string(t) for t in templates]
    device = next(clip.parameters()).device
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"text-{cache_key(clip, classnames, templates, fingerprint, model_name)}.pt"
        cached = _read_cached(cache_file, len(classnames))
        if cached is not None:
            return cached.to(device)
    weights = compute_text_weights(clip, open_clip.get_tokenizer(model_name), classnames, templates, batch_size)
    if cache_file is not None:
        try:
            atomic_save(weights.cpu(), cache_file)
        except MmtardError as exc:
            log.warning("text-embedding cache not written (%s); the embeddings are computed again next time", exc)
    return weights


def _read_cached(path: Path, num_classes: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - damaged zip, empty file, foreign pickle: all a cache miss
        log.warning("text-embedding cache %s is unreadable (%s); computing it again", path, first_line(exc))
        return None
    if not (isinstance(cached, torch.Tensor) and cached.dim() == 2 and cached.shape[1] == num_classes):
        log.warning("text-embedding cache %s does not hold a d x %d matrix; computing it again", path, num_classes)
        return None
    log.debug("text embeddings from cache %s", path)
    return cached
