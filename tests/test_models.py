"""Model loading, export and the [0, 1]-image classifier contract, on tiny random-weight CLIPs."""

from __future__ import annotations

import logging
import os
import re
import time

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mmtard.errors import ModelError
from mmtard.lora import ProjectedAttention, add_lora, has_lora, merged_copy
from mmtard.models import (
    PREPROCESS_METADATA,
    CLIPClassifier,
    ModelSpec,
    create_clip,
    export_open_clip,
    freeze,
    preprocess_stats,
    register_tiny_models,
    train_only_image_tower,
)

TINY = "mmtard-tiny-vit"
SMALL = "mmtard-small-vit"
# (embed_dim, image size, visual width) from src/mmtard/model_configs.
ARCH = {TINY: (64, 32, 64), SMALL: (96, 48, 128)}


def _clip(name: str = TINY, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_clip(ModelSpec(name))


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


class _WritesMarker:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, which creates the file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- create_clip ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [TINY, SMALL])
def test_create_clip_by_name_random_weights(name):
    clip = _clip(name)
    embed_dim, size, _ = ARCH[name]
    assert isinstance(clip, open_clip.CLIP)
    assert not clip.training
    assert preprocess_stats(clip)[2] == (size, size)
    with torch.no_grad():
        features = clip.encode_image(torch.rand(2, 3, size, size))
    assert features.shape == (2, embed_dim)
    # Random init: another seed gives other weights.
    assert _differs(clip.state_dict(), _clip(name, seed=1).state_dict())


def test_unknown_model_name_lists_close_names():
    with pytest.raises(ModelError) as info:
        create_clip(ModelSpec("ViT-B-23"))
    message = str(info.value)
    assert "ViT-B-23" in message
    assert "ViT-B-32" in message


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix"])
def test_local_safetensors_and_pt_give_identical_weights(tmp_path, wrap):
    source = _clip(seed=3)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    st_path = tmp_path / "weights.safetensors"
    save_file(state, str(st_path))
    pt_state = {
        "plain": state,
        "state_dict": {"state_dict": state},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    pt_path = tmp_path / "weights.pt"
    torch.save(pt_state, pt_path)

    torch.manual_seed(99)  # the random init before loading must be overwritten
    from_st = create_clip(ModelSpec(TINY, str(st_path))).state_dict()
    from_pt = create_clip(ModelSpec(TINY, str(pt_path))).state_dict()
    _assert_same_state(from_st, state)
    _assert_same_state(from_pt, state)
    assert _differs(_clip(seed=99).state_dict(), state)


def test_a_model_from_a_file_is_not_announced_as_random(tmp_path, caplog):
    """open_clip warns "initialized randomly" when it builds a model without weights: true for a
    model given by name alone, not for one whose file mmtard loads right after."""
    path = tmp_path / "weights.safetensors"
    save_file(_clip(seed=3).state_dict(), str(path))
    # a handler of the test's own: the CLI's filter for mmtard's tiny models sits on the handlers
    # that were there when an earlier test ran `mmtard`, caplog's among them
    messages: list[str] = []
    collect = logging.Handler(logging.WARNING)
    collect.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger().addHandler(collect)
    try:
        with caplog.at_level("WARNING"):
            create_clip(ModelSpec(TINY, str(path)))
            from_file = list(messages)
            create_clip(ModelSpec(TINY))
    finally:
        logging.getLogger().removeHandler(collect)
    assert not any("initialized randomly" in m for m in from_file)
    assert any("initialized randomly" in m for m in messages[len(from_file):])
    assert not logging.getLogger().filters  # the filter is gone once the file is loaded


def test_weights_of_another_architecture_name_file_and_shapes(tmp_path):
    small = _clip(SMALL).state_dict()
    tiny = _clip(TINY).state_dict()
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in small.items()}, str(path))
    with pytest.raises(ModelError) as info:
        create_clip(ModelSpec(TINY, str(path)))
    message = str(info.value)
    assert str(path) in message
    assert TINY in message
    match = re.search(r"tensor '(.+?)' has shape (\(.*?\)) in the file but (\(.*?\)) in the model", message)
    assert match, message
    key, in_file, in_model = match.groups()
    assert in_file == str(tuple(small[key].shape))
    assert in_model == str(tuple(tiny[key].shape))
    assert in_file != in_model


def test_weights_missing_keys_refused(tmp_path):
    state = {k: v for k, v in _clip().state_dict().items() if not k.startswith("visual.")}
    path = tmp_path / "text_only.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelError, match="missing keys"):
        create_clip(ModelSpec(TINY, str(path)))


