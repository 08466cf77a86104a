"""Every post-training loss and estimator against numbers worked out by hand (in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.align.losses import (
    bradley_terry_loss,
    dpo_loss,
    gae,
    group_advantages,
    kl_k1,
    kl_k3,
    leave_one_out,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprob,
    token_logprobs,
)

t = torch.tensor


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_by_hand():
    # pairs with differences 1 and −0.5: mean of −log σ(1) = 0.313262 and −log σ(−0.5) = 0.974077 → 0.643669
    loss = bradley_terry_loss(t([2.0, 0.0]), t([1.0, 0.5]))
    assert loss.item() == pytest.approx((-math.log(sigmoid(1)) - math.log(sigmoid(-0.5))) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(0.6436693, rel=1e-6)
    # margin 0.5 on the first pair: −log σ(0.5) = 0.474077
    assert bradley_terry_loss(t([2.0]), t([1.0]), margin=0.5).item() == pytest.approx(0.474077, rel=1e-5)
    # centering adds 0.1·mean((r_c + r_r)²) = 0.1·(9 + 0.25)/2 = 0.4625
    centered = bradley_terry_loss(t([2.0, 0.0]), t([1.0, 0.5]), center=0.1)
    assert centered.item() == pytest.approx(0.6436693 + 0.4625, rel=1e-6)


def test_dpo_sigmoid_smoothed_and_ipo_by_hand():
    pc, pr, rc, rr = t([-5.0]), t([-7.0]), t([-6.0]), t([-6.5])
    # h = (−5 + 6) − (−7 + 6.5) = 1.5; β = 0.1 → −log σ(0.15) = 0.620957
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert out.loss.item() == pytest.approx(0.620957, rel=1e-5)
    assert out.rewards_chosen.item() == pytest.approx(0.1) and out.rewards_rejected.item() == pytest.approx(-0.05)
    m = out.metrics()
    assert m["rewards/accuracy"] == 1.0 and m["rewards/margin"] == pytest.approx(0.15)
    # ε = 0.2: 0.8·0.620957 + 0.2·(−log σ(−0.15) = 0.770957) = 0.650957
    smoothed = dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    assert smoothed.loss.item() == pytest.approx(0.650957, rel=1e-5)
    # IPO: (h − 1/(2β))² = (1.5 − 5)² = 12.25
    assert dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo").loss.item() == pytest.approx(12.25)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge?")


def test_kl_estimators_by_hand_and_against_the_exact_kl():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2))  # log(0.5 / 0.25)
    # r = 0.25 / 0.5 = 0.5: (r − 1) − log r = −0.5 + 0.693147 = 0.193147
    assert kl_k3(logp, ref).item() == pytest.approx(0.193147, rel=1e-5)
    # both are unbiased: their mean over samples from π approaches KL(π‖π_ref)
    g = torch.Generator().manual_seed(0)
    p, q = t([0.6, 0.3, 0.1]), t([0.2, 0.5, 0.3])
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    exact = (p * (p / q).log()).sum().item()
    assert kl_k1(p.log()[x], q.log()[x]).mean().item() == pytest.approx(exact, rel=0.02)
    k3 = kl_k3(p.log()[x], q.log()[x])
    assert k3.mean().item() == pytest.approx(exact, rel=0.02) and (k3 >= 0).all()


def test_gae_by_hand_with_padding():
    # one sequence of 3 response tokens then padding; γ = 1, λ = 0.5
    rewards = t([[0.0, 0.0, 1.0, 0.0]])
    values = t([[0.5, 0.4, 0.8, 9.0]])
    mask = t([[1, 1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # δ2 = 1 − 0.8 = 0.2;  δ1 = 0 + 0.8 − 0.4 = 0.4;  δ0 = 0 + 0.4 − 0.5 = −0.1
    # A2 = 0.2;  A1 = 0.4 + 0.5·0.2 = 0.5;  A0 = −0.1 + 0.5·0.5 = 0.15;  padding 0 (its value 9 never leaks)
    torch.testing.assert_close(adv, t([[0.15, 0.5, 0.2, 0.0]]))
    torch.testing.assert_close(ret, t([[0.65, 0.9, 1.0, 0.0]]))
    # λ = 1, γ = 1: A_t = (sum of future rewards) − V_t (Monte Carlo)
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, t([[0.5, 0.6, 0.2, 0.0]]))


def test_clipped_policy_and_value_losses_by_hand():
    # ratios e^0.5 = 1.6487 (A = +1, clipped at 1.2), e^−0.5 = 0.6065 (A = −1: min picks the clipped −0.8)
    logp, old = t([0.5, -0.5, 0.1]), t([0.0, 0.0, 0.0])
    adv, mask = t([1.0, -1.0, 2.0]), t([1, 1, 0])
    loss, frac = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # −min(1.6487, 1.2) = −1.2;  −min(−0.6065, −0.8) = 0.8;  third masked out → mean = (−1.2 + 0.8)/2 = −0.2
    assert loss.item() == pytest.approx(-0.2, rel=1e-6)
    assert frac.item() == pytest.approx(1.0)  # both unmasked tokens clipped
    # value: V = 1.5, V_old = 1.0, R = 2 → clipped V = 1.2: ½·max(0.25, 0.64) = 0.32
    v = ppo_value_loss(t([1.5]), t([1.0]), t([2.0]), t([1]), clip=0.2)
    assert v.item() == pytest.approx(0.32)


def test_group_advantages_and_whitening_by_hand():
    # group (1, 0, 0, 1): mean 0.5, sample std √(1/3) = 0.57735 → ±0.866025
    adv = group_advantages(t([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]]))
    torch.testing.assert_close(adv[0], t([0.866025, -0.866025, -0.866025, 0.866025]), rtol=1e-5, atol=1e-5)
    assert adv[1].abs().max() == 0  # all equal: no signal
    x, mask = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(w**2, mask).item() == pytest.approx(1.0, rel=1e-5)


def test_leave_one_out_baseline_by_hand():
    # (4, 1, 1): 4 − mean(1, 1) = 3, 1 − mean(4, 1) = −1.5 (twice); a prompt's constant offset cancels
    torch.testing.assert_close(leave_one_out(t([[4.0, 1.0, 1.0], [14.0, 11.0, 11.0]])),
                               t([[3.0, -1.5, -1.5], [3.0, -1.5, -1.5]]))  # fmt: skip


def test_token_and_sequence_logprobs_match_a_manual_softmax():
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=11, max_seq_len=8, n_layer=1, d_model=16, n_head=2))
    rows = torch.randint(0, 11, (2, 6))
    masks = t([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    logits = model(rows[:, :-1])
    manual = torch.log_softmax(logits, -1)[0, 3, rows[0, 4]]
    assert token_logprobs(model, rows)[0, 3].item() == pytest.approx(manual.item(), rel=1e-5)
    lp = token_logprobs(model, rows)
    torch.testing.assert_close(sequence_logprob(model, rows, masks), torch.stack([lp[0, 2:].sum(), lp[1, 1:3].sum()]))


def test_masked_token_logprobs_equal_token_logprobs_on_the_mask_and_grpo_stays_finite_off_it():
    from lmforge.align.grpo import GroupBatch, grpo_loss
    from lmforge.align.losses import masked_token_logprobs, token_logprobs
    from lmforge.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, max_seq_len=16, n_layer=1, d_model=16, n_head=2, position="rope"))
    rows = torch.randint(0, 50, (3, 10))
    mask = torch.zeros(3, 9)
    mask[:, 5:] = 1
    mask[2, 8] = 0  # a shorter response
    full, picked = token_logprobs(model, rows, 0.7), masked_token_logprobs(model, rows, mask, 0.7)
    torch.testing.assert_close(picked[mask.bool()], full[mask.bool()])
    assert (picked[~mask.bool()] == 0).all()
    old = torch.where(mask.bool(), full.detach(), torch.full_like(full, -200.0))  # exp(200) overflows fp32
    batch = GroupBatch(rows, mask, torch.tensor([1.0, -1.0, 0.5]), old, old.clone(), {})
    loss, _ = grpo_loss(beta=0.1, clip=0.2, temperature=0.7, loss_type="dr_grpo", max_new_tokens=4)(model, batch)
    assert torch.isfinite(loss)
