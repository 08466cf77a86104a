"""lmforge's decode kernels and the paths built on them: the GEMV against a float64 matmul, decode attention
against torch SDPA over the same keys gathered by hand (contiguous and paged layouts, GQA, ragged lengths), and
the model's logits and greedy tokens unchanged."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.infer import kernels
from lmforge.infer.fastpath import DecodeLinear, optimize_for_decode
from lmforge.infer.generate import generate
from lmforge.infer.quantize import quantize_int8, quantize_model
from lmforge.model import ModelConfig, Transformer

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="no AVX2 CPU or no C compiler")


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
@pytest.mark.parametrize("out_features, in_features", [(1, 1), (3, 7), (4, 8), (13, 37), (64, 128), (258, 771)])
def test_gemv_matches_torch_for_every_weight_dtype_odd_shapes_and_a_few_rows(out_features, in_features, rows):
    # Odd shapes reach the scalar tails: weight rows past the last block of 4, columns past the last 8, an odd
    # input row after the pairs. The oracle is float64; fp32 sums in another order stay within ~1e-6 relative.
    g = torch.Generator().manual_seed(out_features * 1000 + in_features + rows)
    w = torch.randn(out_features, in_features, generator=g)
    x, bias = torch.randn(rows, in_features, generator=g), torch.randn(out_features, generator=g)

    def close(got, weight, scale=None, bias=None):
        want = x.double() @ weight.double().T
        want = want * scale.double() if scale is not None else want
        want = want + bias.double() if bias is not None else want
        assert got.shape == (rows, out_features)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * in_features**0.5)

    close(kernels.gemv(w, x, bias=bias), w, bias=bias)
    wb = w.bfloat16()
    close(kernels.gemv(wb, x), wb.float())
    q, scale = quantize_int8(w)
    close(kernels.gemv(q, x, scale, bias), q.float(), scale, bias)


@needs_kernels
def test_gemv_rejects_what_it_cannot_read():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.gemv(w.t(), torch.randn(8))  # a transposed view
    with pytest.raises(ValueError, match=r"\[\.\.\., 16\]"):
        kernels.gemv(w, torch.randn(15))
    with pytest.raises(ValueError):
        kernels.gemv(w.double(), torch.randn(16))


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3])
def test_one_plan_reads_several_matrices_side_by_side(rows):
    # q, k, v of a GQA layer: unequal heights (one not a multiple of the kernel's 4-row blocks), a bias on some
    g = torch.Generator().manual_seed(rows)
    parts = [(torch.randn(n, 40, generator=g), None, torch.randn(n, generator=g) if n != 13 else None)
             for n in (24, 13, 13)]  # fmt: skip
    x = torch.randn(rows, 40, generator=g)
    plan = kernels.GemvPlan(parts)
    want = torch.cat([x.double() @ w.double().T + (0 if b is None else b.double()) for w, _, b in parts], -1)
    torch.testing.assert_close(plan(x).double(), want, rtol=1e-5, atol=1e-4)
    assert not plan.stale(parts) and kernels.current_plan(plan, parts) is plan
    moved = [(parts[0][0].clone(), None, parts[0][2]), *parts[1:]]  # new storage (as after .to() or a reload)
    assert plan.stale(moved) and kernels.current_plan(plan, moved) is not plan
    with pytest.raises(ValueError, match="one weight dtype"):
        kernels.GemvPlan([parts[0], (parts[1][0].bfloat16(), None, None)])


def sdpa_reference(q, keys, values, b):
    """Row b's attention by torch SDPA over its keys [T, Hk, D] (gathered by hand), GQA expanded by SDPA."""
    return F.scaled_dot_product_attention(q[b : b + 1], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                          enable_gqa=True)  # fmt: skip


@needs_kernels
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 64), (8, 2, 32), (6, 1, 16)])
def test_decode_attention_reads_a_contiguous_cache_in_place(heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads + head_dim)
    B, slots = 3, 40
    q = torch.randn(B, heads, 1, head_dim, generator=g)
    k, v = (torch.randn(B, kv_heads, slots, head_dim, generator=g) for _ in range(2))  # [B, Hk, T, D]
    lengths = torch.tensor([40, 1, 17])
    out = kernels.decode_attention(q, k, v, lengths, row_offsets=torch.arange(B) * kv_heads * slots * head_dim,
                                   token_stride=head_dim, head_stride=slots * head_dim, n_kv_head=kv_heads)  # fmt: skip
    for b, n in enumerate(lengths.tolist()):
        want = sdpa_reference(q, k[b, :, :n].transpose(0, 1), v[b, :, :n].transpose(0, 1), b)
        torch.testing.assert_close(out[b : b + 1], want, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])
