"""Every loss of METHOD.md checked against a hand computation on tiny tensors.

The expected values are written out with plain ``math`` on Python lists, never by calling the function under test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmtard.mtard_balance import MtardBalancer
from mmtard.losses import (
    ard_loss,
    clean_ft_loss,
    confidence,
    cross_entropy_per_sample,
    fare_loss,
    kl_elementwise,
    kl_per_sample,
    mmt_ard_paper_loss,
    mmt_ard_release_loss,
    pmg_aft_loss,
    sigmoid_balance,
    tecoa_loss,
)

T_LOGITS = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
S_LOGITS = [[3.0, 2.0, 1.0], [1.0, 0.0, -1.0]]


# -- hand computations -------------------------------------------------------------------------------------------


def _softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _kl_entries(t_row, s_row, t_temp=1.0, s_temp=1.0) -> list[float]:
    p, q = _softmax(t_row, t_temp), _softmax(s_row, s_temp)
    return [pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q)]


def _kl(t_row, s_row, t_temp=1.0, s_temp=1.0) -> float:
    return sum(_kl_entries(t_row, s_row, t_temp, s_temp))


def _ce(row, label) -> float:
    return -math.log(_softmax(row)[label])


def _neg_entropy(rows, temperature) -> float:
    return sum(sum(p * math.log(p) for p in _softmax(r, temperature)) for r in rows) / len(rows)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _zscores(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / std for v in values]


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# -- KL, CE ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_per_sample_matches_hand(temperature):
    got = kl_per_sample(_t(T_LOGITS), _t(S_LOGITS), temperature)
    want = [_kl(t, s, temperature, temperature) for t, s in zip(T_LOGITS, S_LOGITS)]
    assert got.dtype == torch.float32 and got.shape == (2,)
    assert torch.allclose(got, _t(want), atol=1e-6)


def test_kl_elementwise_matches_hand_and_sums_to_kl():
    got = kl_elementwise(_t(T_LOGITS), _t(S_LOGITS))
    want = [_kl_entries(t, s) for t, s in zip(T_LOGITS, S_LOGITS)]
    assert got.shape == (2, 3)
    assert torch.allclose(got, _t(want), atol=1e-6)
    assert torch.allclose(got.sum(-1), kl_per_sample(_t(T_LOGITS), _t(S_LOGITS)), atol=1e-6)


def test_kl_is_zero_for_equal_logits_and_stable_at_scale_100():
    logits = 100.0 * torch.randn(4, 7)
    assert torch.allclose(kl_per_sample(logits, logits), torch.zeros(4), atol=1e-5)
    # Saturated teacher: p underflows to 0 on some classes; the result must stay finite and non-negative.
    teacher = torch.tensor([[1000.0, 0.0, -1000.0]])
    student = torch.tensor([[0.0, 0.0, 0.0]])
    got = kl_per_sample(teacher, student)
    assert torch.isfinite(got).all()
    assert got.item() == pytest.approx(math.log(3.0), abs=1e-5)
    assert torch.isfinite(kl_per_sample(torch.tensor([[0.0, -math.inf, 1.0]]), student)).all()


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kl_gradient_reaches_only_the_student(temperature):
    teacher = _t(T_LOGITS).requires_grad_()
    student = _t(S_LOGITS).requires_grad_()
    kl_per_sample(teacher, student, temperature).sum().backward()
    assert teacher.grad is None
    # d/ds KL(p_t || softmax(s/T)) = (softmax(s/T) - p_t) / T, written out by hand.
    want = [[(q - p) / temperature for p, q in zip(_softmax(t, temperature), _softmax(s, temperature))]
            for t, s in zip(T_LOGITS, S_LOGITS)]
    assert torch.allclose(student.grad, _t(want), atol=1e-6)


def test_kl_bf16_inputs_give_float32_close_to_float32():
    torch.manual_seed(0)
    teacher, student = 100.0 * torch.randn(8, 10), 100.0 * torch.randn(8, 10)
    got = kl_per_sample(teacher.bfloat16(), student.bfloat16())
    assert got.dtype == torch.float32
    # The float32 computation on the bf16-rounded logits is exact; against the unrounded logits only the input
    # rounding (relative 2^-8 of values ~100) remains.
    same = kl_per_sample(teacher.bfloat16().float(), student.bfloat16().float())
    assert torch.equal(got, same)
    assert torch.allclose(got, kl_per_sample(teacher, student), rtol=0.03, atol=0.5)
    assert kl_elementwise(teacher.bfloat16(), student.bfloat16()).dtype == torch.float32


def test_cross_entropy_per_sample_and_ce_losses_match_hand():
    labels = torch.tensor([2, 0])
    want = [_ce(S_LOGITS[0], 2), _ce(S_LOGITS[1], 0)]
    assert torch.allclose(cross_entropy_per_sample(_t(S_LOGITS), labels), _t(want), atol=1e-6)
    assert tecoa_loss(_t(S_LOGITS), labels).item() == pytest.approx(sum(want) / 2, abs=1e-6)
    assert clean_ft_loss(_t(S_LOGITS), labels).item() == pytest.approx(sum(want) / 2, abs=1e-6)
    assert tecoa_loss(_t(S_LOGITS).bfloat16(), labels).dtype == torch.float32


# -- confidence and balance --------------------------------------------------------------------------------------


def test_cosine_confidence_matches_hand_and_renormalises():
    embed = _t([[3.0, 4.0], [1.0, 0.0]]).requires_grad_()  # unnormalised on purpose: norms 5 and 1
    weights = _t([[1.0, 0.0, 0.6], [0.0, 1.0, 0.8]])  # d=2, K=3, unit columns
    got = confidence("cosine", image_embed=embed, text_weights=weights, labels=torch.tensor([2, 1]))
    # <(0.6, 0.8), (0.6, 0.8)> = 1 and <(1, 0), (0, 1)> = 0
    assert torch.allclose(got, _t([1.0, 0.0]), atol=1e-6)
    assert not got.requires_grad
    got = confidence("cosine", image_embed=embed, text_weights=weights, labels=torch.tensor([0, 2]))
    assert torch.allclose(got, _t([0.6, 0.6]), atol=1e-6)


def test_probability_confidence_matches_hand():
    logits = _t(S_LOGITS).requires_grad_()
    got = confidence("probability", logits=logits.bfloat16(), labels=torch.tensor([1, 0]))
    want = [_softmax(S_LOGITS[0])[1], _softmax(S_LOGITS[1])[0]]
    assert got.dtype == torch.float32 and not got.requires_grad
    assert torch.allclose(got, _t(want), atol=1e-2)
    got = confidence("probability", logits=logits, labels=torch.tensor([1, 0]))
    assert torch.allclose(got, _t(want), atol=1e-6)


def test_confidence_rejects_bad_kind_and_missing_inputs():
    labels = torch.tensor([0])
    with pytest.raises(ValueError):
        confidence("entropy", logits=torch.zeros(1, 3), labels=labels)
    with pytest.raises(ValueError):
        confidence("cosine", image_embed=torch.zeros(1, 2), labels=labels)
    with pytest.raises(ValueError):
        confidence("probability", labels=labels)


def test_sigmoid_balance_matches_hand():
    c_robust, c_clean = [0.2, 0.5, 0.8, 0.9], [0.9, 0.1, 0.4, 0.6]
    z_robust, z_clean = _zscores(c_robust), _zscores(c_clean)
    for kappa in (1.0, 2.5):
        want = [_sigmoid(kappa * (zr - zc)) for zr, zc in zip(z_robust, z_clean)]
        got = sigmoid_balance(_t(c_robust), _t(c_clean), kappa)
        assert torch.allclose(got, _t(want), atol=1e-6)


def test_sigmoid_balance_edge_cases():
    conf = _t([0.3, 0.7, 0.1])
    assert torch.allclose(sigmoid_balance(conf, conf.clone()), torch.full((3,), 0.5))
    # z-scoring removes an over-confident teacher's scale and offset.
    other = _t([0.9, 0.2, 0.5])
    base = sigmoid_balance(conf, other)
    assert torch.allclose(sigmoid_balance(10.0 * conf, other), base, atol=1e-6)
    assert torch.allclose(sigmoid_balance(conf, 0.1 * other + 3.0), base, atol=1e-6)
    # A teacher without spread gets z = 0; a batch of one gives 1/2; kappa 0 gives 1/2.
    want = [_sigmoid(-z) for z in _zscores([0.9, 0.2, 0.5])]
    assert torch.allclose(sigmoid_balance(torch.full((3,), 0.4), other), _t(want), atol=1e-6)
    assert torch.allclose(sigmoid_balance(_t([0.9]), _t([0.1])), _t([0.5]))
    assert torch.allclose(sigmoid_balance(conf, other, kappa=0.0), torch.full((3,), 0.5))
    leaf = conf.clone().requires_grad_()
    assert not sigmoid_balance(leaf, other).requires_grad


# -- MMT-ARD recipes ---------------------------------------------------------------------------------------------


def test_release_loss_matches_hand():
    t_robust, s_adv = T_LOGITS, S_LOGITS
    t_clean, s_clean = [[0.5, -0.5, 2.0], [1.0, 1.0, 0.0]], [[0.0, 1.0, 0.0], [2.0, -1.0, 0.5]]
    c_robust, c_clean = [0.3, 0.25], [0.28, 0.31]
    l_robust = [_kl(t, s) for t, s in zip(t_robust, s_adv)]
    l_clean = [_kl(t, s) for t, s in zip(t_clean, s_clean)]
    k = 3
    want = sum(50 * cr * lr + 5 * cc * lc for cr, lr, cc, lc in zip(c_robust, l_robust, c_clean, l_clean)) / 2 / k

    elem_robust = kl_elementwise(_t(t_robust), _t(s_adv))
    elem_clean = kl_elementwise(_t(t_clean), _t(s_clean))
    loss, terms = mmt_ard_release_loss(elem_robust, elem_clean, _t(c_robust), _t(c_clean))
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert terms["loss_robust"].item() == pytest.approx(sum(l_robust) / 2, rel=1e-6)
    assert terms["loss_clean"].item() == pytest.approx(sum(l_clean) / 2, rel=1e-6)
    assert terms["conf_robust"].item() == pytest.approx(0.275, rel=1e-6)
    assert terms["conf_clean"].item() == pytest.approx(0.295, rel=1e-6)


def test_release_loss_gradient_reaches_only_the_student():
    torch.manual_seed(1)
    teacher, student = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    conf = torch.rand(3, requires_grad=True)
    elem = kl_elementwise(teacher, student)
    loss, terms = mmt_ard_release_loss(elem, elem, conf, conf)
    loss.backward()
    assert student.grad is not None and teacher.grad is None and conf.grad is None
    assert all(not v.requires_grad for v in terms.values())


def _paper_inputs():
    return _t([0.4, 1.2]), _t([0.9, 0.3]), _t([0.2, 0.6]), _t([0.7, 0.5])


def test_paper_loss_matches_hand():
    l_r, l_c, c_r, c_c = _paper_inputs()
    lam_r, lam_c, kappa = 2.0, 0.5, 1.5
    # With B = 2 the z-scores are -1 and +1 whatever the spread.
    b = [_sigmoid(kappa * (-1 - 1)), _sigmoid(kappa * (1 + 1))]
    want = sum(lam_r * b[i] * c_r[i].item() * l_r[i].item() + lam_c * (1 - b[i]) * c_c[i].item() * l_c[i].item()
               for i in range(2)) / 2
    loss, terms = mmt_ard_paper_loss(l_r, l_c, c_r, c_c, lambda_r=lam_r, lambda_c=lam_c, kappa=kappa)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert terms["balance"].item() == pytest.approx(sum(b) / 2, rel=1e-6)
    assert terms["loss_robust"].item() == pytest.approx(0.8, rel=1e-6)
    assert terms["loss_clean"].item() == pytest.approx(0.6, rel=1e-6)
    assert terms["conf_robust"].item() == pytest.approx(0.4, rel=1e-6)
    assert terms["conf_clean"].item() == pytest.approx(0.6, rel=1e-6)


def test_paper_loss_ablation_switches():
    l_r, l_c, c_r, c_c = _paper_inputs()
    b = [_sigmoid(-2.0), _sigmoid(2.0)]
    # confidence off: a = 1, balance still from the confidences
    loss, _ = mmt_ard_paper_loss(l_r, l_c, c_r, c_c, use_confidence=False)
    want = sum(b[i] * l_r[i].item() + (1 - b[i]) * l_c[i].item() for i in range(2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    # balance off: both streams at 1/2
    loss, terms = mmt_ard_paper_loss(l_r, l_c, c_r, c_c, use_balance=False)
    want = sum(0.5 * (c_r[i].item() * l_r[i].item() + c_c[i].item() * l_c[i].item()) for i in range(2)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert terms["balance"].item() == 0.5
    # clean off: robust term alone with b = 1; with confidence off too it is ARD
    loss, _ = mmt_ard_paper_loss(l_r, None, c_r, None, use_clean=False)
    assert loss.item() == pytest.approx((0.2 * 0.4 + 0.6 * 1.2) / 2, rel=1e-6)
    loss, terms = mmt_ard_paper_loss(l_r, l_c, c_r, c_c, use_clean=False, use_confidence=False)
    assert torch.allclose(loss, ard_loss(l_r))
    assert ard_loss(l_r).item() == pytest.approx(0.8, rel=1e-6)
    assert terms["balance"].item() == 1.0
    # robust off: clean term alone with 1 - b = 1
    loss, terms = mmt_ard_paper_loss(None, l_c, None, c_c, use_robust=False)
    assert loss.item() == pytest.approx((0.7 * 0.9 + 0.5 * 0.3) / 2, rel=1e-6)
    assert terms["balance"].item() == 0.0
    with pytest.raises(ValueError):
        mmt_ard_paper_loss(l_r, l_c, c_r, c_c, use_clean=False, use_robust=False)
    with pytest.raises(ValueError):
        mmt_ard_paper_loss(l_r, None, c_r, c_c)
    with pytest.raises(ValueError):
        mmt_ard_paper_loss(l_r, l_c, None, c_c, use_confidence=False)  # the balance still needs c_R


def test_paper_loss_gradient_reaches_only_the_student():
    torch.manual_seed(2)
    t_adv, t_clean = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    s_adv, s_clean = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3])
    c_r = confidence("probability", logits=t_adv, labels=labels)
    c_c = confidence("probability", logits=t_clean, labels=labels)
    loss, terms = mmt_ard_paper_loss(kl_per_sample(t_adv, s_adv), kl_per_sample(t_clean, s_clean), c_r, c_c)
    loss.backward()
    assert s_adv.grad is not None and s_clean.grad is not None
    assert t_adv.grad is None and t_clean.grad is None
    assert all(not v.requires_grad for v in terms.values())


# -- baselines ---------------------------------------------------------------------------------------------------


def test_fare_loss_matches_hand_and_detaches_the_original():
    student = _t([[1.0, 2.0], [0.0, 0.0]]).requires_grad_()
    orig = _t([[0.0, 0.0], [3.0, 4.0]]).requires_grad_()
    loss = fare_loss(student, orig)
    assert loss.item() == pytest.approx((1 + 4 + 9 + 16) / 2)
    loss.backward()
    assert torch.allclose(student.grad, _t([[1.0, 2.0], [-3.0, -4.0]]))  # 2 (s - o) / B
    assert orig.grad is None
    assert fare_loss(student.bfloat16(), orig.bfloat16()).dtype == torch.float32


def test_pmg_aft_loss_matches_hand_and_keeps_clean_term_attached():
    s_adv, s_clean, o_adv = S_LOGITS, [[0.5, 0.5, 2.0], [1.0, 0.0, 0.0]], T_LOGITS
    labels = [1, 0]
    alpha, beta = 0.7, 1.3
    ce = sum(_ce(r, y) for r, y in zip(s_adv, labels)) / 2
    kl_orig = sum(_kl(o, s) for o, s in zip(o_adv, s_adv)) / 2
    kl_clean = sum(_kl(c, s) for c, s in zip(s_clean, s_adv)) / 2

    adv = _t(s_adv).requires_grad_()
    clean = _t(s_clean).requires_grad_()
    orig = _t(o_adv).requires_grad_()
    loss, terms = pmg_aft_loss(adv, clean, orig, torch.tensor(labels), alpha=alpha, beta=beta)
    assert loss.item() == pytest.approx(ce + alpha * kl_orig + beta * kl_clean, rel=1e-6)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["kl_orig"].item() == pytest.approx(kl_orig, rel=1e-6)
    assert terms["kl_clean"].item() == pytest.approx(kl_clean, rel=1e-6)
    loss.backward()
    assert adv.grad is not None and clean.grad is not None and orig.grad is None
    assert clean.grad.abs().sum() > 0


# -- MTARD -------------------------------------------------------------------------------------------------------


TR_ADV = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]  # flatter than the clean teacher: larger entropy
TC_NAT = [[6.0, 0.0, 0.0], [0.0, 5.0, 0.0]]
S_ADV = [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
S_NAT = [[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]]


def _mtard_loss(balancer):
    return balancer.loss(_t(TR_ADV), _t(S_ADV), _t(TC_NAT), _t(S_NAT))


def test_mtard_loss_softens_only_the_teachers():
    balancer = MtardBalancer(tau_adv=2.0, tau_nat=3.0, w_adv=0.3)
    loss, terms = _mtard_loss(balancer)
    l_adv = sum(_kl(t, s, 2.0, 1.0) for t, s in zip(TR_ADV, S_ADV)) / 2
    l_nat = sum(_kl(t, s, 3.0, 1.0) for t, s in zip(TC_NAT, S_NAT)) / 2
    assert loss.item() == pytest.approx(0.3 * l_adv + 0.7 * l_nat, rel=1e-6)
    assert terms["loss_adv"].item() == pytest.approx(l_adv, rel=1e-6)
    assert terms["loss_nat"].item() == pytest.approx(l_nat, rel=1e-6)
    assert terms["entropy_adv"].item() == pytest.approx(_neg_entropy(TR_ADV, 2.0), rel=1e-6)
    assert terms["entropy_nat"].item() == pytest.approx(_neg_entropy(TC_NAT, 3.0), rel=1e-6)
    assert terms["w_nat"].item() == pytest.approx(0.7)


def test_mtard_loss_gradient_reaches_only_the_student():
    tr, tc = _t(TR_ADV).requires_grad_(), _t(TC_NAT).requires_grad_()
    sa, sn = _t(S_ADV).requires_grad_(), _t(S_NAT).requires_grad_()
    loss, _ = MtardBalancer().loss(tr, sa, tc, sn)
    loss.backward()
    assert tr.grad is None and tc.grad is None and sa.grad is not None and sn.grad is not None


def test_mtard_updates_match_hand():
    balancer = MtardBalancer(tau_adv=2.0, tau_nat=2.0)
    _, terms = _mtard_loss(balancer)
    h_adv, h_nat = _neg_entropy(TR_ADV, 2.0), _neg_entropy(TC_NAT, 2.0)
    assert h_adv / h_nat > 1  # the robust teacher is the more uncertain: its tau falls, the clean one's rises
    balancer.update(terms)
    assert balancer.tau_adv == pytest.approx(2.0 - 0.001)
    assert balancer.tau_nat == pytest.approx(2.0 + 0.001)
    # First update: L(0) recorded, r_adv = r_nat = 1, target 1/2, weights unchanged.
    assert balancer.loss_adv0 == pytest.approx(terms["loss_adv"].item())
    assert balancer.w_nat == pytest.approx(0.5) and balancer.w_adv == pytest.approx(0.5)

    # Second step with hand-chosen values: the adversarial loss halved, the natural one fell to 0.8.
    l_adv0, l_nat0 = balancer.loss_adv0, balancer.loss_nat0
    balancer.update({"loss_adv": 0.5 * l_adv0, "loss_nat": 0.8 * l_nat0, "entropy_adv": -0.5, "entropy_nat": -1.0})
    r_adv, r_nat = 0.5, 0.8
    want_nat = 0.5 - 0.025 * (0.5 - r_nat / (r_adv + r_nat))
    assert balancer.w_nat == pytest.approx(want_nat, rel=1e-9)
    assert balancer.w_adv == pytest.approx(1 - want_nat, rel=1e-9)
    assert balancer.w_nat > 0.5  # the teacher whose loss fell less gets more weight
    # H_adv / H_nat = 0.5 < 1: tau_adv rises, tau_nat falls.
    assert balancer.tau_adv == pytest.approx(2.0)
    assert balancer.tau_nat == pytest.approx(2.0)


def test_mtard_temperatures_are_clipped_and_equal_entropies_do_not_move():
    balancer = MtardBalancer()  # taus start at the lower clip 1
    values = {"loss_adv": 1.0, "loss_nat": 1.0}
    balancer.update({**values, "entropy_adv": -2.0, "entropy_nat": -1.0})
    assert balancer.tau_adv == 1.0 and balancer.tau_nat == pytest.approx(1.001)
    balancer.update({**values, "entropy_adv": -1.0, "entropy_nat": -1.0})
    assert balancer.tau_adv == 1.0 and balancer.tau_nat == pytest.approx(1.001)
    balancer.update({**values, "entropy_adv": 0.0, "entropy_nat": 0.0})  # two one-hot teachers: no NaN
    assert balancer.tau_nat == pytest.approx(1.001)
    high = MtardBalancer(tau_adv=10.0, tau_nat=10.0)
    high.update({**values, "entropy_adv": -2.0, "entropy_nat": -1.0})
    assert high.tau_nat == 10.0 and high.tau_adv == pytest.approx(9.999)


def test_mtard_state_dict_round_trip():
    balancer = MtardBalancer(tau_adv=1.5, tau_nat=2.0)
    for _ in range(3):
        _, terms = _mtard_loss(balancer)
        balancer.update(terms)
    state = json.loads(json.dumps(balancer.state_dict()))  # plain Python values only
    restored = MtardBalancer()
    restored.load_state_dict(state)
    assert restored.state_dict() == balancer.state_dict()
    update = {"loss_adv": 0.3, "loss_nat": 0.9, "entropy_adv": -0.4, "entropy_nat": -0.2}
    balancer.update(update)
    restored.update(update)
    assert restored.state_dict() == balancer.state_dict()
    fresh = MtardBalancer()
    fresh.load_state_dict(MtardBalancer().state_dict())
    assert fresh.loss_adv0 is None
    with pytest.raises(KeyError):
        fresh.load_state_dict({"tau_adv": 1.0})