def test_missing_weight_file(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        create_clip(ModelSpec(TINY, str(tmp_path / "nope.pt")))


def test_a_weights_file_is_read_by_its_content_not_its_name(tmp_path):
    """A safetensors file saved as .pt loads; a text page or a cut archive under a weights name is
    named as what it is, not met with torch's KeyError or advice to trust it."""
    from mmtard.models import read_weights_file

    state = {"w": torch.arange(4.0)}
    save_file(state, str(tmp_path / "renamed.pt"))
    assert torch.equal(read_weights_file(tmp_path / "renamed.pt")["w"], state["w"])
    (tmp_path / "page.pt").write_text("<!doctype html><title>404</title>")
    (tmp_path / "hello.safetensors").write_text("hello")
    for name in ("page.pt", "hello.safetensors"):
        with pytest.raises(ModelError, match=f"{name}: it is neither a safetensors nor a torch file"):
            read_weights_file(tmp_path / name)
    from mmtard.models import ACTIVATION_METADATA, _file_metadata

    exported = export_open_clip(_clip(seed=1), tmp_path / "student.pt")  # its recorded activation is read too
    assert ACTIVATION_METADATA in _file_metadata(exported)
    torch.save(state, tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ModelError, match="cannot read weight file .*cut.pt: "):
        read_weights_file(tmp_path / "cut.pt")


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"visual.proj": _WritesMarker(str(marker))}, path)

    # The payload is live: an unsafe load does create its marker.
    control_marker = tmp_path / "control"
    control = tmp_path / "control.pt"
    torch.save({"x": _WritesMarker(str(control_marker))}, control)
    torch.load(control, weights_only=False)
    assert control_marker.exists()

    with pytest.raises(ModelError) as info:
        create_clip(ModelSpec(TINY, str(path)))
    assert "unpickling" in str(info.value)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("tag, expected", [
    ("openai", ["ViT-B-32", "openai", "local", "file"]),  # a real tag not in the offline cache
    ("not-a-tag", ["not-a-tag", "ViT-B-32", "openai"]),  # refused before building; lists the real tags
])
def test_open_clip_tag_offline_fails_fast_and_says_why(monkeypatch, tag, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelError) as info:
        create_clip(ModelSpec("ViT-B-32", tag))
    assert time.monotonic() - start < 5
    message = str(info.value)
    for part in expected:
        assert part in message


# -- export ---------------------------------------------------------------------------------------------------------


def test_export_round_trip_through_open_clip(tmp_path):
    clip = _clip(seed=5)
    umask = os.umask(0o027)  # a group-readable setting, as on shared storage
    try:
        path = export_open_clip(clip, tmp_path / "out" / "model.safetensors")
    finally:
        os.umask(umask)
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    assert path.stat().st_mode & 0o777 == 0o640, "the umask decides, as for every other file (safetensors makes 0600)"
    register_tiny_models()
    loaded, _, _ = open_clip.create_model_and_transforms(TINY, pretrained=str(path))
    loaded.eval()
    _assert_same_state(loaded.state_dict(), clip.state_dict())
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), clip.encode_image(x))


# -- CLIPClassifier -------------------------------------------------------------------------------------------------


def _unit_columns(d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(d, k, generator=g), dim=0)


def _manual_logits(clip, x, weights, scale):
    from torchvision import transforms  # the release's resize in front of native-size sets, exactly

    x = transforms.Resize((32, 32), interpolation=transforms.InterpolationMode.BICUBIC, antialias=None)(x)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    features = clip.encode_image((x - mean) / std)
    return scale * (features / features.norm(dim=-1, keepdim=True)) @ weights


def test_classifier_resizes_and_computes_scaled_cosine_logits():
    clip = _clip()
    weights = _unit_columns(64, 5)
    model = CLIPClassifier(clip, weights, scale=100.0)
    assert model.num_classes == 5
    x = torch.rand(2, 3, 20, 20)  # upscaled, as CIFAR to 224
    with torch.no_grad():
        logits = model(x)
        expected = _manual_logits(clip, x, weights, 100.0)
    assert logits.shape == (2, 5)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    # Cosine logits: bounded by the scale.
    assert logits.abs().max() <= 100.0 + 1e-3


