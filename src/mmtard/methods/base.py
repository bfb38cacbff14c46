"""What every training method shares: the teachers, the attack, and the output contract.

A method is an ``nn.Module`` whose ``forward(images, labels, indices)`` returns a dict with
``"loss"`` plus detached terms to log (STYLE.md, the method contract). It owns the frozen teachers
and reference model; the trainer owns the student's optimisation. The attack always runs on the
unwrapped student (``self.student``), while the update's forward goes through ``student_forward``,
which the trainer points at the DDP-wrapped student when there is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mmtard.attacks import Iteration, PGDConfig, pgd, pgd_iteration
from mmtard.errors import ConfigError
from mmtard.models import CLIPClassifier
from mmtard.speed import input_grad_only


@dataclass
class Teacher:
    """A frozen teacher: a classifier over the training classes, its role and its weight."""

    model: CLIPClassifier
    role: str
    weight: float = 1.0
    name: str = ""


class TeacherEmbeddingCache:
    """Interface of the clean-teacher cache (see :mod:`mmtard.teacher_cache`)."""

    def lookup(self, teacher_index: int, model: nn.Module, images: torch.Tensor,
               indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Method(nn.Module):
    """Base class: holds the student, teachers and attack; subclasses define ``forward``."""

    #: teacher roles the method needs, e.g. ("clean", "robust"); checked against the config
    required_roles: tuple[str, ...] = ()
    #: whether the method attacks at all (clean_ft does not)
    adversarial: bool = True
    #: whether it needs the frozen original model (FARE, PMG-AFT)
    needs_reference: bool = False

    def __init__(
        self,
        student: CLIPClassifier,
        teachers: list[Teacher],
        attack: PGDConfig,
        method_cfg,
        reference: CLIPClassifier | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.student = student
        self.teacher_list = teachers
        # registered as a ModuleList so .to(device) moves them, but kept out of the optimiser
        self.teachers = nn.ModuleList([t.model for t in teachers])
        self.reference = reference
        self.attack_cfg = attack
        self.cfg = method_cfg
        self.autocast_dtype = autocast_dtype
        self.student_forward: Callable[..., torch.Tensor] = student
        self.clean_cache: TeacherEmbeddingCache | None = None
        self.generator: torch.Generator | None = None
        #: eager by default; with train.compile its update fused into one kernel, with
        #: train.compile_attack the whole iteration compiled (mmtard.speed)
        self.attack_iteration: Iteration = pgd_iteration

    @classmethod
    def check_config(cls, config) -> None:
        """Refuse a config whose teachers do not fit the method."""
        roles = [t.role for t in config.teachers]
        for role in cls.required_roles:
            if role not in roles:
                raise ConfigError(
                    f"method '{config.method.name}' needs at least one teacher with role '{role}'; "
                    f"the config has roles {roles or 'none'}"
                )

    def train(self, mode: bool = True) -> "Method":
        # Teachers and the reference model stay in eval mode whatever the trainer asks.
        super().train(mode)
        for teacher in self.teachers:
            teacher.eval()
        if self.reference is not None:
            self.reference.eval()
        return self

    def teachers_of(self, role: str) -> list[tuple[int, Teacher]]:
        return [(i, t) for i, t in enumerate(self.teacher_list) if t.role == role]

    def attack(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """PGD against the unwrapped student in eval mode (METHOD.md §2). The student's weights are
        frozen meanwhile: only the input gradient is wanted, and a compiled backward would otherwise
        compute the weight gradients too (:func:`mmtard.speed.input_grad_only`)."""
        with input_grad_only(self.student):
            return pgd(loss_fn, images, self.attack_cfg, model=self.student,
                       autocast_dtype=self.autocast_dtype, generator=self.generator,
                       iteration=self.attack_iteration)

    def student_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.student_forward(images)

    def student_logits_pair(self, clean: torch.Tensor, adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and adversarial student logits from one forward of the concatenated batch:
        one DDP call per step, and one large matmul instead of two small ones (no batch norm in
        a ViT, so this is the same mathematics)."""
        logits = self.student_forward(torch.cat([clean, adv]))
        return logits[: clean.shape[0]], logits[clean.shape[0]:]

    def after_step(self) -> None:
        """Called by the trainer once per optimiser step, after the update (MTARD's balancer)."""

    def state_dict_extra(self) -> dict:
        """Method state that must survive a resume (MTARD's balancer); none by default."""
        return {}

    def load_state_dict_extra(self, state: dict) -> None:
        del state
