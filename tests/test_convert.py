"""`mmtard convert`: an image encoder saved alone (RobustVLM's and the MMT-ARD release's
checkpoints) over a base CLIP's text encoder, written as a full-CLIP file every command loads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mmtard.cli import main
from mmtard.convert import convert
from mmtard.errors import ModelError
from mmtard.models import ModelSpec, create_clip, export_open_clip

TINY = "mmtard-tiny-vit"


def _clip(seed):
    torch.manual_seed(seed)
    return create_clip(ModelSpec(TINY))


def _same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def base_and_robust(tmp_path):
    base, robust = _clip(1), _clip(2)
    base_file = export_open_clip(base, tmp_path / "base.safetensors")
    return base, robust, base_file


@pytest.mark.parametrize("layout", ["bare", "tecoa", "ddp", "full", "safetensors"])
def test_image_encoder_alone_goes_over_the_base_text_encoder(base_and_robust, tmp_path, layout):
    base, robust, base_file = base_and_robust
    visual = robust.visual.state_dict()
    path = tmp_path / ("visual.safetensors" if layout == "safetensors" else "visual.pt")
    if layout == "safetensors":
        save_file({k: v.contiguous() for k, v in visual.items()}, str(path))
    else:
        saved = {"bare": visual, "tecoa": {"epoch": 3, "vision_encoder_state_dict": visual},
                 "ddp": {f"module.{k}": v for k, v in visual.items()}, "full": robust.state_dict()}[layout]
        torch.save(saved, path)
    out = convert(TINY, str(base_file), tmp_path / "out.safetensors", visual=path)
    loaded = create_clip(ModelSpec(TINY, str(out)))
    assert _same(loaded.visual.state_dict(), robust.visual.state_dict())
    assert _same(loaded.transformer.state_dict(), base.transformer.state_dict())  # the text encoder
    assert not _same(loaded.visual.state_dict(), base.visual.state_dict())


def test_convert_refuses_what_is_not_an_image_encoder(base_and_robust, tmp_path, capsys):
    base, robust, base_file = base_and_robust
    state = robust.visual.state_dict()
    cut = tmp_path / "cut.pt"
    torch.save({k: v for k, v in state.items() if k != "proj"}, cut)
    with pytest.raises(ModelError, match=r"cut.pt is not an image encoder of 'mmtard-tiny-vit': 1 missing keys"):
        convert(TINY, str(base_file), tmp_path / "o.safetensors", visual=cut)
    wrong = tmp_path / "wrong.pt"
    torch.save({**state, "proj": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ModelError, match="tensor 'proj' has shape"):
        convert(TINY, str(base_file), tmp_path / "o.safetensors", visual=wrong)
    notes = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "lr": 0.1}, notes)
    with pytest.raises(ModelError, match="holds no image-encoder state dict of tensors"):
        convert(TINY, str(base_file), tmp_path / "o.safetensors", visual=notes)
    assert main(["convert", "--model", TINY, "--pretrained", str(base_file), "--visual", str(cut),
                 "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "1 missing keys" in capsys.readouterr().err
    assert main(["convert", "--model", TINY, "--out", str(tmp_path / "o.pt")]) == 2
    assert "end the name in .safetensors" in capsys.readouterr().err
    assert main(["convert", "--model", TINY, "--visual", str(cut), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "no --pretrained base" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_command_writes_a_file_the_other_commands_load(base_and_robust, tmp_path, capsys):
    base, robust, base_file = base_and_robust
    visual = tmp_path / "final.pt"
    torch.save(robust.visual.state_dict(), visual)
    out = tmp_path / "teacher.safetensors"
    assert main(["convert", "--model", TINY, "--pretrained", str(base_file), "--visual", str(visual),
                 "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(create_clip(ModelSpec(TINY, str(out))).encode_image(x), robust.encode_image(x))


def test_a_quick_gelu_base_gives_a_quick_gelu_result(tmp_path):
    """OpenAI's CLIPs are QuickGELU; the converted file records it, so it loads as it was trained."""
    import open_clip

    from mmtard.models import register_tiny_models, uses_quick_gelu

    register_tiny_models()
    base = open_clip.create_model(TINY, force_quick_gelu=True)
    base_file = export_open_clip(base, tmp_path / "openai_like.safetensors")
    visual = tmp_path / "final.pt"
    robust = _clip(3)
    torch.save(robust.visual.state_dict(), visual)
    out = convert(TINY, str(base_file), tmp_path / "out.safetensors", visual=visual)
    loaded = create_clip(ModelSpec(TINY, str(out)))
    assert uses_quick_gelu(loaded)
    assert _same(loaded.visual.state_dict(), robust.visual.state_dict())


