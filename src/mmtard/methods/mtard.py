"""MTARD (Zhao et al. 2023, METHOD.md §5): adversarial distillation from a robust and a clean
teacher with entropy-based temperatures and a normalised loss balance.

The balancer's state changes every step and is checkpointed. Under DDP its inputs are averaged
over ranks first, so all ranks keep the same temperatures and weights.
"""

from __future__ import annotations

import torch

from mmtard.distributed import all_reduce_mean
from mmtard.methods.base import Method
from mmtard.mtard_balance import MtardBalancer
from mmtard.methods.distill import attack_targets, distillation_attack, teacher_outputs, _weights


def _mixed_logits(outputs) -> torch.Tensor:
    return sum(w * o.logits for w, o in zip(_weights(outputs), outputs))


_BALANCE_KEYS = ("loss_adv", "loss_nat", "entropy_adv", "entropy_nat")


class MTARD(Method):
    required_roles = ("clean", "robust")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.balancer = MtardBalancer(eta_tau=self.cfg.mtard_eta_tau, eta_w=self.cfg.mtard_eta_w)
        self._pending: list[torch.Tensor] = []  # this optimiser step's balance inputs, per micro-batch

    def forward(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> dict:
        clean_out = attack_targets(self, images, indices)
        adv = distillation_attack(self, clean_out, images)
        robust_out = teacher_outputs(self, "robust", adv)
        student_clean, student_adv = self.student_logits_pair(images, adv)
        loss, terms = self.balancer.loss(_mixed_logits(robust_out), student_adv, _mixed_logits(clean_out), student_clean)
        if self.training:
            self._pending.append(torch.stack([terms[k] for k in _BALANCE_KEYS]))
        return {"loss": loss, **terms, "logits_adv": student_adv, "logits_clean": student_clean}

    def after_step(self) -> None:
        """One balancer update per optimiser step, from the step's terms averaged over its
        micro-batches and ranks: the temperatures and weights then do not depend on how the global
        batch is split into micro-batches, and the host sync happens once per step."""
        if not self._pending:
            return
        values = all_reduce_mean(torch.stack(self._pending).mean(dim=0)).tolist()
        self._pending = []
        self.balancer.update(dict(zip(_BALANCE_KEYS, values)))

    def state_dict_extra(self) -> dict:
        return {"mtard_balancer": self.balancer.state_dict()}

    def load_state_dict_extra(self, state: dict) -> None:
        """Raises KeyError when the balancer's state is missing: resumed from scratch, its
        temperatures and weights would silently differ from the uninterrupted run's."""
        if "mtard_balancer" not in state:
            raise KeyError("no 'mtard_balancer' entry (MTARD's temperatures and weights)")
        self.balancer.load_state_dict(state["mtard_balancer"])
