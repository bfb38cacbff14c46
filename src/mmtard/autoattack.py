"""Evaluation attacks: the official AutoAttack (pyautoattack), plus a quick PGD for smoke checks.

The paper's protocol (METHOD.md §8) is AutoAttack's APGD-CE followed by APGD-T with 9 target
classes, 100 iterations each, L-inf. This module does not re-implement either: it configures
``pyautoattack.AutoAttack`` (``version='custom'``) and reads its verdict. AutoAttack runs its
attacks in sequence on the points still robust, so a sample counts as robust only if every
attack fails on it (worst case per input); :func:`robust_flags` returns exactly those per-sample
flags. AutoAttack's own checks (randomised or dynamic defences, probability outputs, zero
gradients, too many target classes) are logged through its ``auto-attack`` logger; they are
captured here and handed back so they reach ``results.json`` and the report.

``name="pgd"`` runs :func:`mmtard.attacks.pgd` on the cross-entropy: much weaker, only for quick
checks, and labelled as such in every result.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mmtard.attacks import PGDConfig, eval_mode, format_eps, pgd
from mmtard.errors import ConfigError

log = logging.getLogger(__name__)

ATTACK_NAMES = ("apgd", "standard", "pgd")
_NORMS = {"linf": "Linf", "l2": "L2"}
_AA_LOGGER = "auto-attack"
# Targeted DLR divides by (z_1 - (z_3 + z_4) / 2): it needs at least four classes.
_MIN_CLASSES_TARGETED = 4


@dataclass(frozen=True)
class AttackSpec:
    """One evaluation attack.

    Attributes:
        name: ``apgd`` (AutoAttack custom: APGD-CE then APGD-T, the paper's protocol),
            ``standard`` (full standard AutoAttack: APGD-CE, APGD-T, FAB-T, Square) or ``pgd``
            (cross-entropy PGD from :mod:`mmtard.attacks`, for quick checks only).
        iterations: iterations of each APGD attack (and PGD steps).
        norm: ``linf`` or ``l2``.
        n_target_classes: target classes of APGD-T (and FAB-T); capped at K - 1 for K classes.
        restarts: restarts of APGD-CE; by default 5 for ``apgd`` (AutoAttack's ``custom`` version,
            which the release and RobustVLM run, keeps its constructor's 5) and 1 for
            ``standard`` (what AutoAttack's standard version sets). Restarts only re-attack the
            inputs that are still robust.
        step_size: PGD only; default 2.5 * eps / iterations (Madry et al.).
    """

    name: str = "apgd"
    iterations: int = 100
    norm: str = "linf"
    n_target_classes: int = 9
    restarts: int | None = None
    step_size: float | None = None

    def __post_init__(self) -> None:
        if self.name not in ATTACK_NAMES:
            raise ConfigError(f"eval.attack: '{self.name}' is not one of {', '.join(ATTACK_NAMES)}")
        if self.norm not in _NORMS:
            raise ConfigError(f"eval.norm: '{self.norm}' is not one of {', '.join(_NORMS)}")
        if self.iterations < 1:
            raise ConfigError(f"eval.iterations: {self.iterations} must be >= 1")
        if self.restarts is None:  # frozen: the resolved number is what records keep
            object.__setattr__(self, "restarts", 5 if self.name == "apgd" else 1)
        elif self.name == "pgd" and self.restarts != 1:
            raise ConfigError(f"--apgd-ce-restarts: {self.restarts} restarts, but --attack pgd runs no APGD-CE")
        if self.n_target_classes < 1:
            raise ConfigError(f"eval: n_target_classes {self.n_target_classes} must be >= 1")
        if self.restarts < 1:
            raise ConfigError(f"--apgd-ce-restarts: {self.restarts} must be >= 1")

    @property
    def attacks(self) -> tuple[str, ...]:
        """AutoAttack's names of the attacks this spec runs, in order."""
        if self.name == "apgd":
            return ("apgd-ce", "apgd-t")
        if self.name == "standard":
            return ("apgd-ce", "apgd-t", "fab-t", "square")
        return ("pgd-ce",)

    def describe(self, eps_list: list[float] | None = None) -> dict:
        """The ``attack`` block of results.json."""
        out = asdict(self)
        out["attacks"] = list(self.attacks)
        # mmtard-pgd-any: an image is broken if any iterate is misclassified (earlier records, of
        # the last iterate alone, were "mmtard-pgd": not resumed or merged with these)
        out["version"] = {"apgd": "custom", "standard": "standard", "pgd": "mmtard-pgd-any"}[self.name]
        out["implementation"] = "pyautoattack" if self.name != "pgd" else "mmtard.attacks.pgd"
        out["precision"] = "fp32"
        if eps_list is not None:
            out["eps"] = [format_eps(e) for e in eps_list]
        return out


@dataclass
class AttackOutcome:
    """Per-sample verdict of one attack run on one batch.

    Attributes:
        robust: bool per input; True only if the input was classified correctly and every attack
            failed on it.
        x_adv: the images the verdict is about (adversarial where an attack succeeded).
        messages: AutoAttack's own warnings and check results, plus any raised here.
    """

    robust: torch.Tensor
    x_adv: torch.Tensor
    messages: list[str]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.messages.append(text)
        else:
            log.debug("autoattack: %s", text)


@contextlib.contextmanager
def capture_autoattack() -> Iterator[list[str]]:
    """Collect what AutoAttack says while the block runs: logger warnings, ``warnings.warn``
    calls and anything it prints. Its logger is detached from the root for the duration so the
    same text is not printed twice; the collected list is the single record."""
    aa_log = logging.getLogger(_AA_LOGGER)
    handler = _Collect()
    saved = (aa_log.level, aa_log.propagate)
    aa_log.addHandler(handler)
    aa_log.setLevel(logging.DEBUG)
    aa_log.propagate = False
    stdout = io.StringIO()
    messages: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
            warnings.simplefilter("always")
            yield messages
    finally:
        aa_log.removeHandler(handler)
        aa_log.setLevel(saved[0])
        aa_log.propagate = saved[1]
        messages.extend(handler.messages)
        for w in caught:
            if "autoattack" in (w.filename or "").lower():
                messages.append(str(w.message))
            else:  # not ours to swallow
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for line in stdout.getvalue().splitlines():
            if line.strip():
                log.debug("autoattack stdout: %s", line)


def _autoattack(model: nn.Module, eps: float, spec: AttackSpec, n_classes: int, seed: int, device) -> tuple:
    """A configured ``pyautoattack.AutoAttack`` and the notes on what was changed for K classes."""
    from pyautoattack import AutoAttack
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    norm = _NORMS[spec.norm]
    notes = []
    attacks = list(spec.attacks)
    n_targets = min(spec.n_target_classes, n_classes - 1)
    if n_targets < spec.n_target_classes:
        notes.append(
            f"{n_classes} classes: targeted attacks use {n_targets} target classes instead of {spec.n_target_classes}"
        )
    if n_classes < _MIN_CLASSES_TARGETED:
        dropped = [a for a in attacks if a in ("apgd-t", "fab-t")]
        attacks = [a for a in attacks if a not in dropped]
        notes.append(f"{n_classes} classes: the targeted DLR loss needs >= 4 classes; skipped {', '.join(dropped)}")
    version = "standard" if spec.name == "standard" else "custom"
    adversary = AutoAttack(
        model, norm=norm, eps=eps, seed=seed, device=device, version=version,
        attacks=attacks if version == "custom" else None,
    )
    adversary.verbose = False
    adversary.attacks_to_run = attacks
    # Fresh APGD objects rather than mutating n_iter: AutoAttack derives its step-size checkpoints
    # from n_iter in the constructor.
    adversary.apgd = APGDAttack(
        model, n_iter=spec.iterations, norm=norm, n_restarts=spec.restarts, eps=eps, seed=seed,
        loss="ce", eot_iter=1, rho=0.75, device=device, logger=adversary.logger,
    )
    adversary.apgd_targeted = APGDAttack_targeted(
        model, n_iter=spec.iterations, norm=norm, n_restarts=1, eps=eps, seed=seed, eot_iter=1,
        rho=0.75, n_target_classes=max(n_targets, 1), device=device, logger=adversary.logger,
    )
    adversary.fab.n_target_classes = max(n_targets, 1)
    return adversary, notes


def _pgd_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, spec: AttackSpec,
               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD on the cross-entropy; returns (images, broken). An image is broken if ANY iterate (the
    random start and the last one included) is misclassified, and its image is then the first such
    iterate: PGD's last iterate can step back out of a misclassified region, and counting only it
    would overstate robustness. The check reads the logits each iteration's forward computes
    anyway, so it costs one extra forward, for the last iterate."""
    step = spec.step_size if spec.step_size is not None else 2.5 * eps / spec.iterations
    cfg = PGDConfig(eps=eps, step_size=step, steps=spec.iterations, norm=spec.norm, random_start=True, momentum=0.0)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    broken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    found = x.clone()
    per_image = (-1,) + (1,) * (x.dim() - 1)  # a flag per image, broadcast over its pixels

    def note(z: torch.Tensor, logits: torch.Tensor) -> None:  # in place and without a host sync
        newly = logits.argmax(1).ne(y) & ~broken
        torch.where(newly.view(per_image), z.detach(), found, out=found)
        broken.logical_or_(newly)

    def loss(z: torch.Tensor) -> torch.Tensor:
        logits = model(z)
        note(z, logits.detach())
        return F.cross_entropy(logits, y, reduction="none")

    x_adv = pgd(loss, x, cfg, model=model, generator=generator)
    with torch.no_grad(), eval_mode(model):  # as the iterates were classified
        note(x_adv, model(x_adv))
    return torch.where(broken.view(per_image), found, x_adv), broken


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 as written for the block: no TF32 in cuDNN's convolutions (torch's default lets them
    use it on GPUs that have it, unlike its matrix products) nor in matrix products. Evaluation is
    fp32 on purpose; a 10-bit mantissa in the patch embedding would quietly weaken that. Set and
    restored through torch's per-backend ``fp32_precision`` flags (mixing them with the legacy
    ``allow_tf32`` ones is an error in torch); no-op where those flags do not exist."""
    flags = [(torch.backends.cudnn, "conv"), (torch.backends.cuda, "matmul")]
    holders = [getattr(module, name) for module, name in flags
               if hasattr(getattr(module, name, None), "fp32_precision")]
    saved = [holder.fp32_precision for holder in holders]
    try:
        for holder in holders:
            holder.fp32_precision = "ieee"
        yield
    finally:
        for holder, value in zip(holders, saved):
            holder.fp32_precision = value


def robust_flags(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    spec: AttackSpec,
    seed: int = 0,
) -> AttackOutcome:
    """Attack one batch and return, per input, whether it stays correctly classified.

    Args:
        model: maps [0, 1] images to logits (a ``CLIPClassifier``), in eval mode, fp32.
        x: images in [0, 1], N x 3 x H x W.
        y: true labels.
        eps: radius in pixel units (already parsed).
        spec: which attack.
        seed: seeds the attack's random starts (AutoAttack resets torch's RNG to it).

    Runs under :func:`strict_fp32`.
    """
    with strict_fp32():
        return _robust_flags(model, x, y, eps, spec, seed)


def _robust_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, spec: AttackSpec,
                  seed: int) -> AttackOutcome:
    x = x.detach().float()
    y = y.detach().long().to(x.device)
    if eps == 0 or x.shape[0] == 0:
        with torch.no_grad():
            robust = model(x).argmax(1).eq(y) if x.shape[0] else torch.zeros(0, dtype=torch.bool, device=x.device)
        return AttackOutcome(robust, x, [])
    if spec.name == "pgd":
        x_adv, broken = _pgd_flags(model, x, y, eps, spec, seed)
        with torch.no_grad():
            robust = model(x).argmax(1).eq(y) & ~broken
        return AttackOutcome(robust, x_adv, _verify(model, x, x_adv, y, robust, eps, spec.norm))
    with torch.no_grad():
        n_classes = model(x[:1]).shape[1]
    with capture_autoattack() as messages:
        adversary, notes = _autoattack(model, eps, spec, n_classes, seed, x.device)
        x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=x.shape[0])
    messages.extend(notes)
    robust = y_adv.to(y.device).eq(y)
    messages.extend(_verify(model, x, x_adv, y, robust, eps, spec.norm))
    return AttackOutcome(robust, x_adv, messages)


def _verify(model, x, x_adv, y, robust, eps: float, norm: str) -> list[str]:
    """Independent re-check of the attack's answer: perturbations inside the ball and the box, and
    every point it called broken really misclassified."""
    out = []
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1)[0] if norm == "linf" else delta.norm(dim=1)
    if (size > eps * (1 + 1e-4) + 1e-6).any():
        out.append(f"adversarial examples exceed the {norm} radius {eps:.5f} (max {size.max().item():.5f})")
    if x_adv.min() < -1e-6 or x_adv.max() > 1 + 1e-6:
        out.append("adversarial examples leave the [0, 1] image box")
    with torch.no_grad():
        still = model(x_adv).argmax(1).eq(y)
    if (still & ~robust).any():
        count = int((still & ~robust).sum())
        out.append(f"{count} points the attack marked broken are classified correctly on re-check")
    return out
