"""Reward model and DPO: steps move exactly the parameters that get gradients (and never the reference), the
DPO loss starts at log 2, and end-to-end runs write run folders the next stage can load."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lmforge.align.dpo import DPOConfig, dpo_batch_loss, reference_logprobs
from lmforge.align.lora import LoRAConfig, apply_lora
from lmforge.align.pairs import collate, load_pairs
from lmforge.align.reward import RewardModel, pair_loss
from lmforge.config import load_config


def load_base(base):
    from lmforge.infer.loading import load_for_inference

    return load_for_inference(base)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_reward_step_changes_exactly_the_parameters_with_gradients(base_run):
    _, base, _, pairs_path = base_run
    backbone, tok = load_base(base)
    model = RewardModel(backbone).train()
    pairs = load_pairs(pairs_path)[:8]
    before = snapshot(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    loss, metrics = pair_loss(0.0, 0.0)(model, collate(tok, pairs, 32))
    loss.backward()
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "head.weight" in nonzero and changed == nonzero
    assert 0 <= metrics["accuracy"] <= 1


def test_a_margin_column_is_each_pairs_own_margin_in_the_reward_loss(base_run, tmp_path):
    import json

    import torch.nn.functional as F

    from lmforge.config import UserError

    _, base, _, pairs_path = base_run
    backbone, tok = load_base(base)
    model = RewardModel(backbone).eval()
    pairs = load_pairs(pairs_path)[:4]
    path = tmp_path / "margins.jsonl"
    path.write_text("".join(json.dumps(p | ({"margin": 2.0 * i} if i else {})) + "\n" for i, p in enumerate(pairs)))
    read = load_pairs(path)
    assert [p.get("margin") for p in read] == [None, 2.0, 4.0, 6.0]
    batch = collate(tok, read, 32)
    with torch.no_grad():
        r_c, r_r = model(batch.chosen, batch.chosen_last), model(batch.rejected, batch.rejected_last)
        loss, _ = pair_loss(0.5, 0.0)(model, batch)  # the fixed margin adds to each pair's own
    expected = -F.logsigmoid(r_c - r_r - torch.tensor([0.5, 2.5, 4.5, 6.5])).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    path.write_text(json.dumps(pairs[0] | {"margin": "big"}) + "\n")
    with pytest.raises(UserError, match='"margin" must be a number'):
        load_pairs(path)


def test_dpo_starts_at_log2_and_a_lora_step_leaves_the_reference_bit_identical(base_run):
    _, base, _, pairs_path = base_run
    policy, tok = load_base(base)
    pairs = load_pairs(pairs_path)[:8]
    ref = reference_logprobs(policy, tok, pairs, 32)
    cfg = DPOConfig(beta=0.1)
    loss_fn = dpo_batch_loss(cfg, tok, 32)
    loss, metrics = loss_fn(policy, (collate(tok, pairs, 32), ref))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-5)  # policy = reference: h = 0
    assert metrics["rewards/margin"] == pytest.approx(0.0, abs=1e-6)

    apply_lora(policy, LoRAConfig(rank=2, alpha=4, targets=("wq", "wv")))
    with torch.no_grad():  # nonzero B, so both A and B receive gradients
        for n, p in policy.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)
    policy.train()
    before = snapshot(policy)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loss, _ = loss_fn(policy, (collate(tok, pairs, 32), ref))
    loss.backward()
    opt.step()
    for n, p in policy.named_parameters():
        got_grad = p.grad is not None and p.grad.abs().sum() > 0
        assert got_grad == (not torch.equal(p, before[n])), n
        if not n.endswith(("lora_A", "lora_B")):
            assert torch.equal(p, before[n]), n  # the frozen reference weights
    assert any(n.endswith("lora_A") for n in before)


def test_ipo_is_on_per_token_averaged_log_ratios_and_ipo_sum_on_summed_ones(base_run):
    """IPO as its authors and TRL compute it: ((Δ_c / n_c) − (Δ_r / n_r) − 1/(2β))², Δ the summed log-ratio to
    the reference and n the answer's tokens; `ipo_sum` keeps the summed form. Recomputed by hand from per-token
    log-probs of a policy that is not the reference."""
    from lmforge.align.losses import token_logprobs

    _, base, _, pairs_path = base_run
    policy, tok = load_base(base)
    pairs = [p | {"rejected": p["rejected"] * (1 + i % 3)} for i, p in enumerate(load_pairs(pairs_path)[:8])]
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = reference_logprobs(reference, tok, pairs, 32)
    b = collate(tok, pairs, 32)
    with torch.no_grad():

        def delta(rows, mask):  # summed log-ratio to the reference, and the answer's token count
            m = mask[:, 1:].float()
            return ((token_logprobs(policy, rows) - token_logprobs(reference, rows)) * m).sum(-1), m.sum(-1)

        (dc, nc), (dr, nr) = delta(b.chosen, b.chosen_mask), delta(b.rejected, b.rejected_mask)
        beta = 0.1
        expected_avg = ((dc / nc - dr / nr - 1 / (2 * beta)) ** 2).mean()
        expected_sum = ((dc - dr - 1 / (2 * beta)) ** 2).mean()
        got_avg, _ = dpo_batch_loss(DPOConfig(beta=beta, loss_type="ipo"), tok, 32)(policy, (b, ref))
        got_sum, _ = dpo_batch_loss(DPOConfig(beta=beta, loss_type="ipo_sum"), tok, 32)(policy, (b, ref))
    assert got_avg.item() == pytest.approx(expected_avg.item(), rel=1e-5)
    assert got_sum.item() == pytest.approx(expected_sum.item(), rel=1e-5)
    assert not (nc == nr).all() and abs(got_avg.item() - got_sum.item()) > 1e-3


def test_reward_and_dpo_runs_end_to_end(base_run):
    from lmforge.align.dpo import run as dpo_run
    from lmforge.align.reward import RewardConfig, load_reward_model, score
    from lmforge.align.reward import run as reward_run

    root, base, _, pairs_path = base_run
    common = [f"base={base}", f"data={pairs_path}", f"runs_dir={root / 'runs'}", "train.steps=4", "train.batch_size=8",
              "train.warmup_steps=1", "train.eval_every=2", "train.progress=false", "train.precision=fp32"]  # fmt: skip
    rm_dir = reward_run(load_config(RewardConfig, None, [*common, "name=rm"]))
    assert "val_accuracy" in rm_dir.read_metrics()[-1]
    rm, tok = load_reward_model(rm_dir.path)
    assert score(rm, tok, ["What is 2 + 1?"] * 2, ["3", "4"]).shape == (2,)
    # `init` continues from the reward model (trunk and head); with a vanishing lr its scores are the first's
    tiny = ["train.lr=1e-30", "train.min_lr=1e-30"]
    more = reward_run(load_config(RewardConfig, None, [*common, *tiny, "name=rm-more", f"init={rm_dir.path}"]))
    fresh = reward_run(load_config(RewardConfig, None, [*common, *tiny, "name=rm-fresh"]))
    probe = (["What is 2 + 1?"] * 2, ["3", "4"])
    assert torch.allclose(score(load_reward_model(more.path)[0], tok, *probe), score(rm, tok, *probe), atol=1e-5)
    assert not torch.allclose(score(load_reward_model(fresh.path)[0], tok, *probe), score(rm, tok, *probe), atol=1e-3)
    dpo_dir = dpo_run(load_config(DPOConfig, None, [*common, "name=dpo", "beta=0.2"]))
    last = dpo_dir.read_metrics()[-1]
    assert {"rewards/accuracy", "val_rewards/accuracy", "val_rewards/margin"} <= set(last)
    policy, _ = load_base(dpo_dir.path)  # loads like any run
    assert policy is not None


def test_commands_score_and_refuse_bad_input_in_one_line(base_run, capsys):
    from lmforge.cli import main

    root, base, _, pairs = base_run
    args = [f"base={base}", f"data={pairs}", f"runs_dir={root / 'runs'}", "name=rm-cli", "train.steps=1",
            "train.progress=false"]  # fmt: skip
    assert main(["reward", "train", *args]) == 0
    assert main(["reward", "score", str(root / "runs" / "rm-cli"), "--prompt", "What is 1 + 1?", "--response", "2",
                 "--response", "3"]) == 0  # fmt: skip
    scores = [line for line in capsys.readouterr().out.splitlines() if line.endswith(("  2", "  3"))]
    assert len(scores) == 2
    # one run where the other kind is wanted: a language model as the reward model, and the other way round
    assert main(["reward", "train", f"init={base}", *args[1:]]) == 2
    assert "holds a language model, not a reward model" in capsys.readouterr().err
    assert main(["dpo", f"base={root / 'runs' / 'rm-cli'}", f"data={pairs}", f"runs_dir={root / 'runs'}"]) == 2
    assert "holds a reward model (trunk and scalar head), not a language model" in capsys.readouterr().err
    assert main(["dpo", f"base={base}", f"data={root / 'missing.jsonl'}", f"runs_dir={root / 'runs'}"]) == 2
    assert "no preference file" in capsys.readouterr().err
    assert main(["dpo", f"base={base}", f"data={pairs}", f"runs_dir={root / 'runs'}", "beta=-1"]) == 2
    assert "beta must be positive" in capsys.readouterr().err


def test_best_of_n_returns_the_sample_the_reward_model_scores_highest(base_run):
    import lmforge.align.reward as reward_mod
    from lmforge.align.reward import RewardModel, best_of_n
    from lmforge.align.rollout import rollout

    _, base, _, _ = base_run
    policy, tok = load_base(base)
    rm = RewardModel(load_base(base)[0]).eval()
    prompts = ["What is 1 + 2?", "What is 3 + 3?"]
    picks = best_of_n(policy, tok, rm, prompts, n=4, max_new_tokens=3, seed=5)
    out = rollout(policy, tok, [[{"role": "user", "content": p}] for p in prompts], n=4, max_new_tokens=3, seed=5)
    scores = reward_mod.score(rm, tok, [prompts[i] for i in out.prompt_index], out.texts).view(2, 4)
    assert picks == [out.texts[i * 4 + int(scores[i].argmax())] for i in range(2)]


def test_a_bug_in_a_stage_keeps_its_traceback(base_run, monkeypatch):
    import lmforge.align.dpo as dpo
    from lmforge.cli import main

    root, base, _, pairs = base_run

    def broken(cfg):
        raise ValueError("shape '[4, -1]' is invalid for input of size 6")  # our mistake, not the user's

    monkeypatch.setattr(dpo, "run", broken)
    with pytest.raises(ValueError, match="is invalid for input"):
        main(["dpo", f"base={base}", f"data={pairs}", f"runs_dir={root / 'runs'}"])


def test_holding_out_every_prompt_is_one_line(base_run, tmp_path, capsys):
    import json

    from lmforge.cli import main

    _, base, _, _ = base_run
    one_prompt = tmp_path / "one.jsonl"
    one_prompt.write_text("".join(json.dumps({"prompt": "What is 1 + 1?", "chosen": "2", "rejected": c}) + "\n"
                                  for c in "345"))  # fmt: skip
    common = [f"base={base}", f"data={one_prompt}", f"runs_dir={tmp_path / 'runs'}"]
    for argv, message in [
        (["dpo", *common, "val_fraction=0.6"], "val_fraction=0.6 holds out all 1 prompts of the pairs: lower"),
        (["reward", "train", *common, "val_fraction=1"], "val_fraction is the share of prompts held out, in [0, 1)"),
        (["dpo", *common, "val_fraction=-0.5"], "val_fraction is the share of prompts held out, in [0, 1)"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)


def test_a_config_built_in_python_is_validated_as_one_line(base_run):
    from lmforge.align.dpo import run
    from lmforge.config import ConfigError

    _, base, _, pairs = base_run
    with pytest.raises(ConfigError, match="beta must be positive"):
        run(DPOConfig(base=str(base), data=str(pairs), beta=-1.0))
