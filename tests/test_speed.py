"""Speed changes keep the mathematics: bf16 autocast and torch.compile give the fp32 step's loss
within bf16 tolerance, frozen-weight attacks give the same input gradient, the patch embedding as
a matrix product is the convolution, a last block computing the class token alone gives open_clip's
outputs and gradients, every attention kernel gives the same loss, and train.compile /
train.patch_embed / train.last_block / train.attention are wired in."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmtard.attacks import PGDConfig, ascent, pgd, pgd_iteration
from mmtard.config import TrainConfig, load_config
from mmtard.errors import ConfigError
from mmtard.speed import (attention_kernel, check_attention_kernel, compile_attack_iteration, compile_method,
                          fused_update_iteration, input_grad_only)
from mmtard.tower_rewrites import (ClassTokenBlock, PatchEmbedding, class_token_last_block, classifiers,
                                   image_towers, matmul_patch_embedding, wants_class_token_last_block,
                                   wants_short_attention)
from mmtard.trainer import Trainer

TEACHERS = "teachers=[{name: mmtard-small-vit, role: clean}, {name: mmtard-small-vit, role: robust}]"


def _overrides(world_dir, **extra):
    items = {"data.root": str(world_dir), "method.name": "mmt_ard", "train.steps": 2, "train.global_batch": 6,
             "train.device": "cpu", "train.log_every": 1, "train.ckpt_every": 100, "attack.steps": 0,
             "train.clean_teacher_cache": "false", "train.warmup_frac": 0.0}
    items.update(extra)
    return [TEACHERS] + [f"{k}={v}" for k, v in items.items()]


def _batch(trainer, n=6):
    return next(iter(torch.utils.data.DataLoader(trainer.dataset, batch_size=n)))


def _fp32_trainer(world_dir, path, **extra):
    """A trainer in fp32 with a 2-step attack, in train mode, and one batch of its data."""
    config = load_config(None, _overrides(world_dir, **{"attack.steps": 2, "train.precision": "fp32", **extra}))
    trainer = Trainer(config, path, show_progress=False)
    trainer.method.train()
    return trainer, _batch(trainer)


def _method_loss(trainer, batch):
    """The method's loss on ``batch`` with the attack noise seeded (no optimiser step)."""
    torch.manual_seed(7)
    return trainer.method(*batch)["loss"].detach()


def _step_loss(trainer, batch):
    """The loss of one real ``Trainer._train_step`` on ``batch`` (attack noise seeded)."""
    torch.manual_seed(123)
    sums = trainer._train_step(iter([batch]), {})
    return sums["loss"]


def test_bf16_step_gives_the_fp32_loss(world_dir, tmp_path):
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(load_config(None, _overrides(world_dir, **{"train.precision": precision})),
                          tmp_path / precision, show_progress=False)
        trainer.method.train()
        losses[precision] = _step_loss(trainer, _batch(trainer))
    assert trainer.amp == torch.bfloat16
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=5e-2, atol=1e-4)


def test_compiled_step_gives_the_eager_loss(world_dir, tmp_path):
    """Same weights, same batch, same attack noise: eager fp32 vs compiled (dynamo + AOTAutograd;
    the inductor code generation itself is exercised by the GPU benchmark) with 2 PGD steps."""
    trainer, batch = _fp32_trainer(world_dir, tmp_path / "run")
    names = sorted(trainer.student.state_dict())
    eager = _method_loss(trainer, batch)
    compile_method(trainer.method, backend="aot_eager")
    compiled = _method_loss(trainer, batch)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
    assert sorted(trainer.student.state_dict()) == names  # in place: checkpoints and exports unchanged
    torch.manual_seed(7)
    sums = trainer._train_step(iter([batch]), {})  # and the full step (backward, AdamW) runs compiled
    assert torch.isfinite(sums["loss"]) and torch.isfinite(sums["grad_norm"])


