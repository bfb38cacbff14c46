"""The training PGD: radius parsing, the eps ball and image box, loss ascent, and no side effects on the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmtard.attacks import PGDConfig, format_eps, parse_eps, pgd
from mmtard.errors import ConfigError
from mmtard.models import CLIPClassifier, ModelSpec, create_clip, train_only_image_tower

TINY = "mmtard-tiny-vit"
NUM_CLASSES = 5


# -- parse_eps / format_eps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [("2/255", 2 / 255), ("8 / 255", 8 / 255), (0.5, 0.5), ("0.0078", 0.0078), (0, 0.0), (1, 1.0), ("1/1", 1.0)],
)
def test_parse_eps(value, expected):
    assert parse_eps(value) == expected


def test_parse_eps_bare_number_above_one_suggests_255_units():
    with pytest.raises(ConfigError) as info:
        parse_eps("8", name="attack.eps")
    assert "8/255" in str(info.value)
    assert "attack.eps" in str(info.value)


@pytest.mark.parametrize("value", ["-1/255", "-0.1", -2, "abc", "", "2/0", "2/", "/255", "2/255/2", "1.5", "nan"])
def test_parse_eps_refuses_negative_and_malformed(value):
    with pytest.raises(ConfigError):
        parse_eps(value)


@pytest.mark.parametrize("k", range(0, 17))
def test_format_eps_round_trip_in_255_units(k):
    text = format_eps(k / 255)
    assert text == f"{k}/255"
    assert parse_eps(text) == k / 255


@pytest.mark.parametrize("eps", [0.5, 0.1, 0.0078, 1e-3])
def test_format_eps_round_trip_decimal(eps):
    text = format_eps(eps)
    assert "/" not in text
    assert parse_eps(text) == pytest.approx(eps, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs", [{"norm": "l1"}, {"steps": -1}, {"momentum": 1.0}, {"momentum": -0.1}]
)
def test_pgd_config_validates(kwargs):
    with pytest.raises(ConfigError):
        PGDConfig(**kwargs)


# -- pgd ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier() -> CLIPClassifier:
    torch.manual_seed(0)
    clip = create_clip(ModelSpec(TINY))
    weights = F.normalize(torch.randn(64, NUM_CLASSES, generator=torch.Generator().manual_seed(1)), dim=0)
    return CLIPClassifier(clip, weights, scale=100.0)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(8, 3, 32, 32, generator=g)
    # Saturated pixels: the attack must stay inside the image box there.
    x[0] = 0.0
    x[1] = 1.0
    labels = torch.randint(0, NUM_CLASSES, (8,), generator=g)
    return x, labels


def _ce(model, labels):
    return lambda images: F.cross_entropy(model(images), labels, reduction="none")


CONFIGS = {
    "linf": dict(norm="linf", eps=4 / 255, step_size=1 / 255, steps=5),
    "l2": dict(norm="l2", eps=0.5, step_size=0.1, steps=5),
}


def _assert_in_ball(adv, x, cfg: PGDConfig):
    delta = adv - x
    if cfg.norm == "linf":
        assert delta.abs().max() <= cfg.eps + 1e-6
    else:
        assert delta.flatten(1).norm(dim=1).max() <= cfg.eps + 1e-6
    assert adv.min() >= 0.0 and adv.max() <= 1.0


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_ball_and_increases_loss(classifier, batch, norm, momentum):
    x, labels = batch
    loss_fn = _ce(classifier, labels)
    cfg = PGDConfig(**CONFIGS[norm], momentum=momentum)
    adv = pgd(loss_fn, x, cfg, model=classifier, generator=torch.Generator().manual_seed(0))
    assert adv.shape == x.shape and not adv.requires_grad
    _assert_in_ball(adv, x, cfg)
    random_cfg = PGDConfig(**{**CONFIGS[norm], "steps": 0}, momentum=momentum)
    random_point = pgd(loss_fn, x, random_cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean, noisy, attacked = loss_fn(x).mean(), loss_fn(random_point).mean(), loss_fn(adv).mean()
    assert attacked > clean + 1.0  # ~+4 nats here; a random point in the ball gives ~0
    assert attacked > noisy + 1.0


def test_pgd_without_random_start_and_zero_eps_is_identity(classifier, batch):
    x, labels = batch
    adv = pgd(_ce(classifier, labels), x, PGDConfig(eps=0.0, steps=3))
    assert torch.equal(adv, x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_zero_steps_random_start_is_in_ball(batch, norm):
    x, _ = batch
    cfg = PGDConfig(**{**CONFIGS[norm], "steps": 0}, random_start=True)

    def never_called(images):
        raise AssertionError("steps=0 must not evaluate the loss")

    adv = pgd(never_called, x, cfg, generator=torch.Generator().manual_seed(0))
    _assert_in_ball(adv, x, cfg)
    assert not torch.equal(adv, x)
    no_start = pgd(never_called, x, PGDConfig(**{**CONFIGS[norm], "steps": 0}, random_start=False))
    assert torch.equal(no_start, x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_is_deterministic_with_seeded_generator(classifier, batch, norm):
    x, labels = batch
    cfg = PGDConfig(**{**CONFIGS[norm], "steps": 2})
    loss_fn = _ce(classifier, labels)
    a = pgd(loss_fn, x, cfg, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(123)  # the global RNG must not matter
    b = pgd(loss_fn, x, cfg, generator=torch.Generator().manual_seed(7))
    c = pgd(loss_fn, x, cfg, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_pgd_leaves_model_state_untouched(batch):
    torch.manual_seed(0)
    clip = create_clip(ModelSpec(TINY))
    model = CLIPClassifier(clip, F.normalize(torch.randn(64, NUM_CLASSES), dim=0))
    train_only_image_tower(model.clip)
    model.train()
    model.clip.visual.transformer.resblocks[0].eval()  # a mixed-mode module tree must come back as it was
    x, labels = batch
    # Existing gradients on some parameters (as mid-accumulation), none on others.
    F.cross_entropy(model(x[:2]), labels[:2]).backward()
    model.clip.visual.proj.grad = None

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    assert any(g is not None for g in grads.values()) and grads["clip.visual.proj"] is None

    seen_modes = []

    def loss_fn(images):
        seen_modes.append(model.training)
        return F.cross_entropy(model(images), labels, reduction="none")

    pgd(loss_fn, x, PGDConfig(**CONFIGS["linf"]), model=model, generator=torch.Generator().manual_seed(0))

    assert seen_modes == [False] * CONFIGS["linf"]["steps"]  # attacked in eval mode
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for name, value in model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    for name, parameter in model.named_parameters():
        if grads[name] is None:
            assert parameter.grad is None, name
        else:
            assert torch.equal(parameter.grad, grads[name]), name


def test_pgd_restores_mode_when_loss_raises(classifier, batch):
    x, _ = batch
    classifier.train()

    def broken(images):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pgd(broken, x, PGDConfig(steps=1), model=classifier)
    assert classifier.training
    classifier.eval()


def test_momentum_follows_the_release_rule_on_the_sign_normalised_gradient():
    """RobustVLM's PGD, which the release trains with: g = sign(grad), v = sign(0.9 v + g), step
    along v. Two steps with gradients (10, 1) then (-1, -10) come back to the start; momentum on the
    raw or L1-normalised gradient would not (its second step keeps +1 in the first pixel)."""
    gradients = iter([torch.tensor([[10.0, 1.0]]), torch.tensor([[-1.0, -10.0]])])

    def linear_loss(x_adv):
        return (x_adv * next(gradients)).sum(1)

    x = torch.full((1, 2), 0.5)
    cfg = PGDConfig(eps=0.1, step_size=0.01, steps=2, random_start=False, momentum=0.9)
    torch.testing.assert_close(pgd(linear_loss, x, cfg), x)
    gradients = iter([torch.tensor([[10.0, 1.0]]), torch.tensor([[0.0, -10.0]])])  # a vanishing gradient
    torch.testing.assert_close(pgd(linear_loss, x, cfg), x + torch.tensor([[0.02, 0.0]]))  # keeps its way
