"""Teacher outputs shared by the distillation methods (MMT-ARD, ARD, MTARD).

With N teachers, each role's teachers are combined by their configured weights: a role's
per-sample KL and confidence are the weighted means over its teachers. Two teachers (one per role)
is the paper's case, where this reduces to METHOD.md §3 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtard import losses
from mmtard.methods.base import Method, Teacher


@dataclass
class TeacherOutputs:
    """One teacher's view of a batch: normalised embeddings and logits, no gradient."""

    teacher: Teacher
    embed: torch.Tensor
    logits: torch.Tensor


def _weights(outputs: list[TeacherOutputs]) -> list[float]:
    total = sum(o.teacher.weight for o in outputs)
    if total <= 0:
        return [1.0 / len(outputs)] * len(outputs)
    return [o.teacher.weight / total for o in outputs]


@torch.no_grad()
def clean_teacher_outputs(method: Method, role: str, images: torch.Tensor, indices: torch.Tensor) -> list[TeacherOutputs]:
    """Teacher outputs on clean, un-augmented images; served from the clean-teacher cache when the
    method has one, since they never change between epochs (DESIGN.md, contracts)."""
    outputs = []
    for index, teacher in method.teachers_of(role):
        if method.clean_cache is not None:
            embed = method.clean_cache.lookup(index, teacher.model, images, indices)
        else:
            embed = teacher.model.image_embed(images)
        outputs.append(TeacherOutputs(teacher, embed, teacher.model.logits_from_embed(embed)))
    return outputs


@torch.no_grad()
def teacher_outputs(method: Method, role: str, images: torch.Tensor) -> list[TeacherOutputs]:
    """Teacher outputs on images that change every step (adversarial examples): never cached."""
    outputs = []
    for _, teacher in method.teachers_of(role):
        embed = teacher.model.image_embed(images)
        outputs.append(TeacherOutputs(teacher, embed, teacher.model.logits_from_embed(embed)))
    return outputs


def weighted_kl(outputs: list[TeacherOutputs], student_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(teacher || student), weighted over the role's teachers: [B]."""
    return sum(w * losses.kl_per_sample(o.logits, student_logits) for w, o in zip(_weights(outputs), outputs))


def weighted_kl_elementwise(outputs: list[TeacherOutputs], student_logits: torch.Tensor) -> torch.Tensor:
    """Entry-wise KL terms, weighted over the role's teachers: [B, K] (release recipe)."""
    return sum(w * losses.kl_elementwise(o.logits, student_logits) for w, o in zip(_weights(outputs), outputs))


def weighted_confidence(outputs: list[TeacherOutputs], kind: str, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample confidence in the true class, weighted over the role's teachers: [B]."""
    return sum(
        w * losses.confidence(kind, image_embed=o.embed, text_weights=o.teacher.model.text_weights,
                              logits=o.logits, labels=labels)
        for w, o in zip(_weights(outputs), outputs)
    )


def attack_targets(method: Method, images: torch.Tensor, indices: torch.Tensor) -> list[TeacherOutputs]:
    """Whose clean-image outputs the training attack moves the student away from: the clean
    teachers (METHOD.md §2), or the robust teachers when there is no clean one (ARD)."""
    role = "clean" if method.teachers_of("clean") else "robust"
    return clean_teacher_outputs(method, role, images, indices)


def distillation_attack(method: Method, targets: list[TeacherOutputs], images: torch.Tensor) -> torch.Tensor:
    """PGD maximising KL(softmax(z_T(x)) || softmax(z_S(x + delta))) against the unwrapped student."""
    return method.attack(lambda x_adv: weighted_kl(targets, method.student(x_adv)), images)
