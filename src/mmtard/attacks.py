"""The fast training attack: batched PGD in pixel space, used by every adversarial method.

Evaluation does not use this module: it goes through the official AutoAttack
(:mod:`mmtard.autoattack`). Training needs something cheaper and more flexible: any
differentiable loss of the student's outputs (KL to a teacher for MMT-ARD, CE for TeCoA, an
embedding distance for FARE), random start, and the release's momentum on the sign-normalised
gradient (METHOD.md §2).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch
from torch import nn

from mmtard.errors import ConfigError

LossFn = Callable[[torch.Tensor], torch.Tensor]


def parse_eps(value: str | float | int, name: str = "eps") -> float:
    """Read an L-inf/L2 radius given as ``2/255``, ``0.0078`` or a number.

    A bare number above 1 is almost always meant in 0-255 units; it is refused with a hint rather
    than silently producing an attack that saturates every pixel.
    """
    text = str(value).strip()
    try:
        if text.count("/") > 1:
            raise ValueError(text)
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            eps = float(Fraction(numerator.strip()) / Fraction(denominator.strip()))
        else:
            eps = float(text)
    except (ValueError, ZeroDivisionError) as exc:
        raise ConfigError(f"{name}: cannot read '{value}' as a radius; write it like 2/255 or 0.0078") from exc
    if not 0.0 <= eps <= 1.0:
        hint = f" Did you mean {text}/255?" if eps > 1 and "/" not in text else ""
        raise ConfigError(f"{name}: {value} is outside [0, 1] (images are in [0, 1]).{hint}")
    return eps


def format_eps(eps: float) -> str:
    """Inverse of :func:`parse_eps` for reports and record keys: 2/255 where exact, else the
    shortest decimal that reads back as ``eps`` (``0.1``; ``0.1000004``, not its 6-digit ``0.1``,
    which would give two radii one key)."""
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    text = f"{eps:g}"
    return text if float(text) == eps else repr(eps)


@dataclass(frozen=True)
class PGDConfig:
    """One attack budget. Defaults are the release's training attack (METHOD.md §2)."""

    eps: float = 2 / 255
    step_size: float = 1 / 255
    steps: int = 10
    norm: str = "linf"
    random_start: bool = True
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2"):
            raise ConfigError(f"attack.norm: '{self.norm}' is not one of linf, l2")
        if self.steps < 0:
            raise ConfigError(f"attack.steps: {self.steps} must be >= 0")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"attack.momentum: {self.momentum} must be in [0, 1)")


def _per_sample_norm(t: torch.Tensor, p: float) -> torch.Tensor:
    return t.flatten(1).norm(p=p, dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


def _random_start(x: torch.Tensor, cfg: PGDConfig, generator: torch.Generator | None) -> torch.Tensor:
    if not cfg.random_start or cfg.eps == 0:
        return torch.zeros_like(x)
    if cfg.norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * noise - 1) * cfg.eps
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    radius = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
    return direction / _per_sample_norm(direction, 2) * radius * cfg.eps


def _project(delta: torch.Tensor, x: torch.Tensor, cfg: PGDConfig) -> torch.Tensor:
    """Back into the eps ball and, through x + delta, into the [0, 1] image box."""
    if cfg.norm == "linf":
        delta = delta.clamp(-cfg.eps, cfg.eps)
    else:
        delta = delta * (cfg.eps / _per_sample_norm(delta, 2)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0) - x


@contextlib.contextmanager
def eval_mode(model: nn.Module | None):
    """The student is attacked in eval mode (METHOD.md §2) and returned in the mode it had.

    The mode is restored module by module: ``model.train(flag)`` would also switch submodules that
    were deliberately left in eval mode (a frozen tower, frozen norms).
    """
    if model is None:
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


#: One PGD iteration: (loss_fn, x, delta, velocity, cfg, autocast_dtype) -> (delta, velocity).
Iteration = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _amp(device: torch.device, autocast_dtype: torch.dtype | None):
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=autocast_dtype)