def test_train_compile_switch_compiles_every_image_tower_and_the_attack_update(world_dir, tmp_path):
    on = Trainer(load_config(None, _overrides(world_dir, **{"train.compile": "true"})), tmp_path / "on",
                 show_progress=False)
    towers = image_towers(on.method)
    assert len(towers) == 3 and all(t._compiled_call_impl is not None for t in towers)
    iteration = on.method.attack_iteration
    assert iteration.func is pgd_iteration and iteration.keywords["update"]._torchdynamo_orig_callable is ascent
    assert all(model.tower_normalises for model in classifiers(on.method))  # traced with the towers
    off = Trainer(load_config(None, _overrides(world_dir)), tmp_path / "off", show_progress=False)
    assert all(t._compiled_call_impl is None for t in image_towers(off.method))
    assert not any(model.tower_normalises for model in classifiers(off.method))
    assert off.method.attack_iteration is pgd_iteration


def test_frozen_weight_attack_gives_the_same_input_gradient_and_restores_flags():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    model[1].bias.requires_grad_(False)  # a frozen parameter must stay frozen afterwards
    x = torch.rand(4, 3, 8, 8)
    cfg = PGDConfig(eps=8 / 255, step_size=2 / 255, steps=3)
    runs = []
    for frozen in (False, True):
        generator = torch.Generator().manual_seed(1)
        loss = lambda z: model(z).logsumexp(-1)  # noqa: E731
        if frozen:
            with input_grad_only(model):
                assert not any(p.requires_grad for p in model.parameters())
                runs.append(pgd(loss, x, cfg, model=model, generator=generator))
        else:
            runs.append(pgd(loss, x, cfg, model=model, generator=generator))
    assert torch.equal(runs[0], runs[1])
    assert model[1].weight.requires_grad and not model[1].bias.requires_grad
    assert model[1].weight.grad is None


def _counting_backend(graphs: list):
    """A torch.compile backend that records each graph dynamo hands it, then compiles it like
    ``aot_eager``: through AOTAutograd (functionalised, the functorch gradient traced into plain
    ATen operations), run by eager kernels. Inductor's code generation is the one step left out."""
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)
    return backend


