"""Every loss of METHOD.md as a pure tensor function.

The functions here see logits, embeddings, labels and confidences only: no models, no config. The method
modules compute the forward passes and call them. Section numbers (§) refer to ``METHOD.md``.

Conventions shared by every function:

* Losses are computed in float32 whatever the input dtype, because the softmax/log-softmax of bf16 logits at
  logit scale 100 loses most of the mass of the non-maximal classes and the KL of nearly equal distributions
  is a small difference of large numbers.
* A teacher (or a frozen original model) is a constant: its outputs are detached here, so a caller that forgets
  ``torch.no_grad`` still cannot push gradient into a teacher.
* Per-sample weights (confidences, balances) are detached too: they say how much a sample counts, they are not
  something the student should learn to change.
* A KL is summed over classes per sample and averaged over the batch ("batchmean"), except in the ``release``
  recipe, which reproduces the public code's average over all B x K entries.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ard_loss",
    "clean_ft_loss",
    "confidence",
    "cross_entropy_per_sample",
    "fare_loss",
    "kl_elementwise",
    "kl_per_sample",
    "mmt_ard_paper_loss",
    "mmt_ard_release_loss",
    "pmg_aft_loss",
    "sigmoid_balance",
    "tecoa_loss",
]


# ----------------------------------------------------------------------------------------------------------------
# Kullback-Leibler building blocks (§3)
# ----------------------------------------------------------------------------------------------------------------


def _kl_terms(
    target_logits: Tensor,
    input_logits: Tensor,
    target_temperature: float = 1.0,
    input_temperature: float = 1.0,
    detach_target: bool = True,
) -> Tensor:
    """Entries p_k (log p_k - log q_k) of KL(p || q), p = softmax(target/Tt), q = softmax(input/Ti), in float32.

    Both log-probabilities come from ``log_softmax`` so that no probability is ever logged. Entries where p
    underflows to exactly 0 contribute 0 (the limit of p log p), also when a logit is -inf.
    """
    if target_logits.shape != input_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(target_logits.shape)} vs {tuple(input_logits.shape)}")
    if target_temperature <= 0 or input_temperature <= 0:
        raise ValueError("temperatures must be positive")
    target = target_logits.detach() if detach_target else target_logits
    log_p = F.log_softmax(target.float() / target_temperature, dim=-1)
    log_q = F.log_softmax(input_logits.float() / input_temperature, dim=-1)
    p = log_p.exp()
    terms = p * (log_p - log_q)
    return torch.where(p > 0, terms, torch.zeros_like(terms))


def kl_elementwise(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-entry terms p_t,k (log p_t,k - log p_s,k) of KL(softmax(t/T) || softmax(s/T)).

    The ``release`` recipe (§4) weights these B x K entries per sample and averages over all of them, so it
    needs the entries rather than the per-sample sums.

    Args:
        teacher_logits: Teacher logits, shape [B, K]; treated as a constant (detached).
        student_logits: Student logits, shape [B, K].
        temperature: Softmax temperature applied to both sides (the release uses 1; the logit scale s = 100 is
            already inside the logits, §1).

    Returns:
        Float32 tensor [B, K]; its row sums are ``kl_per_sample``.
    """
    return _kl_terms(teacher_logits, student_logits, temperature, temperature)