def _unit_direction(t: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit size in ``norm``: the sign for L-inf, the per-sample
    L2-normalised vector for L2."""
    return t.sign() if norm == "linf" else t / _per_sample_norm(t, 2)


def ascent(delta: torch.Tensor, velocity: torch.Tensor, grad: torch.Tensor, x: torch.Tensor,
           cfg: PGDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The update that follows a gradient: momentum, step, projection (shared by both iterations;
    :func:`mmtard.speed.fused_update_iteration` compiles it: one element-wise kernel for L-inf).

    With momentum, the release's rule (its PGD is RobustVLM's): the gradient is normalised (sign
    for L-inf), added to the momentum-scaled velocity, and the sum normalised again; the step is
    that velocity times the step size. For L-inf this steps along sign(grad) wherever the gradient
    is non-zero and keeps the previous direction where it vanishes."""
    direction = _unit_direction(grad, cfg.norm)
    if cfg.momentum > 0:
        velocity = _unit_direction(cfg.momentum * velocity + direction, cfg.norm)
        direction = velocity
    return _project(delta + cfg.step_size * direction, x, cfg), velocity


def pgd_iteration(loss_fn: LossFn, x: torch.Tensor, delta: torch.Tensor, velocity: torch.Tensor,
                  cfg: PGDConfig, autocast_dtype: torch.dtype | None = None,
                  update: Callable[..., tuple[torch.Tensor, torch.Tensor]] = ascent
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """One eager PGD iteration: forward, input gradient through ``torch.autograd.grad``, then
    ``update`` (:func:`ascent`, or a compiled form of it)."""
    delta = delta.detach().requires_grad_(True)
    with _amp(x.device, autocast_dtype):
        loss = loss_fn(x + delta).float().sum()
    (grad,) = torch.autograd.grad(loss, delta)
    with torch.no_grad():
        return update(delta.detach(), velocity, grad, x, cfg)


def functional_pgd_iteration(loss_fn: LossFn, x: torch.Tensor, delta: torch.Tensor, velocity: torch.Tensor,
                             cfg: PGDConfig, autocast_dtype: torch.dtype | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same iteration with the gradient from ``torch.func.grad``.

    ``torch.autograd.grad`` ends a ``torch.compile`` graph; ``torch.func.grad`` does not, so this
    form compiles to ONE graph per iteration (forward, zero-shot head, loss, input gradient,
    momentum, sign step, projection) and, with ``mode="reduce-overhead"``, one CUDA graph
    (:func:`mmtard.speed.compile_attack_iteration`). Eager, it is slower than :func:`pgd_iteration`
    (functorch wraps every tensor), so it is only used compiled.
    """
    def objective(d: torch.Tensor) -> torch.Tensor:
        with _amp(x.device, autocast_dtype):
            return loss_fn(x + d).float().sum()

    grad = torch.func.grad(objective)(delta)
    return ascent(delta, velocity, grad, x, cfg)


def pgd(
    loss_fn: LossFn,
    x: torch.Tensor,
    cfg: PGDConfig,
    model: nn.Module | None = None,
    autocast_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    iteration: Iteration = pgd_iteration,
) -> torch.Tensor:
    """Maximise ``loss_fn(x_adv)`` (summed over the batch) within the eps ball around ``x``.

    Gradients are taken with respect to the perturbation only, so the model's parameter gradients
    (``.grad``) and weights are untouched; ``model``, if given, is put in eval mode for the attack
    and restored afterwards. Under ``autocast_dtype`` (bf16 on a GPU) the forward passes run in
    reduced precision while the perturbation itself stays in float32. ``iteration`` is
    :func:`pgd_iteration` (its update compiled or not) or a compiled
    :func:`functional_pgd_iteration`; the random start stays outside it (it draws from
    ``generator``).

    Returns the detached adversarial images, in [0, 1].
    """
    x = x.detach()
    delta = _project(_random_start(x, cfg, generator), x, cfg)
    velocity = torch.zeros_like(x)
    with eval_mode(model):
        for _ in range(cfg.steps):
            delta, velocity = iteration(loss_fn, x, delta, velocity, cfg, autocast_dtype)
    return (x + delta).detach()