def test_compiled_attack_iteration_gives_the_eager_attack_in_one_graph():
    """Whole-iteration compile, and the update alone compiled (train.compile): same adversarial
    images as the eager loop, one graph each (no break), and no recompilation for new targets,
    new images or a new closure."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16), torch.nn.GELU(),
                                torch.nn.Linear(16, 5))
    cfg = PGDConfig(eps=8 / 255, step_size=2 / 255, steps=3)
    graphs: list = []
    update_graphs: list = []
    compiled = compile_attack_iteration(backend=_counting_backend(graphs))
    fused = fused_update_iteration(backend=_counting_backend(update_graphs))
    for trial in range(3):
        x = torch.rand(4, 3, 8, 8)
        target = torch.randn(4, 5).softmax(-1)
        loss = lambda z: -(target * model(z).log_softmax(-1)).sum(-1)  # noqa: E731 - a fresh closure each time
        runs = []
        for iteration in (pgd_iteration, compiled, fused):
            with input_grad_only(model):
                runs.append(pgd(loss, x, cfg, model=model, generator=torch.Generator().manual_seed(trial),
                                iteration=iteration))
        torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-6)
        assert torch.equal(runs[2], runs[0])  # the same element-wise operations, in the same order
        assert not torch.equal(runs[0], x)
    assert len(graphs) == 1  # traced once: a recompile (new closure, new tensors) would add a graph
    assert len(update_graphs) == 1
    assert model[1].weight.grad is None


@pytest.mark.parametrize("method", ["mmt_ard", "ard", "mtard", "tecoa", "fare", "pmg_aft"])
def test_compiled_attack_in_the_trainer_gives_the_eager_loss(world_dir, tmp_path, method):
    """Each method's attack loss with the compiled iteration (dynamo + AOTAutograd, fullgraph): the
    eager loss, and the iteration is traced once over several steps."""
    trainer, batch = _fp32_trainer(world_dir, tmp_path / "run", **{"method.name": method})
    eager = _method_loss(trainer, batch)
    graphs: list = []
    trainer.method.attack_iteration = compile_attack_iteration(backend=_counting_backend(graphs))
    compiled = _method_loss(trainer, batch)
    # rtol 1e-3: each step follows sign(grad), and a pixel whose gradient is ~0 can take the other
    # sign when the two gradient computations round differently (FARE: 1.2e-4 here)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-6)
    for _ in range(2):
        sums = trainer._train_step(iter([batch]), {})
        assert torch.isfinite(sums["loss"])
    assert len(graphs) == 1


def test_fused_update_in_the_trainer_gives_the_eager_loss(world_dir, tmp_path):
    """train.compile's fused PGD update in the real step: the eager loss exactly (the same
    element-wise operations), the update traced once over several steps (one batch size)."""
    trainer, batch = _fp32_trainer(world_dir, tmp_path / "run")
    eager = _method_loss(trainer, batch)
    graphs: list = []
    trainer.method.attack_iteration = fused_update_iteration(backend=_counting_backend(graphs))
    assert torch.equal(_method_loss(trainer, batch), eager)
    for _ in range(2):
        assert torch.isfinite(trainer._train_step(iter([batch]), {})["loss"])
    assert len(graphs) == 1


def test_train_compile_attack_switch(world_dir, tmp_path):
    on = Trainer(load_config(None, _overrides(world_dir, **{"train.compile_attack": "true"})), tmp_path / "on",
                 show_progress=False)
    assert on.method.attack_iteration is not pgd_iteration
    assert all(t._compiled_call_impl is None for t in image_towers(on.method))  # towers: train.compile
    off = Trainer(load_config(None, _overrides(world_dir)), tmp_path / "off", show_progress=False)
    assert off.method.attack_iteration is pgd_iteration


def test_compiled_attack_with_a_lora_student_gives_the_eager_loss(world_dir, tmp_path):
    """LoRA adapts nn.Linear projections (mmtard.lora.ProjectedAttention), nothing merged in place:
    the whole PGD iteration traces into one graph with the adapters in it."""
    trainer, batch = _fp32_trainer(world_dir, tmp_path / "run", **{"train.lora": "true"})
    eager = _method_loss(trainer, batch)
    graphs: list = []
    trainer.method.attack_iteration = compile_attack_iteration(backend=_counting_backend(graphs))
    torch.testing.assert_close(_method_loss(trainer, batch), eager, rtol=1e-4, atol=1e-6)
    assert len(graphs) == 1 and torch.isfinite(trainer._train_step(iter([batch]), {})["loss"])


@pytest.mark.parametrize("size", [(16, 16), (18, 21)])  # the second: a partial patch dropped, as conv does
def test_patch_embedding_as_matrix_product_is_the_convolution(size):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4, bias=True)
    product = PatchEmbedding(conv)
    assert product.weight is conv.weight and product.bias is conv.bias  # same parameters, same names
    x = torch.rand(2, 3, *size, requires_grad=True)
    expected, got = conv(x), product(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    probe = torch.randn_like(expected)  # input and weight gradients too (the attack needs the first)
    grads_conv = torch.autograd.grad((expected * probe).sum(), [x, conv.weight, conv.bias])
    grads_product = torch.autograd.grad((got * probe).sum(), [x, conv.weight, conv.bias])
    for a, b in zip(grads_product, grads_conv):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not a patch-embedding convolution"):
        PatchEmbedding(torch.nn.Conv2d(3, 8, kernel_size=4, stride=2))


def test_matmul_patch_embedding_gives_the_convolution_step_loss(world_dir, tmp_path):
    trainer, batch = _fp32_trainer(world_dir, tmp_path / "run")
    names = sorted(trainer.student.state_dict())
    conv = _method_loss(trainer, batch)
    assert matmul_patch_embedding(image_towers(trainer.method)) == 3  # student and both teachers
    assert all(isinstance(t.conv1, PatchEmbedding) for t in image_towers(trainer.method))
    product = _method_loss(trainer, batch)
    torch.testing.assert_close(product, conv, rtol=1e-5, atol=1e-7)
    assert sorted(trainer.student.state_dict()) == names  # checkpoints and exports unchanged


def test_matmul_patch_embedding_leaves_resnet_convolutions():
    """A ResNet tower's blocks have 1x1 stride-1 ``conv1`` layers: not patch embeddings."""
    import open_clip

    resnet = open_clip.create_model("RN50")  # random weights
    assert matmul_patch_embedding([resnet.visual]) == 0
    assert not any(isinstance(m, PatchEmbedding) for m in resnet.modules())


