"""MMT-ARD: the student matches robust teachers on adversarial inputs and clean teachers on clean
inputs, with per-sample confidence weights and an adaptive sigmoid balance (METHOD.md §3-4).

Two recipes: ``release`` reproduces the public code (entry-wise KL mean, factors 50 and 5, cosine
confidence); ``paper`` is this project's reading of the paper's abstract (z-scored sigmoid balance,
probability confidence by default). The ablation switches of §4 apply to ``paper``.
"""

from __future__ import annotations

import torch

from mmtard import losses
from mmtard.errors import ConfigError
from mmtard.methods.base import Method
from mmtard.methods.distill import (clean_teacher_outputs, distillation_attack, teacher_outputs,
                                    weighted_confidence, weighted_kl, weighted_kl_elementwise)


class MMTARD(Method):
    required_roles = ("clean", "robust")

    @classmethod
    def check_config(cls, config) -> None:
        method = config.method
        switches = ("use_clean", "use_robust", "use_confidence", "use_balance")
        off = [name for name in switches if not getattr(method, name)]
        if method.recipe == "release" and off:
            raise ConfigError(f"method.{off[0]}: recipe 'release' has no ablation switches (its factors 50 and 5 "
                              "are fixed); use recipe 'paper' for the ablations")
        if not (method.use_clean or method.use_robust):
            raise ConfigError("method: at least one of use_clean and use_robust must be true")
        roles = {t.role for t in config.teachers}
        needed = ({"robust"} if method.use_robust else set()) | ({"clean"} if method.use_clean else set())
        for role in sorted(needed - roles):
            raise ConfigError(f"method 'mmt_ard' needs a teacher with role '{role}'; the config has {sorted(roles) or 'none'}")

    @property
    def confidence_kind(self) -> str:
        """``auto`` follows the recipe: the release's raw cosine, the paper reading's probability."""
        if self.cfg.confidence != "auto":
            return self.cfg.confidence
        return "cosine" if self.cfg.recipe == "release" else "probability"

    def forward(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> dict:
        cfg = self.cfg
        kind = self.confidence_kind
        # Clean stream off is the single-robust-teacher case (METHOD.md §4): the robust teacher then
        # also sets the attack's target, as in ARD, and no clean teacher runs at all.
        # Robust stream off: nothing adversarial reaches the loss, so no attack runs at all.
        role = "clean" if cfg.use_clean else "robust"
        targets = clean_teacher_outputs(self, role, images, indices)
        clean_out = targets if cfg.use_clean else []
        if cfg.use_robust:
            adv = distillation_attack(self, targets, images)
            robust_out = teacher_outputs(self, "robust", adv)
        else:
            robust_out = []

        if cfg.use_clean and cfg.use_robust:
            student_clean, student_adv = self.student_logits_pair(images, adv)
        elif cfg.use_clean:
            student_clean, student_adv = self.student_logits(images), None
        else:
            student_clean, student_adv = None, self.student_logits(adv)

        if cfg.recipe == "release":
            loss, terms = losses.mmt_ard_release_loss(
                weighted_kl_elementwise(robust_out, student_adv),
                weighted_kl_elementwise(clean_out, student_clean),
                weighted_confidence(robust_out, kind, labels),
                weighted_confidence(clean_out, kind, labels),
                w_robust=cfg.release_w_robust, w_clean=cfg.release_w_clean,
            )
        else:
            loss, terms = losses.mmt_ard_paper_loss(
                weighted_kl(robust_out, student_adv) if cfg.use_robust else None,
                weighted_kl(clean_out, student_clean) if cfg.use_clean else None,
                weighted_confidence(robust_out, kind, labels) if robust_out else None,
                weighted_confidence(clean_out, kind, labels) if clean_out else None,
                lambda_r=cfg.lambda_r, lambda_c=cfg.lambda_c, kappa=cfg.kappa,
                use_confidence=cfg.use_confidence, use_balance=cfg.use_balance,
                use_clean=cfg.use_clean, use_robust=cfg.use_robust,
            )
        return {"loss": loss, **terms, "logits_adv": student_adv, "logits_clean": student_clean}