def test_a_lora_image_encoder_as_the_release_saves_it_is_merged(base_and_robust, tmp_path):
    """peft around the release's plain attention: ``base_model.model.`` keys, ``qkv``/``proj``
    linears with ``base_layer`` and ``lora_A``/``lora_B``; merged as W + (alpha / r) B A."""
    base, robust, base_file = base_and_robust
    plain = robust.visual.state_dict()
    names = {"attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
             "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias"}
    g = torch.Generator().manual_seed(0)
    peft_state, expected = {}, dict(plain)
    rank, alpha = 4, 8.0
    for key, value in plain.items():
        ours = next((key[: -len(o)] + p for o, p in names.items() if key.endswith(o)), key)
        if ours.endswith((".qkv.weight", ".proj.weight")):
            layer = ours[: -len(".weight")]
            down = torch.randn(rank, value.shape[1], generator=g)
            up = torch.randn(value.shape[0], rank, generator=g)
            peft_state[f"base_model.model.{layer}.base_layer.weight"] = value
            peft_state[f"base_model.model.{layer}.lora_A.default.weight"] = down
            peft_state[f"base_model.model.{layer}.lora_B.default.weight"] = up
            expected[key] = value + (alpha / rank) * up @ down
        elif ours.endswith((".qkv.bias", ".proj.bias")):
            peft_state[f"base_model.model.{ours[: -len('.bias')]}.base_layer.bias"] = value
        else:
            peft_state[f"base_model.model.{key}"] = value
    torch.save(peft_state, tmp_path / "lora_final.pt")
    out = convert(TINY, str(base_file), tmp_path / "out.safetensors", visual=tmp_path / "lora_final.pt",
                  lora_alpha=alpha)
    loaded = create_clip(ModelSpec(TINY, str(out))).visual.state_dict()
    assert sorted(loaded) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(loaded[key], expected[key], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loaded["transformer.resblocks.0.attn.in_proj_weight"],
                              plain["transformer.resblocks.0.attn.in_proj_weight"])
    with pytest.raises(ModelError, match="holds no LoRA adapters"):
        convert(TINY, str(base_file), tmp_path / "o.safetensors", visual=tmp_path / "out.safetensors", lora_alpha=8)
    torch.save({**peft_state, "base_model.model.transformer.resblocks.0.attn.qkv.lora_magnitude_vector.default.weight":
                torch.ones(3)}, tmp_path / "dora.pt")
    with pytest.raises(ModelError, match="LoRA tensors this merge does not cover"):
        convert(TINY, str(base_file), tmp_path / "o.safetensors", visual=tmp_path / "dora.pt")
    del peft_state["base_model.model.transformer.resblocks.0.attn.proj.lora_B.default.weight"]
    torch.save(peft_state, tmp_path / "cut.pt")
    with pytest.raises(ModelError, match="LoRA layer 'transformer.resblocks.0.attn.proj' lacks its lora_B"):
        convert(TINY, str(base_file), tmp_path / "o.safetensors", visual=tmp_path / "cut.pt")


def test_a_guessed_activation_is_not_recorded_as_known(tmp_path, monkeypatch):
    """A base file without mmtard's metadata, of an architecture whose OpenAI weights used
    QuickGELU, is built with GELU by its name after a warning: a guess. The converted file leaves
    the activation unrecorded, so the guess cannot later refuse the file under ``NAME-quickgelu``;
    a base whose activation is known passes it on."""
    from safetensors import safe_open

    import mmtard.models as models

    monkeypatch.setattr(models, "tag_uses_quick_gelu", lambda name, tag: name == TINY and tag == "openai")
    raw = tmp_path / "raw.safetensors"
    save_file({k: v.contiguous() for k, v in _clip(1).state_dict().items()}, raw)
    known = export_open_clip(_clip(1), tmp_path / "known.safetensors")

    def metadata(path):
        with safe_open(str(path), "pt") as handle:
            return handle.metadata() or {}

    assert models.ACTIVATION_METADATA not in metadata(convert(TINY, str(raw), tmp_path / "from_raw.safetensors"))
    assert metadata(convert(TINY, str(known), tmp_path / "from_known.safetensors"))[models.ACTIVATION_METADATA] == "false"


def test_convert_refuses_to_write_over_its_own_input(base_and_robust, tmp_path):
    _, robust, base_file = base_and_robust
    visual = tmp_path / "visual.pt"
    torch.save(robust.visual.state_dict(), visual)
    before = base_file.read_bytes()
    with pytest.raises(ModelError, match=r"--out .*base.safetensors is the input"):
        convert(TINY, str(base_file), base_file, visual=visual)
    assert base_file.read_bytes() == before