def test_train_patch_embed_switch(world_dir, tmp_path):
    def towers(value):
        trainer = Trainer(load_config(None, _overrides(world_dir, **{"train.patch_embed": value})),
                          tmp_path / value, show_progress=False)
        return [type(t.conv1) for t in image_towers(trainer.method)]

    assert towers("matmul") == [PatchEmbedding] * 3
    # under LoRA the tower is peft's wrapper: the ViT inside it must get the product, and the
    # product must run (a conv1 set on the wrapper would be a dead extra module and state key)
    plain = Trainer(load_config(None, _overrides(world_dir, **{"train.patch_embed": "conv", "train.lora": "true"})),
                    tmp_path / "lora-conv", show_progress=False)
    lora = Trainer(load_config(None, _overrides(world_dir, **{"train.patch_embed": "matmul", "train.lora": "true"})),
                   tmp_path / "lora", show_progress=False)
    visual = lora.student.clip.visual
    assert sorted(lora.student.clip.state_dict()) == sorted(plain.student.clip.state_dict())
    products = [m for m in visual.modules() if isinstance(m, PatchEmbedding)]
    assert len(products) == 1 and not any(isinstance(m, torch.nn.Conv2d) for m in visual.modules())
    assert not products[0].weight.requires_grad  # LoRA: the base stays frozen
    calls = []
    products[0].register_forward_hook(lambda *_: calls.append(1))
    assert torch.isfinite(lora._train_step(iter([_batch(lora)]), {})["loss"]) and calls
    assert towers("auto") == [torch.nn.Conv2d] * 3  # auto: the product on a GPU only
    with pytest.raises(ConfigError, match="train.patch_embed: 'fast' is not one of auto, conv, matmul"):
        load_config(None, _overrides(world_dir, **{"train.patch_embed": "fast"}))


@pytest.mark.parametrize("ls_init_value", [None, 0.5])  # with and without open_clip's LayerScale
def test_class_token_block_gives_open_clip_outputs_and_gradients(ls_init_value):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_ratio=4.0,
                            ls_init_value=ls_init_value, output_dim=16)
    names = sorted(vit.state_dict())
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    full = vit(x)
    probe = torch.randn_like(full)
    params = [p for p in vit.parameters()]
    grads_full = torch.autograd.grad((full * probe).sum(), [x] + params)
    assert class_token_last_block([vit]) == 1
    last = vit.transformer.resblocks[-1]
    assert type(last) is ClassTokenBlock and type(vit.transformer.resblocks[0]) is not ClassTokenBlock
    assert last(torch.rand(2, 17, 32)).shape == (2, 1, 32)  # the class token alone leaves the block
    fast = vit(x)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    grads_fast = torch.autograd.grad((fast * probe).sum(), [x] + params)
    for a, b in zip(grads_fast, grads_full):  # the attack's input gradient and the update's weight gradients
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert sorted(vit.state_dict()) == names  # checkpoints and exports unchanged
    assert class_token_last_block([vit]) == 1 and type(vit.transformer.resblocks[-1]) is ClassTokenBlock


def test_class_token_last_block_leaves_towers_that_read_other_tokens():
    import open_clip
    from open_clip.transformer import VisionTransformer

    def vit(**kw):
        return VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=4.0,
                                 output_dim=16, **kw)

    others = [vit(pool_type="avg"), vit(output_tokens=True), vit(attentional_pool=True),
              vit(qk_norm=True),  # open_clip's custom block: not the block ClassTokenBlock rewrites
              open_clip.create_model("RN50").visual]
    assert class_token_last_block(others) == 0
    assert not any(isinstance(m, ClassTokenBlock) for tower in others for m in tower.modules())