def test_classifier_scale_none_uses_learnt_logit_scale():
    clip = _clip()
    with torch.no_grad():
        clip.logit_scale.fill_(torch.log(torch.tensor(7.0)))
    weights = _unit_columns(64, 4)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        learnt = CLIPClassifier(clip, weights, scale=None)(x)
        fixed = CLIPClassifier(clip, weights, scale=1.0)(x)
        expected = _manual_logits(clip, x, weights, 7.0)
    torch.testing.assert_close(learnt, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(learnt, 7.0 * fixed, rtol=1e-5, atol=1e-5)


def test_classifier_features_output_equals_image_features():
    clip = _clip()
    model = CLIPClassifier(clip, _unit_columns(64, 3))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        features = model(x, output="features")
        assert torch.equal(features, model.image_features(x))
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        torch.testing.assert_close(features, clip.encode_image((x - mean) / std))
    assert features.shape == (2, 64)


def test_classifier_without_text_weights_refuses_logits():
    model = CLIPClassifier(_clip())
    assert model.num_classes == 0
    with pytest.raises(ModelError, match="set_text_weights"):
        model(torch.rand(1, 3, 32, 32))


def test_freeze():
    model = CLIPClassifier(_clip(), _unit_columns(64, 3)).train()
    assert freeze(model) is model
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())


def test_train_only_image_tower():
    clip = _clip()
    freeze(clip)
    train_only_image_tower(clip)
    visual = {id(p) for p in clip.visual.parameters()}
    assert visual
    for name, parameter in clip.named_parameters():
        assert parameter.requires_grad == (id(parameter) in visual), name
    assert not clip.logit_scale.requires_grad


