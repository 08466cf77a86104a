"""Rollouts, GRPO and PPO: reproducible samples, losses that start where the theory says, steps that move exactly
the parameters with gradients and never the reference, adaptive β by hand, and short end-to-end runs."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.align.grpo import GroupBatch, grpo_loss
from lmforge.align.losses import group_advantages, token_logprobs
from lmforge.align.ppo import AdaptiveKL, PolicyWithValue, PPOBatch, critic_from, ppo_loss
from lmforge.align.rollout import rollout
from lmforge.config import load_config

PROMPTS = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "What is 1 + 1?"}]]


def load_base(base):
    from lmforge.infer.loading import load_for_inference

    return load_for_inference(base)


def test_rollout_is_reproducible_and_masks_the_response(base_run):
    _, base, _, _ = base_run
    policy, tok = load_base(base)
    a = rollout(policy, tok, PROMPTS, n=3, temperature=1.0, max_new_tokens=5, seed=7)
    b = rollout(policy, tok, PROMPTS, n=3, temperature=1.0, max_new_tokens=5, seed=7)
    assert len(a) == 6 and a.prompt_index == [0, 0, 0, 1, 1, 1]
    assert torch.equal(a.rows, b.rows) and a.texts == b.texts
    prompt_len = len(tok.render_chat(PROMPTS[0], add_generation_prompt=True)[0])
    assert a.mask[0, :prompt_len].sum() == 0 and 1 <= a.mask[0].sum() <= 5
    assert a.last[0] == prompt_len + a.mask[0].sum() - 1


def step_and_check(model, loss, frozen: dict[str, torch.Tensor]):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        got_grad = p.grad is not None and p.grad.abs().sum() > 0
        assert got_grad == (not torch.equal(p, before[n])), n
    for n, p in frozen.items():
        assert torch.equal(p, frozen[n]), n


def test_grpo_starts_at_minus_mean_advantage_and_steps_cleanly(base_run):
    _, base, _, _ = base_run
    policy, tok = load_base(base)
    reference = copy.deepcopy(policy).requires_grad_(False)
    ref_weights = {n: p.clone() for n, p in reference.named_parameters()}
    out = rollout(policy, tok, PROMPTS, n=4, temperature=1.0, max_new_tokens=4, seed=1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards.view(2, 4)).view(-1)
    with torch.no_grad():
        old = token_logprobs(policy, out.rows)
        ref = token_logprobs(reference, out.rows)
    batch = GroupBatch(out.rows, out.mask[:, 1:], adv, old, ref, {})
    policy.train()
    loss, metrics = grpo_loss(beta=0.04, clip=0.2)(policy, batch)
    # ratio 1 and π = π_ref at the start: the loss is −mean of the advantages (0 for normalised groups), KL 0
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6) and metrics["kl"] == pytest.approx(0, abs=1e-7)
    step_and_check(policy, loss, ref_weights)
    assert all(torch.equal(p, ref_weights[n]) for n, p in reference.named_parameters())


def test_rl_scores_tokens_at_the_sampling_temperature(base_run):
    """Sampled at T = 0.6, a rollout's tokens are scored under softmax(logits / T) — the distribution the sampler
    drew them from (`processed_probs`) — by GRPO, PPO and the reference; scoring at T = 1 (the old convention)
    is another policy: the ratio on fresh rollouts is no longer 1."""
    from lmforge.infer.sampling import SamplingParams, processed_probs

    _, base, _, _ = base_run
    policy, tok = load_base(base)
    T = 0.6
    out = rollout(policy, tok, PROMPTS, n=4, temperature=T, max_new_tokens=4, seed=3)
    mask = out.mask[:, 1:].bool()
    with torch.no_grad():
        raw = policy(out.rows[:, :-1]).float()
        B, L, V = raw.shape
        probs = processed_probs(raw.reshape(-1, V), [SamplingParams(temperature=T)] * (B * L)).view(B, L, V)
        sampler = torch.gather(probs, 2, out.rows[:, 1:, None]).squeeze(2).log()
        at_t, at_1 = token_logprobs(policy, out.rows, T), token_logprobs(policy, out.rows)
    torch.testing.assert_close(at_t[mask], sampler[mask], atol=1e-5, rtol=0)
    assert (at_1[mask] - sampler[mask]).abs().max() > 1e-2
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0]).view(2, 4)).view(-1) + 0.5
    batch = GroupBatch(out.rows, mask.float(), adv, at_t, at_t, {})
    loss, metrics = grpo_loss(beta=0.04, clip=0.2, temperature=T)(policy, batch)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-5) and metrics["kl"] == pytest.approx(0, abs=1e-6)
    _, old_convention = grpo_loss(beta=0.04, clip=0.2)(policy, batch)  # scored at T = 1 against π_ref at T
    assert old_convention["kl"] > 1e-4  # a KL between a policy and itself that is not 0
    model = PolicyWithValue(policy, None)
    ppo = PPOBatch(out.rows, mask.float(), at_t, torch.zeros(B, L), adv[:, None].expand(B, L), torch.zeros(B, L), {})
    _, m = ppo_loss(clip=0.2, value_clip=0.2, vf_coef=0.5, temperature=T)(model, ppo)
    assert m["clip_fraction"] == 0 and m["policy_loss"] == pytest.approx(-adv.mean().item(), abs=1e-5)


def test_grpo_loss_types_scale_rewards_and_the_binding_clip_by_hand(base_run):
    """With β = 0 and π_old = π, every token's term is its response's advantage: grpo = −mean_i Â_i, dapo =
    −Σ n_i·Â_i / Σ n_i, dr_grpo = −Σ n_i·Â_i / (B · max_new_tokens); the clip fraction counts only the tokens where
    the clip binds (ρ = e^0.5 > 1 + ε with Â > 0; ρ < 1 − ε with Â < 0)."""
    _, base, _, _ = base_run
    policy, tok = load_base(base)
    out = rollout(policy, tok, PROMPTS, n=4, temperature=1.0, max_new_tokens=6, seed=5)
    mask = out.mask[:, 1:].float()
    keep = torch.arange(8) % 5 + 1  # responses of uneven length (1..5 tokens), so the loss types differ
    mask = mask * (mask.cumsum(1) <= keep[:, None]).float()
    n = mask.sum(1)
    assert len(set(n.tolist())) > 1
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5]).view(2, 4)
    adv = group_advantages(rewards).view(-1)
    with torch.no_grad():
        logp = token_logprobs(policy, out.rows)
    batch = GroupBatch(out.rows, mask, adv, logp, None, {})
    expected = {"grpo": -adv.mean(), "dapo": -(n * adv).sum() / n.sum(), "dr_grpo": -(n * adv).sum() / (8 * 6)}
    for loss_type, value in expected.items():
        loss, _ = grpo_loss(beta=0.0, clip=0.2, loss_type=loss_type, max_new_tokens=6)(policy, batch)
        assert loss.item() == pytest.approx(value.item(), abs=1e-5), loss_type
    raised = GroupBatch(out.rows, mask, adv, logp - 0.5, None, {})  # ρ = e^0.5 on every token
    _, metrics = grpo_loss(beta=0.0, clip=0.2)(policy, raised)
    assert metrics["clip_fraction"] == pytest.approx(((adv > 0).float() * n).sum().item() / n.sum().item())
    r = rewards
    torch.testing.assert_close(group_advantages(r, scale="none"), r - r.mean(-1, keepdim=True))
    torch.testing.assert_close(group_advantages(r, scale="batch"), (r - r.mean(-1, keepdim=True)) / (r.std() + 1e-6))
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(beta=0.0, clip=0.2, loss_type="sum")


def test_adaptive_kl_by_hand():
    c = AdaptiveKL(0.1, target=6.0, horizon=10_000)
    c.update(kl=9.0, n=100)  # error clip(9/6 − 1) = 0.2 → β·(1 + 0.2·100/10000) = 0.1002
    assert c.beta == pytest.approx(0.1002)
    c.update(kl=5.4, n=1000)  # error −0.1 → ·(1 − 0.01)
    assert c.beta == pytest.approx(0.1002 * 0.99)
    fixed = AdaptiveKL(0.1, target=None, horizon=10_000)
    fixed.update(50.0, 100)
    assert fixed.beta == 0.1


def test_ppo_step_moves_policy_and_value_head_only_where_gradients_flow(base_run):
    _, base, _, _ = base_run
    policy, tok = load_base(base)
    model = PolicyWithValue(policy).train()
    out = rollout(policy, tok, PROMPTS, n=2, temperature=1.0, max_new_tokens=4, seed=3)
    mask = out.mask[:, 1:].float()
    with torch.no_grad():
        logits, values = model(out.rows)
        old = torch.gather(torch.log_softmax(logits, -1), 2, out.rows[:, 1:, None]).squeeze(2)
    adv = torch.randn_like(old) * mask
    batch = PPOBatch(out.rows, mask, old, values * mask, adv, torch.ones_like(old) * mask, {})
    loss, metrics = ppo_loss(0.2, 0.2, 0.1)(model, batch)
    assert {"clip_fraction", "value_loss", "entropy", "policy_loss"} <= set(metrics)
    assert metrics["clip_fraction"] == 0.0  # ratio is exactly 1 before the first update
    step_and_check(model, loss, {})


def test_ppo_with_a_critic_from_the_reward_model_keeps_value_gradients_off_the_policy(base_run):
    from lmforge.align.reward import RewardModel

    _, base, _, _ = base_run
    policy, tok = load_base(base)
    reward_model = RewardModel(load_base(base)[0]).requires_grad_(False)
    rm_weights = {n: p.clone() for n, p in reward_model.named_parameters()}
    model = PolicyWithValue(policy, critic_from(reward_model)).train()
    out = rollout(policy, tok, PROMPTS, n=2, temperature=1.0, max_new_tokens=4, seed=3)
    mask = out.mask[:, 1:].float()
    with torch.no_grad():
        logits, values = model(out.rows)
        old = torch.gather(torch.log_softmax(logits, -1), 2, out.rows[:, 1:, None]).squeeze(2)
    assert not values.any()  # the critic's head starts at zero: every value is the normalised reward's mean
    zero_adv = torch.zeros_like(old)  # no policy signal: only the value loss has a gradient
    batch = PPOBatch(out.rows, mask, old, values * mask, zero_adv, (values + 1) * mask, {})
    loss, _ = ppo_loss(0.2, 0.2, 0.1)(model, batch)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.policy.parameters())  # value loss stays off it
    assert any(p.grad is not None and p.grad.any() for p in model.critic.parameters())
    assert all(torch.equal(p, rm_weights[n]) for n, p in reward_model.named_parameters())


def test_grpo_and_ppo_runs_end_to_end(base_run):
    from lmforge.align.grpo import GRPOConfig
    from lmforge.align.grpo import run as grpo_run
    from lmforge.align.ppo import PPOConfig
    from lmforge.align.ppo import run as ppo_run
    from lmforge.align.reward import RewardConfig
    from lmforge.align.reward import run as reward_run

    root, base, _, pairs = base_run
    common = [f"base={base}", f"runs_dir={root / 'runs'}", "train.steps=2", "train.warmup_steps=1",
              "train.eval_every=2", "train.progress=false", "train.precision=fp32", "eval_n=8"]  # fmt: skip
    grpo = [*common, "name=grpo", "task=add:digits=1", "n=4", "prompts_per_step=2", "max_new_tokens=3", "beta=0.04"]
    grpo_dir = grpo_run(load_config(GRPOConfig, None, grpo))
    assert {"reward", "kl", "heldout_accuracy"} <= set(grpo_dir.read_metrics()[-1])
    rm_args = [f"base={base}", f"data={pairs}", f"runs_dir={root / 'runs'}", "name=rm-ppo", "train.steps=2",
               "train.progress=false"]  # fmt: skip
    rm = reward_run(load_config(RewardConfig, None, rm_args))
    ppo_dir = ppo_run(load_config(PPOConfig, None, [*common, "name=ppo", f"reward_model={rm.path}",
                                                    "task=add:digits=1", "prompts_per_rollout=4", "minibatch=2",
                                                    "ppo_epochs=1", "max_new_tokens=3", "target_kl=1.0"]))  # fmt: skip
    last = ppo_dir.read_metrics()[-1]
    assert {"reward", "kl", "kl_k3", "entropy", "clip_fraction", "value_loss", "beta", "heldout_accuracy",
            "heldout_rm_score"} <= set(last)  # fmt: skip
    policy, _ = load_base(ppo_dir.path)  # the last checkpoint is the policy alone
    assert policy is not None
    grouped = ppo_run(load_config(PPOConfig, None, [*common, "name=ppo-loo", f"reward_model={rm.path}",
                                                    "task=add:digits=1", "prompts_per_rollout=2",
                                                    "samples_per_prompt=3", "minibatch=3", "ppo_epochs=1",
                                                    "max_new_tokens=3"]))  # fmt: skip
    assert grouped.read_metrics()[-1]["response_len"] > 0  # 2 prompts × 3 samples, in minibatches of 3
    with pytest.raises(ValueError, match="multiple of minibatch"):
        PPOConfig(prompts_per_rollout=2, samples_per_prompt=3, minibatch=4).validate()


def test_an_interrupted_ppo_run_resumes_exactly(base_run, monkeypatch):
    """Weights, optimizer, RNG and the adaptive KL coefficient β (it moves every step towards target_kl)."""
    from lmforge.align.ppo import PPOConfig
    from lmforge.align.ppo import run as ppo_run
    from lmforge.align.reward import RewardConfig
    from lmforge.align.reward import run as reward_run
    from lmforge.train.loop import Trainer

    root, base, _, pairs = base_run
    rm_args = [f"base={base}", f"data={pairs}", f"runs_dir={root / 'runs'}", "name=rm-resume", "train.steps=2",
               "train.progress=false"]  # fmt: skip
    rm = reward_run(load_config(RewardConfig, None, rm_args))

    def cfg(name):
        return load_config(PPOConfig, None, [f"base={base}", f"runs_dir={root / 'runs'}", f"name={name}",
                                             f"reward_model={rm.path}", "task=add:digits=1", "prompts_per_rollout=4",
                                             "minibatch=2", "ppo_epochs=1", "max_new_tokens=3", "eval_n=4",
                                             "train.steps=4", "train.warmup_steps=1", "train.eval_every=100",
                                             "train.checkpoint_every=100", "train.progress=false",
                                             "train.precision=fp32", "train.lr=1e-3", "target_kl=0.01",
                                             "train.log_every=1"])  # fmt: skip

    straight = ppo_run(cfg("ppo-straight"))
    step = Trainer.train_step

    def interrupted(self):  # as if SIGINT arrived during the second step
        out = step(self)
        if self.step == 1:
            self._stop_signal = 2
        return out

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    from lmforge.runs import Stopped

    with pytest.raises(Stopped) as stopped:  # the stage stops there: nothing runs as if it had finished
        ppo_run(cfg("ppo-resumed"))
    from lmforge.train.checkpoint import latest_checkpoint

    # the resumable one, value head included
    assert latest_checkpoint(stopped.value.path / "checkpoints").name == "step_000002"
    monkeypatch.setattr(Trainer, "train_step", step)
    resumed_cfg = cfg("ppo-resumed")
    resumed_cfg.resume = True
    resumed = ppo_run(resumed_cfg)
    a, _ = load_base(straight.path)
    b, _ = load_base(resumed.path)
    sft, _ = load_base(base)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), sft.parameters()))  # it did train
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    betas = [[r["beta"] for r in run.read_metrics() if "beta" in r] for run in (straight, resumed)]
    assert betas[0] == betas[1] and len(set(betas[0])) > 1  # β adapted, and went on from where it was


def test_bad_task_settings_are_one_line_before_any_model_loads(tmp_path, capsys):
    from lmforge.cli import main

    nowhere = [f"base={tmp_path / 'no-base'}", f"runs_dir={tmp_path / 'runs'}"]
    for argv, message in [
        (["grpo", *nowhere, "task=nosuch"], "unknown task 'nosuch'"),
        (["ppo", *nowhere, "task=nosuch"], "unknown task 'nosuch'"),
        (["grpo", *nowhere, "task=add:digits=1", "eval_n=5000"], "eval_n=5000: add:digits=1: cannot draw"),
        (["ppo", *nowhere, "task=add:digits=1", "eval_n=5000"], "eval_n=5000: add:digits=1: cannot draw"),
        (["grpo", *nowhere, "task=add:digits=1", "eval_n=2", "prompts_per_step=500"], "prompts_per_step=500"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)


def test_a_reward_model_with_another_tokenizer_is_refused(base_run, monkeypatch):
    from types import SimpleNamespace

    import lmforge.align.reward as reward_module
    from lmforge.align.ppo import PPOConfig
    from lmforge.align.ppo import run as ppo_run
    from lmforge.config import ConfigError

    root, base, _, _ = base_run
    other = SimpleNamespace(vocab_size=7, fingerprint=lambda: "another vocabulary")
    monkeypatch.setattr(reward_module, "load_reward_model", lambda run: (None, other))
    cfg = load_config(PPOConfig, None, [f"base={base}", "reward_model=runs/other-rm", f"runs_dir={root / 'runs'}",
                                        "task=add:digits=1", "eval_n=2"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"reward_model runs/other-rm: its tokenizer \(7 tokens\) is not the poli"):
        ppo_run(cfg)