@pytest.mark.parametrize("lora", [False, True])
def test_class_token_last_block_gives_the_full_step_loss(world_dir, tmp_path, lora):
    extra = {"train.lora": "true", "train.lora_dropout": 0.0} if lora else {}  # dropout: a draw per projection
    trainer, batch = _fp32_trainer(world_dir, tmp_path / "run", **extra)
    if lora:  # adapters that change the output (peft starts lora_B at zero)
        for name, parameter in trainer.student.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
    full = _method_loss(trainer, batch)
    assert class_token_last_block(image_towers(trainer.method)) == 3  # student and both teachers
    torch.testing.assert_close(_method_loss(trainer, batch), full, rtol=1e-5, atol=1e-7)
    compile_method(trainer.method, backend="aot_eager")  # and traced by torch.compile
    torch.testing.assert_close(_method_loss(trainer, batch), full, rtol=1e-4, atol=1e-6)


def test_train_last_block_switch(world_dir, tmp_path):
    def last_blocks(value, **extra):
        trainer = Trainer(load_config(None, _overrides(world_dir, **{"train.last_block": value, **extra})),
                          tmp_path / f"{value}{len(extra)}", show_progress=False)
        return trainer, [type(t.transformer.resblocks[-1]) for t in image_towers(trainer.method)]

    assert last_blocks("class_token")[1] == [ClassTokenBlock] * 3
    assert ClassTokenBlock not in last_blocks("full")[1]
    assert ClassTokenBlock not in last_blocks("auto")[1]  # the default: on a GPU only, these run on a CPU
    # under LoRA the tower is peft's wrapper and the block's attention peft's LoRA layer
    lora, _ = last_blocks("class_token", **{"train.lora": "true"})
    blocks = [m for m in lora.student.clip.visual.modules() if isinstance(m, ClassTokenBlock)]
    assert len(blocks) == 1
    calls = []
    blocks[0].register_forward_hook(lambda _m, _i, out: calls.append(out.shape[1]))
    assert torch.isfinite(lora._train_step(iter([_batch(lora)]), {})["loss"]) and calls and set(calls) == {1}
    with pytest.raises(ConfigError, match="train.last_block: 'cls' is not one of auto, full, class_token"):
        load_config(None, _overrides(world_dir, **{"train.last_block": "cls"}))


def test_last_block_auto_rewrites_on_a_gpu_only():
    assert wants_class_token_last_block("auto", torch.device("cuda"))
    assert not wants_class_token_last_block("auto", torch.device("cpu"))
    assert wants_class_token_last_block("class_token", torch.device("cpu"))
    assert not wants_class_token_last_block("full", torch.device("cuda"))
    assert TrainConfig().last_block == "auto"


def test_the_trainer_asks_the_device_for_the_auto_last_block(world_dir, tmp_path, monkeypatch):
    from mmtard import tower_rewrites

    asked = []

    def as_on_a_gpu(setting, device):  # this CPU stands in for a GPU
        asked.append((setting, device.type))
        return setting in ("auto", "class_token")

    monkeypatch.setattr(tower_rewrites, "wants_class_token_last_block", as_on_a_gpu)
    trainer = Trainer(load_config(None, _overrides(world_dir)), tmp_path / "run", show_progress=False)
    assert asked == [("auto", "cpu")]
    assert [type(t.transformer.resblocks[-1]) for t in image_towers(trainer.method)] == [ClassTokenBlock] * 3


