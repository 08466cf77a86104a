"""Logit parity of `from_hf` / `to_hf` against transformers' GPT-2, Llama, Mistral, Qwen2, Qwen3 and OLMo 2, and
mutations that prove the parity check can fail. Small random HF models (initializer_range=0.2: logits of order
1-10), fp32.

    .venv/bin/pytest tests/model/test_hf_parity.py -q
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import lmforge.model.attention as attention_module
import lmforge.model.positions as positions_module
from lmforge.config import UserError
from lmforge.model import Transformer
from lmforge.model.hf import from_hf
from lmforge.model.hf_export import to_hf

transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max |ours − hf| / max |hf|
VOCAB, D, HEADS, KV_HEADS, LAYERS = 128, 64, 4, 2, 2
GREEDY_STEPS = 20


# ---- helpers ---------------------------------------------------------------------------------------
def logits_of(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


def parity_error(ours, hf, idx: torch.Tensor) -> float:
    """max |logits(ours) − logits(hf)| / max |logits(hf)| on idx; either model may be lmforge's or HF's."""
    reference = logits_of(hf, idx)
    return ((logits_of(ours, idx) - reference).abs().max() / reference.abs().max()).item()


def greedy(model, idx: torch.Tensor, steps: int = GREEDY_STEPS) -> torch.Tensor:
    """Argmax decoding with a full recompute every step (the same loop for lmforge and HF models)."""
    for _ in range(steps):
        idx = torch.cat([idx, logits_of(model, idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def assert_parity(ours, hf, idx: torch.Tensor) -> float:
    err = parity_error(ours, hf, idx)
    assert err <= TOL, f"relative logit error {err:.2e} > {TOL}"
    assert torch.equal(greedy(ours, idx), greedy(hf, idx)), "greedy tokens differ"
    return err


def randomize_(hf) -> None:
    """HF inits norms to 1 and biases to 0; perturb them so a swapped or dropped norm/bias shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.copy_((1.0 if "norm" in name or "ln_" in name else 0.0) + 0.2 * torch.randn_like(p))


def with_cfg(model: Transformer, **changes) -> Transformer:
    """The same weights under a changed config (a mutation, or another attention kernel)."""
    other = Transformer(dataclasses.replace(model.cfg, **changes))
    other.load_state_dict(model.state_dict())
    return other.eval()


def tokens(t: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


def make_gpt2(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=64, initializer_range=0.2)
    cfg |= dict(bos_token_id=None, eos_token_id=None, attn_implementation="sdpa") | kw
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()
    randomize_(hf)
    return hf


def _llama_kwargs(**kw) -> dict:
    cfg = dict(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    cfg |= dict(num_key_value_heads=KV_HEADS, intermediate_size=96, max_position_embeddings=64)
    return cfg | dict(initializer_range=0.2, bos_token_id=None, eos_token_id=None, attn_implementation="sdpa") | kw


def make_llama(**kw):
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_llama_kwargs(**kw))).eval()
    randomize_(hf)
    return hf


def make_mistral(**kw):
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**_llama_kwargs(sliding_window=8, **kw)))
    randomize_(hf)
    return hf.eval()


def make_qwen(family: str, **kw):  # Qwen2, Qwen3 or Olmo2: Llama's config fields
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**_llama_kwargs(**kw))
    hf = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    randomize_(hf)  # biases and the per-head q/k norm gains away from 0 and 1, so a dropped one shows
    return hf


# ---- parity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("act, ffn", [("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu", "gelu")])
def test_gpt2_parity(act, ffn):
    hf = make_gpt2(activation_function=act)
    ours = from_hf(hf)
    assert (ours.cfg.position, ours.cfg.norm, ours.cfg.ffn, ours.cfg.bias) == (
        "learned",
        "layernorm",
        ffn,
        True,
    )
    assert ours.cfg.tie_embeddings and ours.lm_head.weight is ours.tok_emb.weight
    assert_parity(ours, hf, tokens(24))


def test_gpt2_untied_parity():
    hf = make_gpt2(tie_word_embeddings=False)
    ours = from_hf(hf)
    assert not ours.cfg.tie_embeddings
    assert_parity(ours, hf, tokens(24))