# -- LoRA -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [TINY, SMALL])
def test_lora_trains_adapters_only_and_merges_exactly(name):
    embed_dim, size, _ = ARCH[name]
    clip = _clip(name)
    plain_keys = set(clip.state_dict())
    base_before = {k: v.clone() for k, v in clip.state_dict().items()}
    add_lora(clip, rank=4, alpha=8, dropout=0.1)
    assert has_lora(clip)

    trainable = [n for n, p in clip.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(n.startswith("visual.") and "lora_" in n for n in trainable)

    # Optimise over *all* parameters, with weight decay: a base weight that got a gradient would move.
    optimizer = torch.optim.SGD(clip.parameters(), lr=0.5, weight_decay=0.1)
    clip.train()
    x = torch.rand(4, 3, size, size)
    target = F.normalize(torch.randn(4, embed_dim), dim=-1)
    for _ in range(2):  # lora_B starts at zero; the second step moves lora_A too
        optimizer.zero_grad()
        loss = -(F.normalize(clip.encode_image(x), dim=-1) * target).sum()
        loss.backward()
        optimizer.step()

    merged = merged_copy(clip)
    merged_state = merged.state_dict()
    assert set(merged_state) == plain_keys
    assert not any("lora" in k or "base_layer" in k for k in merged_state)
    # Text tower and every non-visual weight untouched; the adapters did move the image features.
    for key, value in base_before.items():
        if not key.startswith("visual."):
            assert torch.equal(merged_state[key], value), key
    lora_base = {
        k.replace("visual.base_model.model.", "visual.").replace(".base_layer", "")
         .replace(".in_proj.weight", ".in_proj_weight").replace(".in_proj.bias", ".in_proj_bias"): v
        for k, v in clip.state_dict().items()
        if "lora_" not in k
    }
    assert set(lora_base) == plain_keys
    for key, value in base_before.items():  # the frozen base, bit for bit
        assert torch.equal(lora_base[key], value), key

    clip.eval()
    merged.eval()
    with torch.no_grad():
        lora_out = clip.encode_image(x)
        merged_out = merged.encode_image(x)
        base = open_clip.create_model(name)
        base.load_state_dict(base_before)
        base.eval()
        base_out = base.encode_image(x)
    torch.testing.assert_close(merged_out, lora_out, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(lora_out, base_out, atol=1e-4)
    # The merge is a copy: the LoRA student keeps its adapters.
    assert has_lora(clip) and not has_lora(merged)
    # Merged weights load strictly into a plain open_clip model.
    plain = open_clip.create_model(name)
    plain.load_state_dict(merged_state, strict=True)


def test_projected_attention_is_the_multihead_attention_it_replaces():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    projected = ProjectedAttention(mha)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(projected(x, x, x)[0], mha(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)
    # one query set against all tokens (the class-token last block), and masks of both kinds
    q = x[:, :1]
    torch.testing.assert_close(projected(q, x, x)[0], mha(q, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)
    blocked = torch.rand(7, 7) > 0.7
    blocked.fill_diagonal_(False)
    additive = torch.randn(3 * 4, 7, 7)
    for mask in (blocked, additive):
        torch.testing.assert_close(projected(x, x, x, attn_mask=mask)[0],
                                   mha(x, x, x, need_weights=False, attn_mask=mask)[0], rtol=1e-5, atol=1e-6)
    back = projected.to_multihead()
    torch.testing.assert_close(back(x, x, x, need_weights=False)[0], mha(x, x, x, need_weights=False)[0])
    assert set(back.state_dict()) == set(mha.state_dict())


def test_lora_dropout_acts_in_train_mode_only():
    """METHOD.md §7: dropout 0.1 on the adapted qkv and output projections. peft's own LoRA for
    nn.MultiheadAttention merged the adapters and never ran its dropout."""
    def outputs(dropout, train):
        torch.manual_seed(0)
        clip = _clip()
        add_lora(clip, rank=4, alpha=4, dropout=dropout)
        for name, parameter in clip.visual.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter)  # adapters that change the output
        clip.visual.train(train)
        x = torch.rand(2, 3, 32, 32)
        return clip.encode_image(x), clip.encode_image(x)

    first, second = outputs(0.5, train=True)
    assert not torch.allclose(first, second)
    assert torch.equal(*outputs(0.5, train=False))
    assert torch.equal(*outputs(0.0, train=True))


def test_a_weights_file_keeps_its_models_normalisation(tmp_path, monkeypatch, caplog):
    """Mean/std travel in the exported file's metadata; a file without them takes the statistics
    all of its architecture's pretrained tags agree on, else open_clip's default (OpenAI's)."""
    register_tiny_models()
    half = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    siglip_like = open_clip.create_model(TINY, force_preprocess_cfg=half)
    export_open_clip(siglip_like, tmp_path / "student.safetensors")
    loaded = create_clip(ModelSpec(TINY, str(tmp_path / "student.safetensors")))
    assert preprocess_stats(loaded)[:2] == (half["mean"], half["std"])

    save_file(siglip_like.state_dict(), str(tmp_path / "bare.safetensors"))  # no metadata
    assert preprocess_stats(create_clip(ModelSpec(TINY, str(tmp_path / "bare.safetensors"))))[:2] == (
        open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    tags = {"a": half, "b": half}
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda name: list(tags))
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: tags[tag])
    assert preprocess_stats(create_clip(ModelSpec(TINY, str(tmp_path / "bare.safetensors"))))[:2] == (
        half["mean"], half["std"])
    tags["b"] = {"mean": (0.4, 0.4, 0.4), "std": (0.2, 0.2, 0.2)}  # tags that disagree: the default, said once
    with caplog.at_level("WARNING"):
        for _ in range(2):
            stats = preprocess_stats(create_clip(ModelSpec(TINY, str(tmp_path / "bare.safetensors"))))
    assert stats[:2] == (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    assert caplog.text.count("normalise with different mean/std") == 1


def test_openai_weights_get_quick_gelu_from_the_tag_and_exported_files_keep_theirs(tmp_path, monkeypatch, caplog):
    """open_clip 3 builds ``ViT-B-32`` with GELU even for ``openai`` and only warns; mmtard takes
    QuickGELU from the tag's config, and from the metadata of a file it exported."""
    from mmtard.models import tag_uses_quick_gelu, uses_quick_gelu

    assert tag_uses_quick_gelu("ViT-B-32", "openai") and tag_uses_quick_gelu("ViT-L-14", "openai")
    assert not tag_uses_quick_gelu("ViT-B-32", "laion2b_s34b_b79k") and not tag_uses_quick_gelu("ViT-B-32", None)

    register_tiny_models()
    built = {}
    real_create = open_clip.create_model

    def offline_create(name, pretrained=None, **kwargs):  # the tag's weights are not on this machine
        built[name] = kwargs.get("force_quick_gelu")
        return real_create(TINY, pretrained=None, force_quick_gelu=kwargs.get("force_quick_gelu", False))

    monkeypatch.setattr(open_clip, "create_model", offline_create)
    monkeypatch.setattr("mmtard.models._hub_reachable", lambda host="huggingface.co": True)
    assert uses_quick_gelu(create_clip(ModelSpec("ViT-B-32", "openai")))
    assert built == {"ViT-B-32": True}
    assert not uses_quick_gelu(create_clip(ModelSpec("ViT-B-32", "laion2b_s34b_b79k")))
    monkeypatch.setattr(open_clip, "create_model", real_create)

    quick = real_create(TINY, force_quick_gelu=True)
    export_open_clip(quick, tmp_path / "quick.safetensors")
    loaded = create_clip(ModelSpec(TINY, str(tmp_path / "quick.safetensors")))
    assert uses_quick_gelu(loaded)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), quick.eval().encode_image(x))
    export_open_clip(real_create(TINY), tmp_path / "gelu.safetensors")
    assert not uses_quick_gelu(create_clip(ModelSpec(TINY, str(tmp_path / "gelu.safetensors"))))

    # A plain state dict says nothing: the name's activation, with advice where OpenAI's used QuickGELU.
    save_file(quick.state_dict(), str(tmp_path / "bare.safetensors"))
    monkeypatch.setattr("mmtard.models.tag_uses_quick_gelu", lambda name, tag: tag == "openai")
    monkeypatch.setattr("mmtard.models._warned_activation", set())
    with caplog.at_level("WARNING"):
        assert not uses_quick_gelu(create_clip(ModelSpec(TINY, str(tmp_path / "bare.safetensors"))))
    assert f"name the architecture '{TINY}-quickgelu'" in caplog.text
    # An mmtard export from before the activation was recorded: GELU, as every model was then, no advice.
    caplog.clear()
    save_file(quick.state_dict(), str(tmp_path / "old.safetensors"), metadata={PREPROCESS_METADATA: "{}"})
    monkeypatch.setattr("mmtard.models._warned_activation", set())
    with caplog.at_level("WARNING"):
        assert not uses_quick_gelu(create_clip(ModelSpec(TINY, str(tmp_path / "old.safetensors"))))
    assert "quickgelu" not in caplog.text


def test_normalisation_in_the_tower_gives_the_same_features_and_input_gradient():
    """``normalise_in_tower`` moves the mean/std step from ``prepare`` into the tower's call: the
    same features and input gradient bit for bit, once (idempotent), resize still in ``prepare``."""
    torch.manual_seed(0)
    model = CLIPClassifier(_clip(), _unit_columns(64, 3))
    x = torch.rand(2, 3, 20, 20, requires_grad=True)  # resized to 32 first
    outside = model(x)
    (grad_outside,) = torch.autograd.grad(outside.sum(), x)
    model.normalise_in_tower()
    model.normalise_in_tower()
    assert model.tower_normalises and len(model.visual._forward_pre_hooks) == 1
    assert model.prepare(x).shape[-2:] == (32, 32)
    torch.testing.assert_close(model.prepare(x), F.interpolate(x, size=(32, 32), mode="bicubic"), rtol=0, atol=0)
    inside = model(x)
    (grad_inside,) = torch.autograd.grad(inside.sum(), x)
    assert torch.equal(inside, outside) and torch.equal(grad_inside, grad_outside)


def test_a_compiled_tower_traces_the_normalisation_it_holds():
    """What the move is for: torch.compile of the tower (in place, as ``train.compile``) sees the
    subtraction and division in its graph, so inductor fuses them into the tower's first kernel."""
    import operator

    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    model = CLIPClassifier(_clip(), _unit_columns(64, 3))
    model.normalise_in_tower()
    model.visual.compile(backend=recording_backend, dynamic=False)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        features = model.image_features(x)
    targets = {node.target for graph in graphs for node in graph.graph.nodes}
    assert {operator.sub, operator.truediv} <= targets
    model.visual._compiled_call_impl = None
    with torch.no_grad():  # eager, torch's multi-head attention takes its fused path: rounding only
        torch.testing.assert_close(model.image_features(x), features, rtol=1e-5, atol=1e-6)


def test_logits_stay_fp32_under_autocast():
    """Autocast would run the zero-shot head's product in bf16 and round logits of size ~30 to a
    quarter before any loss could upcast them; the head opts out."""
    model = CLIPClassifier(_clip(), _unit_columns(64, 5), scale=100.0)
    embed = F.normalize(torch.randn(3, 64), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.logits_from_embed(embed)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, 100.0 * embed @ model.text_weights, rtol=0, atol=0)


def test_a_local_folder_without_weights_is_refused_not_random(tmp_path):
    """open_clip only warns when a ``local-dir:`` folder (or a hub repository) has a config but no
    weights, and returns a randomly initialised model; mmtard refuses it."""
    import json

    clip = _clip(seed=3)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(TINY)}))
    with pytest.raises(ModelError, match=r"cannot load 'local-dir:.*'"):
        create_clip(ModelSpec(f"local-dir:{tmp_path}"))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    _assert_same_state(create_clip(ModelSpec(f"local-dir:{tmp_path}")).state_dict(), clip.state_dict())


def test_tags_are_spelled_as_open_clip_spells_them(monkeypatch):
    """``OpenAI`` is open_clip's ``openai`` tag (it lowers and underscores tags): offline, it fails
    as the real tag does, not as an unknown one; and it gets the tag's QuickGELU."""
    from mmtard.models import tag_uses_quick_gelu

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the local cache"):
        create_clip(ModelSpec("ViT-B-32", "OpenAI"))
    assert tag_uses_quick_gelu("ViT-B-32", "OpenAI") and tag_uses_quick_gelu("ViT-B-32", "openai")
