"""TRL 1.16 as the oracle (pinned in the dev dependencies): its own trainers' losses (DPOTrainer, RewardTrainer,
GRPOTrainer) on a tiny random HF Llama, against lmforge's on the same weights imported with `from_hf`, on the
very batches TRL's collators built. The loss and a gradient of each must agree: the formula, the masking, the
per-token averaging (IPO), the margin, the loss types' normalisation, the temperature and the KL's ratio
correction are all inside what is compared.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

from lmforge.align.dpo import DPOConfig, dpo_batch_loss
from lmforge.align.grpo import GroupBatch, grpo_loss
from lmforge.align.losses import sequence_logprob, token_logprobs
from lmforge.align.pairs import PairBatch
from lmforge.align.reward import RewardModel, pair_loss
from lmforge.model.hf import from_hf

pytest.importorskip("trl", reason="TRL is a dev dependency (pyproject.toml): pip install -e .[dev]")
from datasets import Dataset  # noqa: E402  (TRL's own dependency)

VOCAB = 64
PROMPTS = ["w1 w2 w3", "w4 w5", "w20 w21 w22 w23", "w30"]
CHOSEN = [" w6 w7", " w8 w9 w10 w11", " w24", " w31 w32 w33 w34 w35"]
REJECTED = [" w12", " w13 w14", " w25 w26 w27", " w36 w37"]  # lengths differ from the chosen: averaging matters


@pytest.fixture(scope="module")
def hf_tokenizer():
    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tk = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


def llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, pad_token_id=0, attn_implementation="eager")  # fmt: skip


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config())
    with torch.no_grad():  # HF starts o_proj etc. near 0 only in some versions: random everywhere, so logits vary
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else None
    return model


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    return torch.allclose(a.detach().float(), b.detach().float(), rtol=rtol, atol=atol)


def args_for(config_cls, tmp_path, **kw):
    return config_cls(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, fp16=False, **kw)


# ---- DPO and IPO ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_losses_and_gradients_equal_trl_dpotrainer(loss_type, hf_tokenizer, tmp_path):
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    policy, reference = tiny_llama(0), tiny_llama(1)
    data = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    args = args_for(TRLDPOConfig, tmp_path, beta=0.3, loss_type=[loss_type], per_device_train_batch_size=4)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data,
                         processing_class=hf_tokenizer)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    ours, our_ref = from_hf(trainer.model), from_hf(reference)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()

    ids, mask = batch["input_ids"], batch["completion_mask"]
    n = len(PROMPTS)
    last = mask.sum(-1) * 0  # the DPO loss does not read the last index
    pairs = PairBatch(ids[:n], mask[:n], last[:n], ids[n:], mask[n:], last[n:])
    with torch.no_grad():
        ref = torch.stack([sequence_logprob(our_ref, pairs.chosen, pairs.chosen_mask),
                           sequence_logprob(our_ref, pairs.rejected, pairs.rejected_mask)], -1)  # fmt: skip
    loss, _ = dpo_batch_loss(DPOConfig(beta=0.3, loss_type=loss_type), None, 64)(ours, (pairs, ref))
    loss.backward()

    assert abs(loss.item() - trl_loss.item()) <= 1e-6 * max(1.0, abs(trl_loss.item())), (loss.item(), trl_loss.item())
    assert close(ours.lm_head.weight.grad, trainer.model.lm_head.weight.grad)
    assert close(ours.blocks[0].attn.wq.weight.grad, trainer.model.model.layers[0].self_attn.q_proj.weight.grad)


def test_ipo_on_summed_log_ratios_is_not_trls_ipo(hf_tokenizer, tmp_path):
    """The old convention (ipo_sum) must differ from TRL's IPO on answers of uneven length, or the test above
    could not tell the two apart."""
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    policy, reference = tiny_llama(0), tiny_llama(1)
    data = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    args = args_for(TRLDPOConfig, tmp_path, beta=0.3, loss_type=["ipo"], per_device_train_batch_size=4)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data,
                         processing_class=hf_tokenizer)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)
        ours, our_ref = from_hf(trainer.model), from_hf(reference)
        ids, mask, n = batch["input_ids"], batch["completion_mask"], len(PROMPTS)
        zero = mask.sum(-1) * 0
        pairs = PairBatch(ids[:n], mask[:n], zero[:n], ids[n:], mask[n:], zero[n:])
        ref = torch.stack([sequence_logprob(our_ref, pairs.chosen, pairs.chosen_mask),
                           sequence_logprob(our_ref, pairs.rejected, pairs.rejected_mask)], -1)  # fmt: skip
        summed, _ = dpo_batch_loss(DPOConfig(beta=0.3, loss_type="ipo_sum"), None, 64)(ours, (pairs, ref))
    assert abs(summed.item() - trl_loss.item()) > 1e-2


# ---- reward model -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_loss_with_margin_and_centering_equals_trl_rewardtrainer(with_margin, hf_tokenizer, tmp_path):
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    torch.manual_seed(0)
    scorer = LlamaForSequenceClassification(llama_config().__class__(**{**llama_config().to_dict(), "num_labels": 1}))
    with torch.no_grad():
        for p in scorer.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else None
    columns = {"chosen": [p + c for p, c in zip(PROMPTS, CHOSEN)],
               "rejected": [p + r for p, r in zip(PROMPTS, REJECTED)]}  # fmt: skip
    if with_margin:
        columns["margin"] = [0.5, 0.0, 1.5, -0.25]
    args = args_for(TRLRewardConfig, tmp_path, per_device_train_batch_size=4, center_rewards_coefficient=0.01)
    trainer = RewardTrainer(model=scorer, args=args, train_dataset=Dataset.from_dict(columns),
                            processing_class=hf_tokenizer)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, dict(batch))
    trl_loss.backward()

    trunk = LlamaForCausalLM(llama_config())
    trunk.model.load_state_dict(trainer.model.model.state_dict())
    ours = RewardModel(from_hf(trunk))
    with torch.no_grad():
        ours.head.weight.copy_(trainer.model.score.weight)
        ours.head.bias.zero_()  # HF's score layer has no bias
    ids, attn, n = batch["input_ids"], batch["attention_mask"], len(PROMPTS)
    last = attn.sum(-1) - 1  # right-padded: the last real token, which HF's sequence classifier pools
    pairs = PairBatch(ids[:n], attn[:n], last[:n], ids[n:], attn[n:], last[n:],
                      margin=batch["margin"] if with_margin else None)  # fmt: skip
    loss, _ = pair_loss(margin=0.0, center=0.01)(ours, pairs)
    loss.backward()

    assert abs(loss.item() - trl_loss.item()) <= 1e-6 * max(1.0, abs(trl_loss.item())), (loss.item(), trl_loss.item())
    assert close(ours.head.weight.grad, trainer.model.score.weight.grad)
    assert close(ours.backbone.blocks[1].ffn.down.weight.grad, trainer.model.model.layers[1].mlp.down_proj.weight.grad)


# ---- GRPO -------------------------------------------------------------------------------------------------


def grpo_inputs(completion_lens: list[int], prompt_len: int = 4, seed: int = 0) -> dict:
    """One group of 4 completions of uneven length after the same prompt, with advantages of both signs and
    old / reference log-probs away from the current policy's, so the clip binds and the KL is not 0."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(completion_lens), max(completion_lens)
    completion = torch.randint(2, VOCAB, (b, t), generator=g)
    mask = (torch.arange(t)[None, :] < torch.tensor(completion_lens)[:, None]).long()
    prompt = torch.randint(2, VOCAB, (1, prompt_len), generator=g).expand(b, -1).clone()
    return {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion * mask,
            "completion_mask": mask, "advantages": torch.tensor([1.2, -0.7, 0.4, -0.9]),
            "num_items_in_batch": mask.sum()}  # fmt: skip


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("kl_ratio_correction", [False, True])
def test_grpo_loss_types_equal_trl_grpotrainer(loss_type, kl_ratio_correction, hf_tokenizer, tmp_path):
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    beta, clip, temperature, max_new = 0.05, 0.2, 0.7, 8
    tiny_llama(0).save_pretrained(tmp_path / "policy")  # GRPOTrainer builds its reference from the policy's path
    hf_tokenizer.save_pretrained(tmp_path / "policy")
    args = args_for(TRLGRPOConfig, tmp_path / "out", beta=beta, epsilon=clip, temperature=temperature,
                    loss_type=loss_type, max_completion_length=max_new, num_generations=4,
                    per_device_train_batch_size=4, use_bias_correction_kl=kl_ratio_correction)  # fmt: skip
    no_reward = lambda completions, **_: [0.0] * len(completions)  # noqa: E731  (never called: no rollouts here)
    prompts = Dataset.from_dict({"prompt": PROMPTS})
    trainer = GRPOTrainer(model=str(tmp_path / "policy"), reward_funcs=no_reward, args=args, train_dataset=prompts,
                          processing_class=hf_tokenizer)  # fmt: skip
    trainer.model.eval()  # TRL's eval mode: no division by gradient-accumulation steps (dropout is 0 either way)
    inputs = grpo_inputs([3, 8, 5, 1])
    ours = from_hf(trainer.model)
    rows = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([torch.zeros_like(inputs["prompt_ids"][:, 1:]), inputs["completion_mask"]], 1).float()
    with torch.no_grad():  # old and reference log-probs: the policy's own, perturbed (both are inputs to the loss)
        current = token_logprobs(ours, rows, temperature)
        g = torch.Generator().manual_seed(1)
        old = current + 0.4 * torch.randn(current.shape, generator=g)
        ref = current + 0.6 * torch.randn(current.shape, generator=g)
    p = inputs["prompt_ids"].shape[1]
    trl_inputs = {**inputs, "old_per_token_logps": old[:, p - 1 :], "ref_per_token_logps": ref[:, p - 1 :]}
    trl_loss = trainer._compute_loss(trainer.model, trl_inputs)
    trl_loss.backward()

    batch = GroupBatch(rows, mask, inputs["advantages"], old, ref, {})
    loss, metrics = grpo_loss(beta, clip, temperature, loss_type, max_new_tokens=max_new,
                              kl_ratio_correction=kl_ratio_correction)(ours, batch)  # fmt: skip
    loss.backward()

    assert abs(loss.item() - trl_loss.item()) <= 1e-6 * max(1.0, abs(trl_loss.item())), (loss.item(), trl_loss.item())
    assert close(ours.lm_head.weight.grad, trainer.model.lm_head.weight.grad)
    assert close(ours.blocks[1].attn.wv.weight.grad, trainer.model.model.layers[1].self_attn.v_proj.weight.grad)
    assert 0 < metrics["clip_fraction"] < 1  # the clip binds on some tokens: the comparison covers both branches