LLAMA_CASES = {
    "gqa": ({}, 24),
    "head_dim": ({"head_dim": 8}, 24),  # head_dim ≠ hidden / heads
    "tied_theta": (
        {"tie_word_embeddings": True, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0}},
        24,
    ),
    # scaled RoPE: the trained length is 16 and the sequence 40, so each scaling acts
    "linear": ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, 40),
    # HF's dynamic RoPE keeps the frequencies of the longest input seen (until one shorter than the trained
    # length resets them): parity, then greedy growing from the same length, never feeds it a shorter input.
    "dynamic": (
        {"max_position_embeddings": 16, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
        40,
    ),
    "llama3": (
        {
            "max_position_embeddings": 64,
            "rope_parameters": {
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 10000.0,
            },
        },
        40,
    ),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_parity(case):
    kw, t = LLAMA_CASES[case]
    hf = make_llama(**kw)
    ours = from_hf(hf)
    assert (ours.cfg.n_head, ours.cfg.n_kv_head) == (HEADS, KV_HEADS)
    idx = tokens(t)
    assert_parity(ours, hf, idx)
    if ours.cfg.rope_scaling is not None:
        assert ours.cfg.rope_scaling == case
        assert parity_error(with_cfg(ours, rope_scaling=None), hf, idx) > TOL, "the scaling did not act"


def test_llama_with_biases_parity():
    hf = make_llama(attention_bias=True, mlp_bias=True)
    ours = from_hf(hf)
    assert ours.cfg.bias
    assert_parity(ours, hf, tokens(24))


@pytest.mark.parametrize("hf_attention", ["sdpa", "eager"])
@pytest.mark.parametrize("ours_attention", ["sdpa", "sliding_window", "naive"])
def test_mistral_parity(hf_attention, ours_attention):
    """Window 8 over 24 tokens; HF applies the window with both its sdpa and eager masks (masking_utils:
    kv_idx > q_idx − sliding_window, the same band as ours: q − k < window)."""
    hf = make_mistral(attn_implementation=hf_attention)
    ours = with_cfg(from_hf(hf), attention=ours_attention)
    assert ours.cfg.window == 8
    idx = tokens(24)
    assert_parity(ours, hf, idx)
    assert parity_error(with_cfg(ours, window=None, attention="sdpa"), hf, idx) > TOL, "the window did not act"


@pytest.mark.parametrize("kw", [{}, {"head_dim": 8, "tie_word_embeddings": True}], ids=["gqa", "head_dim_tied"])
def test_qwen2_parity(kw):
    """Qwen2: biases on q, k and v only (Qwen2Attention hard-codes them; o_proj and the MLP have none)."""
    hf = make_qwen("Qwen2", **kw)
    ours, idx = from_hf(hf), tokens(24)
    assert ours.cfg.qkv_bias and not ours.cfg.bias and ours.blocks[0].attn.wo.bias is None
    assert_parity(ours, hf, idx)
    with torch.no_grad():
        ours.blocks[0].attn.wk.bias.zero_()
    assert parity_error(ours, hf, idx) > TOL, "the k bias did not act"


@pytest.mark.parametrize("kw", [{}, {"head_dim": 32, "tie_word_embeddings": True}], ids=["gqa", "head_dim_tied"])
def test_qwen3_parity(kw):
    """Qwen3: RMSNorm of each head's q and k over head_dim (one gain per channel), before RoPE."""
    hf = make_qwen("Qwen3", **kw)
    ours, idx = from_hf(hf), tokens(24)
    assert ours.cfg.qk_norm and not ours.cfg.bias and not ours.cfg.qkv_bias
    assert ours.cfg.param_counts()["total"] == sum(p.numel() for p in ours.parameters())
    assert_parity(ours, hf, idx)
    with torch.no_grad():
        ours.blocks[1].attn.q_norm.weight.fill_(1.0)
    assert parity_error(ours, hf, idx) > TOL, "the q norm did not act"


@pytest.mark.parametrize("kw", [{}, {"head_dim": 32, "tie_word_embeddings": True}], ids=["gqa", "head_dim_tied"])
def test_olmo2_parity(kw):
    """OLMo 2: each sublayer's output normed before the residual add (no input norms), and RMSNorm over the whole
    q and k projections (all heads together), before RoPE."""
    hf = make_qwen("Olmo2", **kw)
    ours, idx = from_hf(hf), tokens(24)
    assert (ours.cfg.norm_position, ours.cfg.qk_norm) == ("output", "full")
    assert ours.cfg.param_counts()["total"] == sum(p.numel() for p in ours.parameters())
    assert_parity(ours, hf, idx)
    assert parity_error(with_cfg(ours, norm_position="pre"), hf, idx) > TOL, "the norm placement did not act"
    with torch.no_grad():
        ours.blocks[0].attn.k_norm.weight.fill_(1.0)
    assert parity_error(ours, hf, idx) > TOL, "the k norm did not act"


def test_qwen3_with_attention_bias_is_refused():
    hf = make_qwen("Qwen3", attention_bias=True)
    with pytest.raises(UserError, match="attention_bias=True with mlp_bias=False"):
        from_hf(hf)


@pytest.mark.parametrize(
    "make, kw",
    [(make_gpt2, {}), (make_gpt2, {"tie_word_embeddings": False}), (make_llama, {})]
    + [(make_llama, {"tie_word_embeddings": True}), (make_mistral, {})]
    + [(functools.partial(make_qwen, family), {}) for family in ("Qwen2", "Qwen3", "Olmo2")],
    ids=["gpt2", "gpt2_untied", "llama", "llama_tied", "mistral", "qwen2", "qwen3", "olmo2"],
)
def test_to_hf_round_trip(make, kw):
    hf = make(**kw)
    back = to_hf(from_hf(hf))
    assert type(back) is type(hf)
    assert back.config._attn_implementation == "sdpa"
    idx = tokens(24)
    assert parity_error(back, hf, idx) <= TOL
    assert torch.equal(greedy(back, idx), greedy(hf, idx))


def test_to_hf_round_trip_scaled_rope():
    hf = make_llama(**LLAMA_CASES["llama3"][0])
    back = to_hf(from_hf(hf))
    assert back.config.rope_parameters["rope_type"] == "llama3"
    assert parity_error(back, hf, tokens(40)) <= TOL


def test_from_hf_dtype():
    ours = from_hf(make_llama(), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert ours.rope.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32
    assert to_hf(ours).model.embed_tokens.weight.dtype == torch.bfloat16


# ---- mutations: each must make the same parity check fail ------------------------------------------
def test_mutation_exact_gelu_fails():
    hf = make_gpt2()  # gelu_new: the tanh approximation
    # |gelu − gelu_tanh| peaks (5e-4) near x = −2.7, where gelu itself is small: put the pre-activations there
    # and scale the MLP output up. With plain init the mutation moves logits by only ~1.1e-4 relative.
    with torch.no_grad():
        for block in hf.transformer.h:
            block.mlp.c_fc.weight.mul_(0.3)
            block.mlp.c_fc.bias.fill_(-2.7)
            block.mlp.c_proj.weight.mul_(10.0)
    ours, idx = from_hf(hf), tokens(24)
    assert parity_error(ours, hf, idx) <= TOL
    assert parity_error(with_cfg(ours, ffn="gelu"), hf, idx) > TOL


def test_mutation_norm_eps_fails():
    hf = make_llama(rms_norm_eps=1e-6)
    with torch.no_grad():  # small-variance hidden states (rms ≈ 0.01), where eps 1e-2 vs 1e-6 matters
        hf.model.embed_tokens.weight.mul_(0.05)
    ours, idx = from_hf(hf), tokens(24)
    assert ours.cfg.norm_eps == 1e-6
    assert parity_error(ours, hf, idx) <= TOL
    assert parity_error(with_cfg(ours, norm_eps=1e-2), hf, idx) > TOL


def apply_rope_interleaved(x, cos, sin):
    """Meta's original pairing (2i, 2i+1) instead of HF's half split (i, i + d/2): same frequencies."""
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)
    xf = x.float()
    rotated = torch.stack([-xf[..., 1::2], xf[..., ::2]], dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)


def test_mutation_interleaved_rope_fails(monkeypatch):
    hf = make_llama()
    ours, idx = from_hf(hf), tokens(24)
    assert parity_error(ours, hf, idx) <= TOL
    # attention.py calls the name it imported; patch both so the mutation holds whichever way it is looked up
    monkeypatch.setattr(attention_module, "apply_rope", apply_rope_interleaved)
    monkeypatch.setattr(positions_module, "apply_rope", apply_rope_interleaved)
    assert parity_error(ours, hf, idx) > TOL


@pytest.mark.parametrize("delta", [-1, 1])
@pytest.mark.parametrize("ours_attention", ["sdpa", "sliding_window"])
def test_mutation_window_off_by_one_fails(delta, ours_attention):
    hf = make_mistral()
    ours, idx = with_cfg(from_hf(hf), attention=ours_attention), tokens(24)
    assert parity_error(ours, hf, idx) <= TOL
    assert parity_error(with_cfg(ours, window=ours.cfg.window + delta), hf, idx) > TOL