def test_attention_kernels_give_the_same_loss(world_dir, tmp_path):
    trainer, batch = _fp32_trainer(world_dir, tmp_path / "run")
    losses = {}
    for name in ("auto", "math", "flash"):  # the kernels a CPU has
        with attention_kernel(name):
            if name != "auto":  # the block allows that kernel alone
                assert torch.backends.cuda.math_sdp_enabled() == (name == "math")
                assert torch.backends.cuda.flash_sdp_enabled() == (name == "flash")
            losses[name] = _method_loss(trainer, batch)
    torch.testing.assert_close(losses["math"], losses["auto"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses["flash"], losses["auto"], rtol=1e-5, atol=1e-7)


def test_train_attention_switch(world_dir, tmp_path):
    seen = []

    def step_with(value):
        trainer = Trainer(load_config(None, _overrides(world_dir, **{"train.attention": value})),
                          tmp_path / value, show_progress=False)
        inner = trainer.method.forward

        def spy(*args, **kwargs):  # which kernels torch may pick while the method runs
            seen.append((value, torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()))
            return inner(*args, **kwargs)

        trainer.method.forward = spy
        trainer._train_step(iter([_batch(trainer)]), {})

    step_with("math")
    step_with("auto")
    assert seen == [("math", True, False), ("auto", True, True)]
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the step
    with pytest.raises(ConfigError,
                       match="train.attention: 'fast' is not one of auto, torch, short, flash, efficient, cudnn, math"):
        load_config(None, _overrides(world_dir, **{"train.attention": "fast"}))
    with pytest.raises(ConfigError, match="train.attention: 'cudnn' needs a CUDA device"):
        Trainer(load_config(None, _overrides(world_dir, **{"train.attention": "cudnn"})), tmp_path / "cudnn",
                show_progress=False)
    with pytest.raises(ConfigError, match="'flash' has no fp32 kernel on CUDA"):
        check_attention_kernel("flash", torch.device("cuda"), None)
    check_attention_kernel("flash", torch.device("cuda"), torch.bfloat16)
    check_attention_kernel("efficient", torch.device("cuda"), None)


def test_short_attention_rewrites_the_towers_and_keeps_the_loss(world_dir, tmp_path, monkeypatch):
    """train.attention=short gives every tower of at most 64 tokens mmtard's attention module (on a
    CPU it computes through torch's attention), with the same loss and parameter names; the
    default, auto, does so on a GPU only."""
    from mmtard.short_attention import ShortSequenceAttention

    plain, batch = _fp32_trainer(world_dir, tmp_path / "plain")
    assert plain.config.train.attention == "auto"
    assert all(type(b.attn) is nn.MultiheadAttention for tower in image_towers(plain.method)
               for b in tower.transformer.resblocks)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU as auto sees one
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert wants_short_attention("auto", cuda) and wants_short_attention("short", cpu)
    assert not any(wants_short_attention(setting, device) for setting, device in
                   (("auto", cpu), ("torch", cuda), ("cudnn", cuda), ("flash", cpu)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # no bf16 tensor cores
    assert not wants_short_attention("auto", cuda) and wants_short_attention("short", cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm calls its devices cuda too
    assert not wants_short_attention("auto", cuda)
    monkeypatch.undo()
    short, _ = _fp32_trainer(world_dir, tmp_path / "short", **{"train.attention": "short"})
    for tower in image_towers(short.method):  # the tiny student and the small teachers: 17 and 37 tokens
        blocks = tower.transformer.resblocks
        assert all(type(b.attn) is ShortSequenceAttention for b in blocks), tower
    assert list(short.student.state_dict()) == list(plain.student.state_dict())
    torch.testing.assert_close(_method_loss(short, batch), _method_loss(plain, batch), rtol=1e-5, atol=1e-7)


def test_compiled_runs_key_their_caches_by_attention_kernel(world_dir, tmp_path, monkeypatch):
    """torch.compile does not guard on the attention kernel and its caches do not key on it: a
    graph traced under another kernel would be reused as is. train.compile tags the cache keys."""
    import torch.compiler.config as compiler_config

    monkeypatch.setattr(compiler_config, "cache_key_tag", "user-tag")
    for value in ("math", "auto"):
        Trainer(load_config(None, _overrides(world_dir, **{"train.compile": "true", "train.attention": value})),
                tmp_path / value, show_progress=False)
        assert compiler_config.cache_key_tag == f"user-tag,mmtard-attention={value}"