def kl_per_sample(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(softmax(t/T) || softmax(s/T)) summed over classes, one value per sample.

    This is L_R,i and L_C,i of §3 (teacher first: the student is pulled towards the teacher's distribution).
    No T^2 factor is applied: METHOD.md has none, and every recipe there uses T = 1.

    Args:
        teacher_logits: Teacher logits, shape [B, K]; treated as a constant (detached).
        student_logits: Student logits, shape [B, K].
        temperature: Softmax temperature applied to both sides.

    Returns:
        Float32 tensor [B], non-negative up to rounding.
    """
    return kl_elementwise(teacher_logits, student_logits, temperature).sum(dim=-1)


def cross_entropy_per_sample(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy -log softmax(z)[y] per sample, computed in float32.

    Args:
        logits: Logits, shape [B, K].
        labels: Integer class indices, shape [B].

    Returns:
        Float32 tensor [B].
    """
    return F.cross_entropy(logits.float(), labels, reduction="none")


# ----------------------------------------------------------------------------------------------------------------
# Teacher confidence and the adaptive sigmoid balance (§3, §4)
# ----------------------------------------------------------------------------------------------------------------


def confidence(
    kind: str,
    *,
    image_embed: Tensor | None = None,
    text_weights: Tensor | None = None,
    logits: Tensor | None = None,
    labels: Tensor,
) -> Tensor:
    """A teacher's confidence in the true class of each sample (§3), detached.

    ``'cosine'`` (the release): c_i = <normalize(f(x_i)), W[:, y_i]>, the raw cosine between the teacher's image
    embedding and the text embedding of the true class. ``'probability'``: c_i = softmax(z(x_i))[y_i].

    Args:
        kind: ``'cosine'`` or ``'probability'``.
        image_embed: Teacher image embeddings f(x), shape [B, d]; needed for ``'cosine'``. Normalised again
            here, since a caller may pass the raw encoder output.
        text_weights: Class text embeddings W, shape [d, K], columns already unit-norm (§1); needed for
            ``'cosine'``.
        logits: Teacher logits z(x), shape [B, K]; needed for ``'probability'``.
        labels: True classes y, shape [B].

    Returns:
        Float32 tensor [B] without gradient: in [-1, 1] for cosine, in [0, 1] for probability.

    Raises:
        ValueError: On an unknown kind or a missing input.
    """
    labels = labels.long()
    with torch.no_grad():
        if kind == "cosine":
            if image_embed is None or text_weights is None:
                raise ValueError("confidence 'cosine' needs image_embed and text_weights")
            embed = F.normalize(image_embed.float(), dim=-1)
            class_embed = text_weights.float().t()[labels]  # [B, d]: column y_i of W for each sample
            conf = (embed * class_embed).sum(dim=-1)
        elif kind == "probability":
            if logits is None:
                raise ValueError("confidence 'probability' needs logits")
            conf = F.softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
        else:
            raise ValueError(f"unknown confidence kind {kind!r}; expected 'cosine' or 'probability'")
    return conf.detach()


def _zscore(values: Tensor, eps: float) -> Tensor:
    """Batch z-score with the population std; all zeros when the batch has (almost) no spread.

    "The batch" of METHOD.md §4 is the micro-batch the loss is computed on (one rank's, one
    accumulation step's): the statistics are then the same for N ranks as for one process
    accumulating N micro-batches, which keeps runs comparable across machines. With the paper's
    global batch of 512 on 8 GPUs, each z-score is over 64 samples (the whole 512 on one GPU
    without accumulation).
    """
    values = values.float()
    if values.numel() < 2:
        return torch.zeros_like(values)
    std = values.std(correction=0)
    # torch.where instead of a Python branch on std: no device-to-host sync in the training step.
    return torch.where(std >= eps, (values - values.mean()) / std.clamp_min(eps), torch.zeros_like(values))


def sigmoid_balance(conf_robust: Tensor, conf_clean: Tensor, kappa: float = 1.0, eps: float = 1e-6) -> Tensor:
    """Adaptive sigmoid balance b_i of the ``paper`` recipe (§4, step 2), detached.

    Each teacher's confidences are standardised over the batch separately, which removes the scale bias of a
    systematically over-confident teacher: adding a constant to, or multiplying, one teacher's confidences
    leaves b unchanged. Then b_i = sigmoid(kappa * (zR_i - zC_i)) is the share of the robust stream for sample i;
    the clean stream gets 1 - b_i. A teacher whose confidences do not vary over the batch (std < eps, e.g. a
    batch of one) gets z = 0 rather than a division by ~0.

    Args:
        conf_robust: Robust teacher confidences c_R, shape [B].
        conf_clean: Clean teacher confidences c_C, shape [B].
        kappa: Sharpness of the sigmoid; 0 gives b = 1/2 everywhere.
        eps: Smallest population std treated as spread.

    Returns:
        Float32 tensor [B] in (0, 1) without gradient.
    """
    if conf_robust.shape != conf_clean.shape:
        raise ValueError(f"confidence shapes differ: {tuple(conf_robust.shape)} vs {tuple(conf_clean.shape)}")
    with torch.no_grad():
        z_robust = _zscore(conf_robust.detach(), eps)
        z_clean = _zscore(conf_clean.detach(), eps)
        return torch.sigmoid(kappa * (z_robust - z_clean))


# ----------------------------------------------------------------------------------------------------------------
# MMT-ARD recipes (§4)
# ----------------------------------------------------------------------------------------------------------------


def mmt_ard_release_loss(
    robust_kl_elem: Tensor,
    clean_kl_elem: Tensor,
    conf_robust: Tensor,
    conf_clean: Tensor,
    w_robust: float = 50.0,
    w_clean: float = 5.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The ``release`` recipe of §4, exactly as the public code computes it.

    loss = mean over the B x K entries of (w_robust c_R,i e_R,ik + w_clean c_C,i e_C,ik), which equals
    (1/K) mean_i(50 c_R,i L_R,i + 5 c_C,i L_C,i): the entry-wise mean divides by K, so with ImageNet the
    effective factors are 0.05 and 0.005. Kept as is because the release's learning rate was tuned with it.

    Args:
        robust_kl_elem: ``kl_elementwise(z_R(x_adv), z_S(x_adv))``, shape [B, K].
        clean_kl_elem: ``kl_elementwise(z_C(x), z_S(x))``, shape [B, K].
        conf_robust: Robust teacher confidences c_R (cosine in the release), shape [B]; detached here.
        conf_clean: Clean teacher confidences c_C, shape [B]; detached here.
        w_robust: Factor of the robust stream (50 in the release).
        w_clean: Factor of the clean stream (5 in the release).

    Returns:
        The scalar loss and detached scalar terms: ``loss_robust`` and ``loss_clean`` (unweighted batch means
        of L_R and L_C), ``conf_robust`` and ``conf_clean`` (batch means).
    """
    if robust_kl_elem.shape != clean_kl_elem.shape or robust_kl_elem.dim() != 2:
        raise ValueError("robust_kl_elem and clean_kl_elem must both have shape [B, K]")
    c_robust = conf_robust.detach().float()[:, None]
    c_clean = conf_clean.detach().float()[:, None]
    weighted = w_robust * c_robust * robust_kl_elem.float() + w_clean * c_clean * clean_kl_elem.float()
    loss = weighted.mean()
    terms = {
        "loss_robust": robust_kl_elem.detach().float().sum(dim=-1).mean(),
        "loss_clean": clean_kl_elem.detach().float().sum(dim=-1).mean(),
        "conf_robust": c_robust.mean(),
        "conf_clean": c_clean.mean(),
    }
    return loss, terms


def mmt_ard_paper_loss(
    l_robust: Tensor | None,
    l_clean: Tensor | None,
    conf_robust: Tensor | None,
    conf_clean: Tensor | None,
    *,
    lambda_r: float = 1.0,
    lambda_c: float = 1.0,
    kappa: float = 1.0,
    use_confidence: bool = True,
    use_balance: bool = True,
    use_clean: bool = True,
    use_robust: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The ``paper`` recipe of §4 (this project's reading of the abstract) with its ablation switches.

    loss = mean_i( lambda_r b_i a_R,i L_R,i + lambda_c (1 - b_i) a_C,i L_C,i ), with a = c (dynamic
    per-sample weights) and b = ``sigmoid_balance(c_R, c_C, kappa)``. The switches, as this project reads them:

    * ``use_confidence=False``: a_R = a_C = 1. The balance b still uses the confidences; only the per-sample
      weights a are switched off.
    * ``use_balance=False``: b_i = 1/2, so both streams get equal weight 1/2. The half (rather than weight 1
      each) keeps b + (1 - b) = 1, so switching the balance off does not change the loss scale, and the
      effective learning rate, at the same time.
    * ``use_clean=False``: only the robust term, with b = 1 (single robust teacher). With confidence off too
      this is exactly ``ard_loss`` (times lambda_r).
    * ``use_robust=False``: only the clean term, with 1 - b = 1.

    A stream that is off needs no inputs: its loss and confidence may be ``None``.

    Args:
        l_robust: L_R,i = ``kl_per_sample(z_R(x_adv), z_S(x_adv))``, shape [B].
        l_clean: L_C,i = ``kl_per_sample(z_C(x), z_S(x))``, shape [B].
        conf_robust: Robust teacher confidences c_R (probability by default), shape [B]; detached here.
        conf_clean: Clean teacher confidences c_C, shape [B]; detached here.
        lambda_r: Factor of the robust stream.
        lambda_c: Factor of the clean stream.
        kappa: Sharpness of the sigmoid balance.
        use_confidence: Weight each sample by its teacher's confidence.
        use_balance: Balance the streams per sample with the sigmoid of the confidence z-scores.
        use_clean: Keep the clean-teacher stream.
        use_robust: Keep the robust-teacher stream.

    Returns:
        The scalar loss and detached scalar terms: ``loss_robust``, ``loss_clean`` (unweighted batch means of
        L_R, L_C), ``conf_robust``, ``conf_clean`` (batch means) and ``balance`` (mean b); a term whose input is
        ``None`` is left out.

    Raises:
        ValueError: When both streams are off, or an input that an enabled part needs is missing.
    """
    if not (use_robust or use_clean):
        raise ValueError("mmt_ard_paper_loss needs at least one of the robust and clean streams")
    both = use_robust and use_clean
    _require(use_robust, l_robust=l_robust)
    _require(use_clean, l_clean=l_clean)
    _require(use_robust and use_confidence, conf_robust=conf_robust)
    _require(use_clean and use_confidence, conf_clean=conf_clean)
    _require(both and use_balance, conf_robust=conf_robust, conf_clean=conf_clean)

    reference = l_robust if use_robust else l_clean
    if both and use_balance:
        balance = sigmoid_balance(conf_robust, conf_clean, kappa)
    else:
        share = 0.5 if both else (1.0 if use_robust else 0.0)
        balance = torch.full(reference.shape, share, dtype=torch.float32, device=reference.device)

    per_sample = torch.zeros(reference.shape, dtype=torch.float32, device=reference.device)
    if use_robust:
        a_robust = conf_robust.detach().float() if use_confidence else 1.0
        per_sample = per_sample + lambda_r * balance * a_robust * l_robust.float()
    if use_clean:
        a_clean = conf_clean.detach().float() if use_confidence else 1.0
        per_sample = per_sample + lambda_c * (1.0 - balance) * a_clean * l_clean.float()

    terms = {"balance": balance.mean()}
    for name, value in (("loss_robust", l_robust), ("loss_clean", l_clean),
                        ("conf_robust", conf_robust), ("conf_clean", conf_clean)):
        if value is not None:
            terms[name] = value.detach().float().mean()
    return per_sample.mean(), terms


def _require(needed: bool, **inputs: Tensor | None) -> None:
    """Raise a ValueError naming the first input that is ``None`` although ``needed``."""
    if needed:
        for name, value in inputs.items():
            if value is None:
                raise ValueError(f"mmt_ard_paper_loss: {name} is required by the enabled switches")


# ----------------------------------------------------------------------------------------------------------------
# Baselines (§5)
# ----------------------------------------------------------------------------------------------------------------


def ard_loss(l_robust: Tensor) -> Tensor:
    """ARD with a single robust teacher (§5): L = mean_i L_R,i, i.e. the paper recipe with the clean stream off.

    Args:
        l_robust: ``kl_per_sample(z_R(x_adv), z_S(x_adv))`` (the ``release`` recipe: z_R(x) as
            the target), shape [B].

    Returns:
        Float32 scalar.
    """
    return l_robust.float().mean()


def tecoa_loss(student_adv_logits: Tensor, labels: Tensor) -> Tensor:
    """TeCoA (§5): supervised adversarial fine-tuning, CE(z_S(x_adv), y), batch mean in float32.

    Args:
        student_adv_logits: Student logits on the adversarial images, shape [B, K].
        labels: True classes, shape [B].

    Returns:
        Float32 scalar.
    """
    return cross_entropy_per_sample(student_adv_logits, labels).mean()


def fare_loss(student_adv_embed: Tensor, orig_clean_embed: Tensor) -> Tensor:
    """FARE (§5): ||f_S(x_adv) - f_orig(x)||^2 summed over dimensions, batch mean, in float32.

    FARE is unsupervised and works on the image encoder's embeddings as they come out, *unnormalised*
    (normalising would let the student drift in norm freely); this function does not normalise, it takes
    whatever the caller passes. The frozen original encoder's embedding is a target, so it is detached.

    Args:
        student_adv_embed: Student image embeddings of the adversarial images, shape [B, d].
        orig_clean_embed: Frozen original image embeddings of the clean images, shape [B, d].

    Returns:
        Float32 scalar.
    """
    if student_adv_embed.shape != orig_clean_embed.shape:
        raise ValueError("student and original embeddings must have the same shape")
    diff = student_adv_embed.float() - orig_clean_embed.detach().float()
    return diff.pow(2).flatten(1).sum(dim=-1).mean()


def pmg_aft_loss(
    student_adv_logits: Tensor,
    student_clean_logits: Tensor,
    orig_adv_logits: Tensor,
    labels: Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PMG-AFT (§5): CE(z_S(x_adv), y) + alpha KL(z_orig(x_adv) || z_S(x_adv)) + beta KL(z_S(x) || z_S(x_adv)).

    The KLs are between the softmax distributions, summed over classes, batch means. The frozen original model
    is a guide, so its logits are detached. The student's clean distribution in the third term is *not*
    detached, as in the PMG-AFT paper: the term pulls the clean and adversarial outputs towards each other from
    both sides.

    Args:
        student_adv_logits: z_S(x_adv), shape [B, K].
        student_clean_logits: z_S(x), shape [B, K]; keeps its gradient.
        orig_adv_logits: z_orig(x_adv) of the frozen original model, shape [B, K].
        labels: True classes, shape [B].
        alpha: Factor of the guidance term.
        beta: Factor of the clean/adversarial consistency term.

    Returns:
        The scalar loss and detached scalar terms ``ce``, ``kl_orig``, ``kl_clean``.
    """
    ce = cross_entropy_per_sample(student_adv_logits, labels).mean()
    kl_orig = _kl_terms(orig_adv_logits, student_adv_logits).sum(dim=-1).mean()
    kl_clean = _kl_terms(student_clean_logits, student_adv_logits, detach_target=False).sum(dim=-1).mean()
    loss = ce + alpha * kl_orig + beta * kl_clean
    return loss, {"ce": ce.detach(), "kl_orig": kl_orig.detach(), "kl_clean": kl_clean.detach()}


def clean_ft_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Clean fine-tuning (the clean teacher of §6): CE(z(x), y) on clean images, batch mean in float32.

    Args:
        student_logits: Logits on clean images, shape [B, K].
        labels: True classes, shape [B].

    Returns:
        Float32 scalar.
    """
    return cross_entropy_per_sample(student_logits, labels).mean()
