"""Shared pieces for the training-loop tests: a tiny model and a batch function with the loop's contract
(a global batch per step, cut into n_parts = ranks × micro-batches parts)."""

import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer

VOCAB, SEQ = 37, 16


def tiny_model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, max_seq_len=SEQ, n_layer=2, d_model=32, n_head=4, position="rope", ffn="swiglu")
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg))


def global_batch(step: int, batch_size: int):
    g = torch.Generator().manual_seed(1000 + step)
    seq = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def batch_fn_for(batch_size: int):
    def batch_fn(step, part, n_parts):
        x, y = global_batch(step, batch_size)
        n = batch_size // n_parts
        return x[part * n : (part + 1) * n], y[part * n : (part + 1) * n]

    return batch_fn


def lm_loss(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