def test_decode_attention_follows_a_block_table(heads, kv_heads):
    g = torch.Generator().manual_seed(heads)
    B, D, bs, blocks_per_row = 3, 32, 4, 5
    q = torch.randn(B, heads, 1, D, generator=g)
    k, v = (torch.randn(B * blocks_per_row * bs, kv_heads, D, generator=g) for _ in range(2))  # [slot, Hk, D]
    tables = torch.randperm(B * blocks_per_row, generator=g).view(B, blocks_per_row)  # blocks anywhere in the pool
    lengths = torch.tensor([20, 1, 9])
    out = kernels.decode_attention(q, k, v, lengths, row_offsets=torch.zeros(B, dtype=torch.long),
                                   token_stride=kv_heads * D, head_stride=D, n_kv_head=kv_heads, tables=tables,
                                   block_size=bs)  # fmt: skip
    for b, n in enumerate(lengths.tolist()):
        slots = torch.tensor([int(tables[b, t // bs]) * bs + t % bs for t in range(n)])
        torch.testing.assert_close(out[b : b + 1], sdpa_reference(q, k[slots], v[slots], b), rtol=1e-5, atol=1e-5)


def test_decode_linear_is_the_same_module_for_any_input():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    fast = DecodeLinear.from_linear(lin)
    assert fast.weight is lin.weight and fast.bias is lin.bias
    with torch.no_grad():
        for shape in [(1, 24), (1, 1, 24), (3, 5, 24), (24,)]:
            x = torch.randn(shape)
            torch.testing.assert_close(fast(x), lin(x), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 24, requires_grad=True)  # autograd on: torch's matmul, gradients flow
    fast(x).sum().backward()
    assert x.grad is not None


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, max_seq_len=64, n_layer=2, d_model=64, n_head=4, position="learned",
                      tie_embeddings=True, init_std=0.2)  # fmt: skip
    return Transformer(cfg).eval()


@needs_kernels
def test_optimized_model_gives_the_same_logits_and_greedy_tokens():
    model = tiny_model()
    fast = optimize_for_decode(copy.deepcopy(model))
    assert not any(type(m) is nn.Linear for m in fast.modules())
    assert fast.lm_head.weight is fast.tok_emb.weight  # the tied head stays one tensor
    assert fast.state_dict().keys() == model.state_dict().keys()
    idx = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), model(idx), rtol=1e-5, atol=1e-5)
    prompt = idx[0, :8].tolist()
    assert generate(fast, prompt, max_new_tokens=16, temperature=0) == generate(model, prompt, max_new_tokens=16,
                                                                                temperature=0)  # fmt: skip


@needs_kernels
def test_fused_qkv_decode_steps_equal_the_plain_model_and_follow_replaced_layers(monkeypatch):
    from lmforge.infer.fastpath import FusedAttention, FusedDecode
    from lmforge.infer.kv_cache import ContiguousKVCache
    from lmforge.model.attention import Attention

    model = tiny_model()
    fast = optimize_for_decode(copy.deepcopy(model))
    # One-token steps would run every layer in C (tests/infer/test_fused_decode.py): keep them on the block path.
    monkeypatch.setattr(FusedDecode, "__call__", lambda *a: None)
    calls = []  # "fused" for each FusedAttention projection, then "plain" where it left it to the three products
    fused_project, plain_project = FusedAttention.project_qkv, Attention.project_qkv
    monkeypatch.setattr(FusedAttention, "project_qkv", lambda m, x: calls.append("fused") or fused_project(m, x))
    monkeypatch.setattr(Attention, "project_qkv", lambda m, x: calls.append("plain") or plain_project(m, x))

    def fused_products() -> int:
        return sum(c == "fused" and calls[i + 1 : i + 2] != ["plain"] for i, c in enumerate(calls))

    def steps(m):
        cache = ContiguousKVCache(m.cfg, 1, 32)
        with torch.no_grad():
            m(torch.arange(8)[None], cache=cache)
            return torch.cat([m(torch.tensor([[t]]), cache=cache) for t in (3, 9, 27)], 1)

    torch.testing.assert_close(steps(fast), steps(model), rtol=1e-5, atol=1e-5)
    assert fused_products() > 0  # the one-token steps took the fused product
    fast.blocks[0].attn.wq = copy.deepcopy(model.blocks[0].attn.wq)  # replaced after optimising: a plain Linear
    with torch.no_grad():
        fast.blocks[0].attn.wq.weight.mul_(2)
        model.blocks[0].attn.wq.weight.mul_(2)
    calls.clear()
    steps(fast)
    # The last step: layer 0 fell back to three products (it never read the old wq), layer 1 stayed fused.
    assert calls[-3:] == ["fused", "plain", "fused"]
    torch.testing.assert_close(steps(fast), steps(model), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("scheme", ["bf16", "int8"])
def test_quantized_decode_steps_in_the_kernel_equal_the_matmul_path(scheme, monkeypatch):
    model = quantize_model(tiny_model(), scheme)
    prompt = list(range(10))
    fast = generate(model, prompt, max_new_tokens=16, temperature=0)
    monkeypatch.setattr(kernels, "gemv_applies", lambda x, n: False)
    assert fast == generate(model, prompt, max_new_tokens=16, temperature=0)


def test_without_kernels_the_model_is_left_as_it_is(monkeypatch):
    monkeypatch.setattr(kernels, "available", lambda: False)
    model = tiny_model()
    assert optimize_for_decode(model) is model and type(model.lm_head) is nn.Linear


@pytest.mark.parametrize("scheme", ["bf16", "int8"])
def test_without_kernels_quantized_models_decode_through_torch(scheme, monkeypatch):
    prompt = list(range(10))
    with_kernels = generate(quantize_model(tiny_model(), scheme), prompt, max_new_tokens=8, temperature=0)
    monkeypatch.setattr(kernels, "_library", lambda: None)  # as with no C compiler: a kernel call would raise
    assert generate(quantize_model(tiny_model(), scheme), prompt, max_new_tokens=8, temperature=0) == with_kernels
