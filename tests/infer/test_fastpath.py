"""The decode weight layout changes storage, never results."""

import copy

import torch
import torch.nn as nn

from lmforge.infer.fastpath import TiedEmbedding, TransposedLinear, optimize_for_decode
from lmforge.infer.generate import generate
from lmforge.model import ModelConfig, Transformer


def test_transposed_linear_equals_linear_for_any_leading_shape():
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    fast = TransposedLinear(lin)
    for shape in [(1, 24), (3, 5, 24), (24,)]:
        x = torch.randn(shape)
        torch.testing.assert_close(fast(x), lin(x))
    assert torch.equal(fast.weight, lin.weight)


def test_optimized_model_gives_the_same_logits_and_greedy_tokens(monkeypatch):
    monkeypatch.setattr("lmforge.infer.fastpath.transposed_is_faster", lambda w, margin=0.05: True)  # every layer
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, max_seq_len=64, n_layer=2, d_model=64, n_head=4, position="learned",
                      tie_embeddings=True, init_std=0.2)  # fmt: skip
    model = Transformer(cfg).eval()
    fast = optimize_for_decode(copy.deepcopy(model))
    assert isinstance(fast.lm_head, TransposedLinear) and isinstance(fast.tok_emb, TiedEmbedding)
    assert not any(type(m) is nn.Linear for m in fast.modules())
    # The tied head stays one tensor: the embedding reads the head's transposed weight.
    assert fast.tok_emb.weight.data_ptr() == fast.lm_head.weight_t.data_ptr()
    idx = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(fast(idx), model(idx), rtol=1e-5, atol=1e-5)
    prompt = idx[0, :8].tolist()
    assert generate(fast, prompt, max_new_tokens=16, temperature=0) == generate(model, prompt, max_new_tokens=16,
                                                                                temperature=0)  # fmt: skip
