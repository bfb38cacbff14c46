"""ARD, distillation from a single robust teacher (METHOD.md §5): L = mean_i KL(z_R(x_adv) || z_S(x_adv)).

The attack maximises KL(z_R(x) || z_S(x + delta)), the robust teacher playing the role the clean
teacher plays in MMT-ARD. Extra clean teachers in the config are ignored.
"""

from __future__ import annotations

import torch

from mmtard import losses
from mmtard.methods.base import Method
from mmtard.methods.distill import clean_teacher_outputs, distillation_attack, teacher_outputs, weighted_kl


class ARD(Method):
    required_roles = ("robust",)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> dict:
        targets = clean_teacher_outputs(self, "robust", images, indices)
        adv = distillation_attack(self, targets, images)
        student_adv = self.student_logits(adv)
        l_robust = weighted_kl(teacher_outputs(self, "robust", adv), student_adv)
        loss = losses.ard_loss(l_robust)
        return {"loss": loss, "loss_robust": l_robust.detach().mean(), "logits_adv": student_adv, "logits_clean": None}
