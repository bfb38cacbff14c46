"""ARD, distillation from a single robust teacher (METHOD.md §5).

The attack maximises KL(z_R(x) || z_S(x + delta)), the robust teacher playing the role the clean
teacher plays in MMT-ARD. The loss target depends on the recipe:

* ``paper`` (METHOD.md §5): L = mean_i KL(z_R(x_adv) || z_S(x_adv)), the robust teacher on the
  adversarial images (MMT-ARD's robust stream alone);
* ``release``: L = mean_i KL(z_R(x) || z_S(x_adv)), the robust teacher on the clean images, as the
  release's single-teacher script (``train/adversarial_distill_clip_ddp_origin.py``) and the
  original ARD (Goldblum et al., 2020) do. The attack's target is reused, so no teacher pass runs
  on the adversarial images.

Extra clean teachers in the config are ignored.
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
        teacher = targets if self.cfg.recipe == "release" else teacher_outputs(self, "robust", adv)
        l_robust = weighted_kl(teacher, student_adv)
        loss = losses.ard_loss(l_robust)
        return {"loss": loss, "loss_robust": l_robust.detach().mean(), "logits_adv": student_adv, "logits_clean": None}
