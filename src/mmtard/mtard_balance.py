"""MTARD's adaptive temperatures and stream weights (Zhao et al. 2023, METHOD.md §5).

Kept apart from :mod:`mmtard.losses` because, unlike the pure loss functions there, the balancer
carries state from step to step (and into checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmtard.losses import _kl_terms

__all__ = ["MtardBalancer"]



def _neg_entropy(logits: Tensor, temperature: float) -> Tensor:
    """H = mean_i sum_k p log p of softmax(logits / temperature) (§5: negative entropy, <= 0), detached."""
    with torch.no_grad():
        log_p = F.log_softmax(logits.detach().float() / temperature, dim=-1)
        p = log_p.exp()
        plogp = torch.where(p > 0, p * log_p, torch.zeros_like(p))
        return plogp.sum(dim=-1).mean()


def _ratio_sign(numerator: float, denominator: float) -> float:
    """sign(numerator / denominator - 1); equal values (0/0 included) give 0 rather than NaN."""
    if numerator == denominator:
        return 0.0
    if denominator == 0.0:
        # H <= 0, so a vanishing denominator against a negative numerator means a ratio of +infinity.
        return 1.0
    value = numerator / denominator - 1.0
    return float(math.copysign(1.0, value)) if value != 0.0 else 0.0


class MtardBalancer:
    """Temperatures and weights of MTARD (Zhao et al. 2023, §5), with a checkpointable state.

    The loss of one step is

        L = w_adv KL(softmax(T_R(x_adv) / tau_adv) || softmax(S(x_adv)))
            + w_nat KL(softmax(T_C(x) / tau_nat) || softmax(S(x))),

    the temperature softening the teachers only (METHOD.md writes T_m(.)/tau_m against a plain S(.)); the
    student stays at temperature 1. KLs are summed over classes and averaged over the batch.

    Order within a training step: ``loss`` is computed with the current tau and w; after it, ``update(terms)``
    moves tau and w using that same step's detached values (the teachers' negative entropies at the taus the
    loss used and the two unweighted losses). The first ``update`` records L_m(0), so r_adv = r_nat = 1 there
    and the weights stay 1/2 while the temperatures already move. Both taus are updated from the same pair
    (H_adv, H_nat), not one after the other. Under DDP, average the four values over ranks before ``update``
    so that every rank holds the same state.

    Args:
        tau_adv: Initial temperature of the robust (adversarial) teacher.
        tau_nat: Initial temperature of the clean (natural) teacher.
        w_adv: Initial weight of the adversarial stream; w_nat = 1 - w_adv.
        eta_tau: Step of the temperature rule.
        eta_w: Step of the weight rule.
        tau_min: Lower clip of the temperatures.
        tau_max: Upper clip of the temperatures.
    """

    _STATE_KEYS = ("tau_adv", "tau_nat", "w_adv", "w_nat", "loss_adv0", "loss_nat0",
                   "eta_tau", "eta_w", "tau_min", "tau_max", "steps")

    def __init__(
        self,
        tau_adv: float = 1.0,
        tau_nat: float = 1.0,
        w_adv: float = 0.5,
        eta_tau: float = 0.001,
        eta_w: float = 0.025,
        tau_min: float = 1.0,
        tau_max: float = 10.0,
    ) -> None:
        self.tau_adv = float(tau_adv)
        self.tau_nat = float(tau_nat)
        self.w_adv = float(w_adv)
        self.w_nat = 1.0 - self.w_adv
        self.eta_tau = float(eta_tau)
        self.eta_w = float(eta_w)
        self.tau_min = float(tau_min)
        self.tau_max = float(tau_max)
        self.loss_adv0: float | None = None
        self.loss_nat0: float | None = None
        self.steps = 0

    def loss(
        self,
        teacher_adv_logits: Tensor,
        student_adv_logits: Tensor,
        teacher_nat_logits: Tensor,
        student_nat_logits: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The MTARD loss of one step at the current temperatures and weights.

        Args:
            teacher_adv_logits: T_R(x_adv), shape [B, K]; detached.
            student_adv_logits: S(x_adv), shape [B, K].
            teacher_nat_logits: T_C(x), shape [B, K]; detached.
            student_nat_logits: S(x), shape [B, K].

        Returns:
            The scalar loss and detached scalar terms: ``loss_adv``, ``loss_nat`` (unweighted KLs),
            ``entropy_adv``, ``entropy_nat`` (H_m at the current taus), ``w_adv``, ``w_nat``, ``tau_adv``,
            ``tau_nat``. Pass this dict to ``update``.
        """
        loss_adv = _kl_terms(teacher_adv_logits, student_adv_logits, self.tau_adv, 1.0).sum(dim=-1).mean()
        loss_nat = _kl_terms(teacher_nat_logits, student_nat_logits, self.tau_nat, 1.0).sum(dim=-1).mean()
        loss = self.w_adv * loss_adv + self.w_nat * loss_nat
        device = loss.device
        terms = {
            "loss_adv": loss_adv.detach(),
            "loss_nat": loss_nat.detach(),
            "entropy_adv": _neg_entropy(teacher_adv_logits, self.tau_adv),
            "entropy_nat": _neg_entropy(teacher_nat_logits, self.tau_nat),
        }
        for name in ("w_adv", "w_nat", "tau_adv", "tau_nat"):
            terms[name] = torch.tensor(getattr(self, name), dtype=torch.float32, device=device)
        return loss, terms

    def update(self, terms: Mapping[str, Tensor | float]) -> None:
        """Apply the entropy-based temperature rule and the normalised loss balance once (§5).

        tau_adv <- clip(tau_adv - eta_tau sign(H_adv / H_nat - 1), tau_min, tau_max), tau_nat symmetrically with
        H_nat / H_adv; r_m = L_m(t) / L_m(0), w_nat <- w_nat - eta_w (w_nat - r_nat / (r_adv + r_nat)),
        w_adv = 1 - w_nat: the teacher whose loss fell less gets more weight.

        Args:
            terms: The dict returned by ``loss`` for this step (or any mapping with ``loss_adv``, ``loss_nat``,
                ``entropy_adv`` and ``entropy_nat``, as tensors or floats).
        """
        loss_adv, loss_nat = float(terms["loss_adv"]), float(terms["loss_nat"])
        h_adv, h_nat = float(terms["entropy_adv"]), float(terms["entropy_nat"])

        sign_adv = _ratio_sign(h_adv, h_nat)
        sign_nat = _ratio_sign(h_nat, h_adv)
        self.tau_adv = min(max(self.tau_adv - self.eta_tau * sign_adv, self.tau_min), self.tau_max)
        self.tau_nat = min(max(self.tau_nat - self.eta_tau * sign_nat, self.tau_min), self.tau_max)

        if self.loss_adv0 is None or self.loss_nat0 is None:
            self.loss_adv0, self.loss_nat0 = loss_adv, loss_nat
        r_adv = loss_adv / max(self.loss_adv0, 1e-12)
        r_nat = loss_nat / max(self.loss_nat0, 1e-12)
        total = r_adv + r_nat
        target_nat = r_nat / total if total > 0 else 0.5
        self.w_nat = self.w_nat - self.eta_w * (self.w_nat - target_nat)
        self.w_adv = 1.0 - self.w_nat
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (floats, ``None`` before the first update) for checkpoints."""
        return {key: getattr(self, key) for key in self._STATE_KEYS}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state written by ``state_dict``.

        Raises:
            KeyError: When a key is missing.
        """
        missing = [key for key in self._STATE_KEYS if key not in state]
        if missing:
            raise KeyError(f"MtardBalancer state lacks {missing}")
        for key in self._STATE_KEYS:
            value = state[key]
            if key == "steps":
                value = int(value)
            elif value is not None:
                value = float(value)
            setattr(self, key, value)
