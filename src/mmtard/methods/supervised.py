"""The methods that train without teachers: clean fine-tuning (the clean teacher, METHOD.md §6)
and the robust fine-tuning baselines TeCoA, FARE and PMG-AFT (§5), which also train robust
teachers. FARE and PMG-AFT use a frozen copy of the original model as reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmtard import losses
from mmtard.methods.base import Method


class CleanFineTune(Method):
    """CE on clean images, no attack."""

    adversarial = False

    def forward(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> dict:
        logits = self.student_logits(images)
        return {"loss": losses.clean_ft_loss(logits, labels), "logits_clean": logits, "logits_adv": None}


class TeCoA(Method):
    """Supervised adversarial fine-tuning: CE(z_S(x_adv), y), the attack maximising the same CE."""

    def forward(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> dict:
        adv = self.attack(lambda x: losses.cross_entropy_per_sample(self.student(x), labels), images)
        logits = self.student_logits(adv)
        return {"loss": losses.tecoa_loss(logits, labels), "logits_adv": logits, "logits_clean": None}


class FARE(Method):
    """Unsupervised: ||f_S(x_adv) - f_orig(x)||^2 on unnormalised image features; the attack
    maximises the same distance, so no labels are used."""

    needs_reference = True

    def forward(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> dict:
        with torch.no_grad():
            target = self.reference.image_features(images).float()

        def distance(x: torch.Tensor) -> torch.Tensor:
            return (self.student.image_features(x).float() - target).pow(2).flatten(1).sum(dim=1)

        adv = self.attack(distance, images)
        features = self.student_forward(adv, output="features")
        loss = losses.fare_loss(features, target)
        with torch.no_grad():
            logits = self.student.logits_from_embed(F.normalize(features.float(), dim=-1))
        return {"loss": loss, "logits_adv": logits, "logits_clean": None}


class PMGAFT(Method):
    """CE(z_S(x_adv), y) + alpha KL(z_orig(x_adv) || z_S(x_adv)) + beta KL(z_S(x) || z_S(x_adv));
    the attack maximises the CE."""

    needs_reference = True

    def forward(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> dict:
        adv = self.attack(lambda x: losses.cross_entropy_per_sample(self.student(x), labels), images)
        with torch.no_grad():
            orig_adv = self.reference.logits(adv)
        student_clean, student_adv = self.student_logits_pair(images, adv)
        loss, terms = losses.pmg_aft_loss(student_adv, student_clean, orig_adv, labels,
                                          alpha=self.cfg.pmg_alpha, beta=self.cfg.pmg_beta)
        return {"loss": loss, **terms, "logits_adv": student_adv, "logits_clean": student_clean}
