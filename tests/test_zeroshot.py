"""Zero-shot heads: text weights against a hand computation, the on-disk cache and its key, the suite's names."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from mmtard import zeroshot
from mmtard.data import zeroshot_templates
from mmtard.errors import DataError
from mmtard.models import ModelSpec, create_clip
from mmtard.zeroshot import (
    compute_text_weights,
    imagenet_classnames,
    imagenet_templates,
    suite_classnames,
    text_weights,
)

TINY = "mmtard-tiny-vit"
CLASSES = ["red circle", "blue square", "green triangle"]
TEMPLATES = ["a photo of a {}.", "{} on a plain background", "a drawing of the {}"]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTARD_CACHE_DIR", str(tmp_path / "mmtard-cache"))


@pytest.fixture
def clip():
    torch.manual_seed(0)
    return create_clip(ModelSpec(TINY))


def _manual_weights(clip, classnames, templates) -> torch.Tensor:
    tokenizer = open_clip.get_tokenizer(TINY)
    columns = []
    with torch.no_grad():
        for name in classnames:
            embeddings = []
            for template in templates:
                e = clip.encode_text(tokenizer([template.format(name)]))[0]
                embeddings.append(e / e.norm())
            mean = torch.stack(embeddings).mean(0)
            columns.append(mean / mean.norm())
    return torch.stack(columns, dim=1)


# -- compute_text_weights ----------------------------------------------------------------------------------------


def test_compute_text_weights_matches_hand_computation(clip):
    tokenizer = open_clip.get_tokenizer(TINY)
    # batch_size 4 over 9 prompts: chunks that straddle class boundaries.
    weights = compute_text_weights(clip, tokenizer, CLASSES, TEMPLATES, batch_size=4)
    assert weights.shape == (64, len(CLASSES))
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(len(CLASSES)))
    torch.testing.assert_close(weights, _manual_weights(clip, CLASSES, TEMPLATES), rtol=1e-5, atol=1e-5)
    # Column order follows the class list.
    swapped = compute_text_weights(clip, tokenizer, CLASSES[::-1], TEMPLATES)
    torch.testing.assert_close(swapped, weights.flip(1), rtol=1e-5, atol=1e-5)


def test_compute_text_weights_accepts_open_clip_lambda_templates(clip):
    tokenizer = open_clip.get_tokenizer(TINY)
    from_lambdas = compute_text_weights(clip, tokenizer, CLASSES, [lambda c, t=t: t.format(c) for t in TEMPLATES])
    torch.testing.assert_close(from_lambdas, compute_text_weights(clip, tokenizer, CLASSES, TEMPLATES))


def test_compute_text_weights_needs_classes_and_templates(clip):
    tokenizer = open_clip.get_tokenizer(TINY)
    with pytest.raises(DataError):
        compute_text_weights(clip, tokenizer, [], TEMPLATES)
    with pytest.raises(DataError):
        compute_text_weights(clip, tokenizer, CLASSES, [])


# -- cache --------------------------------------------------------------------------------------------------------


@pytest.fixture
def counted(monkeypatch):
    calls = []
    original = zeroshot.compute_text_weights

    def counting(*args, **kwargs):
        calls.append(args[2:4])
        return original(*args, **kwargs)

    monkeypatch.setattr(zeroshot, "compute_text_weights", counting)
    return calls


def test_text_weights_cache_hit(clip, tmp_path, counted):
    cache = tmp_path / "text"
    first = text_weights(clip, TINY, CLASSES, TEMPLATES, cache_dir=cache)
    assert len(counted) == 1
    assert len(list(cache.glob("text-*.pt"))) == 1
    second = text_weights(clip, TINY, CLASSES, TEMPLATES, cache_dir=cache)
    assert len(counted) == 1
    assert torch.equal(first, second)
    torch.testing.assert_close(first, _manual_weights(clip, CLASSES, TEMPLATES), rtol=1e-5, atol=1e-5)
    # A fresh copy of the same weights (another process, another run) hits the same entry.
    torch.manual_seed(0)
    text_weights(create_clip(ModelSpec(TINY)), TINY, CLASSES, TEMPLATES, cache_dir=cache)
    assert len(counted) == 1


@pytest.mark.parametrize("damage", ["truncated", "empty", "other shape"])
def test_a_damaged_cache_file_is_computed_again_and_replaced(clip, tmp_path, counted, caplog, damage):
    """The cache lives in the user's cache folder and serves every later run: one bad file there
    must cost a recomputation, not stop every run until someone finds it."""
    cache = tmp_path / "text"
    first = text_weights(clip, TINY, CLASSES, TEMPLATES, cache_dir=cache)
    (path,) = cache.glob("text-*.pt")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save(torch.zeros(first.shape[0], len(CLASSES) + 1), path)
    with caplog.at_level("WARNING"):
        again = text_weights(clip, TINY, CLASSES, TEMPLATES, cache_dir=cache)
    assert len(counted) == 2 and torch.equal(again, first)
    assert str(path) in caplog.text and "computing it again" in caplog.text
    assert torch.equal(torch.load(path, weights_only=True), first), "the file is replaced by a good one"
    assert [p.name for p in cache.iterdir()] == [path.name], "no temporary file is left"


def test_a_cache_that_cannot_be_written_is_a_warning(clip, tmp_path, counted, caplog, monkeypatch):
    import errno

    from mmtard import checkpoint

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "durable_replace", no_space)
    with caplog.at_level("WARNING"):
        weights = text_weights(clip, TINY, CLASSES, TEMPLATES, cache_dir=tmp_path / "text")
    torch.testing.assert_close(weights, _manual_weights(clip, CLASSES, TEMPLATES), rtol=1e-5, atol=1e-5)
    assert "text-embedding cache not written" in caplog.text and "No space left on device" in caplog.text
    assert not list((tmp_path / "text").iterdir())


def test_text_weights_without_cache_dir_always_computes(clip, counted):
    text_weights(clip, TINY, CLASSES, TEMPLATES)
    text_weights(clip, TINY, CLASSES, TEMPLATES)
    assert len(counted) == 2


@pytest.mark.parametrize("change", ["classes", "class_order", "templates"])
def test_text_weights_cache_invalidated_by_classes_or_templates(clip, tmp_path, counted, change):
    cache = tmp_path / "text"
    first = text_weights(clip, TINY, CLASSES, TEMPLATES, cache_dir=cache)
    classes, templates = {
        "classes": (CLASSES + ["yellow star"], TEMPLATES),
        "class_order": (CLASSES[::-1], TEMPLATES),
        "templates": (CLASSES, TEMPLATES[:2]),
    }[change]
    second = text_weights(clip, TINY, classes, templates, cache_dir=cache)
    assert len(counted) == 2
    assert not (first.shape == second.shape and torch.equal(first, second))
    torch.testing.assert_close(second, _manual_weights(clip, classes, templates), rtol=1e-5, atol=1e-5)


def test_text_weights_cache_invalidated_by_text_tower_weight(clip, tmp_path, counted):
    cache = tmp_path / "text"
    first = text_weights(clip, TINY, CLASSES, TEMPLATES, cache_dir=cache)
    with torch.no_grad():
        clip.text_projection.mul_(-1.0)
    second = text_weights(clip, TINY, CLASSES, TEMPLATES, cache_dir=cache)
    assert len(counted) == 2
    torch.testing.assert_close(second, -first, rtol=1e-5, atol=1e-5)


def test_text_weights_cache_kept_when_visual_weight_changes(clip, tmp_path, counted):
    cache = tmp_path / "text"
    first = text_weights(clip, TINY, CLASSES, TEMPLATES, cache_dir=cache)
    with torch.no_grad():
        clip.visual.proj.add_(1.0)
        clip.visual.conv1.weight.mul_(2.0)
    second = text_weights(clip, TINY, CLASSES, TEMPLATES, cache_dir=cache)
    assert len(counted) == 1
    assert torch.equal(first, second)


# -- class names and templates ------------------------------------------------------------------------------------


def test_imagenet_classnames():
    names = imagenet_classnames()
    assert len(names) == 1000
    assert len(set(names)) > 990 and all(isinstance(n, str) and n for n in names)


def test_imagenet_templates():
    templates = imagenet_templates()
    assert len(templates) == 80
    assert all(isinstance(t, str) and t.count("{}") == 1 for t in templates)
    assert len(set(templates)) == 80
    assert templates[0].format("dog") != templates[1].format("dog")


def _clip_benchmark_file(name: str) -> dict:
    import clip_benchmark.datasets as cbd

    return json.loads((Path(cbd.__file__).parent / name).read_text(encoding="utf-8"))


def test_suite_templates_come_from_clip_benchmark():
    templates = zeroshot_templates("cifar10")
    raw = _clip_benchmark_file("en_zeroshot_classification_templates.json")["cifar10"]
    assert templates and len(templates) == len(raw)
    # clip-benchmark's '{c}' slot comes back as the '{}' that compute_text_weights formats.
    assert [t.replace("{}", "{c}") for t in templates] == raw
    assert all(t.count("{}") == 1 for t in templates)
    assert templates[0].format("cat") == raw[0].format(c="cat")


def test_suite_templates_work_with_compute_text_weights(clip):
    templates = zeroshot_templates("cifar10")[:3]
    weights = compute_text_weights(clip, open_clip.get_tokenizer(TINY), ["cat", "dog"], templates)
    torch.testing.assert_close(weights, _manual_weights(clip, ["cat", "dog"], templates), rtol=1e-5, atol=1e-5)


def test_suite_templates_imagenet_variants_and_fallback():
    # clip-benchmark's ImageNet list is open_clip's 80-template ensemble, same order: one source
    # serves ImageNet evaluation and the suite alike, with the same head digest
    assert zeroshot_templates("imagenet") == imagenet_templates()
    assert zeroshot_templates("imagenet1k") == imagenet_templates()
    assert zeroshot_templates("imagenet-r") == imagenet_templates()  # no templates of its own
    assert zeroshot_templates("no-such-dataset") == imagenet_templates()  # clip-benchmark's fallback


def test_suite_classnames():
    pets = suite_classnames("pets")
    assert len(pets) == 37
    assert pets == _clip_benchmark_file("en_classnames.json")["pets"]
    assert suite_classnames("imagenet") == imagenet_classnames()
    assert suite_classnames("no-such-dataset") is None


def test_a_given_fingerprint_gives_the_same_cache_key(clip):
    from mmtard.zeroshot import cache_key, fingerprint_text_tower

    names, templates = ["cat", "dog"], ["a photo of a {}."]
    assert cache_key(clip, names, templates) == cache_key(clip, names, templates, fingerprint_text_tower(clip))
    # the architecture's name stands for the tokenizer and the text settings the weights do not hold
    assert cache_key(clip, names, templates, model_name="a") != cache_key(clip, names, templates, model_name="b")


def test_the_text_cache_tells_gelu_from_quick_gelu_with_the_same_weights():
    """QuickGELU has no weights: a GELU and a QuickGELU tower share their state dict, not their
    text embeddings."""
    import open_clip

    from mmtard.models import register_tiny_models
    from mmtard.zeroshot import fingerprint_text_tower

    register_tiny_models()
    gelu = open_clip.create_model("mmtard-tiny-vit")
    quick = open_clip.create_model("mmtard-tiny-vit", force_quick_gelu=True)
    quick.load_state_dict(gelu.state_dict())
    assert fingerprint_text_tower(gelu) != fingerprint_text_tower(quick)
