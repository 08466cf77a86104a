"""How long a sequence a model can position, and the one check every generating path makes against it.

    check_context(model.cfg, len(prompt), params.max_new_tokens)   # raises ContextLengthError, a UserError
    context_limit(model.cfg)                                       # 256, 65536 with scaled RoPE, None: no limit

Learned positions are a table of `max_seq_len` rows: nothing exists past it. RoPE runs at any position, but a
model has only seen rotations up to its trained length, and past it quality collapses without a warning
(Chen et al. 2023, "Extending Context Window of Large Language Models via Positional Interpolation"): refused
unless the config's RoPE scaling (linear, dynamic NTK, Llama 3) stretches the trained length by its factor.
Sinusoidal, ALiBi (built to extrapolate, Press et al. 2022), T5 relative buckets and no positions have no hard
limit. A sliding (StreamingLLM) cache is the user asking to run past the trained length on purpose
(lmforge/infer/sliding.py), so there only the learned table's limit stands.

The HTTP server answers ContextLengthError with OpenAI's `context_length_exceeded` code (its `code`).
"""

from __future__ import annotations

from lmforge.config import UserError


class ContextLengthError(UserError):
    """prompt + max_new_tokens exceed what the model can position; carries the numbers of the refusal."""

    code = "context_length_exceeded"  # OpenAI's error code for the same refusal

    def __init__(self, limit: int, prompt_tokens: int, max_new_tokens: int, why: str):
        self.limit, self.prompt_tokens, self.max_new_tokens = limit, prompt_tokens, max_new_tokens
        self.requested = prompt_tokens + max_new_tokens
        super().__init__(f"prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = {self.requested}, "
                         f"past the model's context of {limit} tokens ({why}): shorten the prompt or lower "
                         "max_new_tokens")  # fmt: skip


def context_limit(cfg, *, streaming: bool = False) -> int | None:
    """The longest prompt + output `cfg`'s positions allow; None: no hard limit. With RoPE scaling, the trained
    length (rope_original_max_len, else max_seq_len) × factor, or max_seq_len if that is longer (an HF Llama 3.1
    config says 131072 with an 8192 × 8 scaling). `streaming`: a sliding cache, see the module docstring."""
    if cfg.position == "learned":
        return cfg.max_seq_len
    if cfg.position != "rope" or streaming:
        return None
    if cfg.rope_scaling is None:
        return cfg.max_seq_len
    return max(cfg.max_seq_len, int((cfg.rope_original_max_len or cfg.max_seq_len) * cfg.rope_factor))


def check_context(cfg, prompt_tokens: int, max_new_tokens: int, *, streaming: bool = False) -> None:
    """Raise ContextLengthError when prompt_tokens + max_new_tokens > `context_limit(cfg)`; exactly at it is fine."""
    limit = context_limit(cfg, streaming=streaming)
    if limit is None or prompt_tokens + max_new_tokens <= limit:
        return
    if cfg.position == "learned":
        why = "learned positions"
    elif cfg.rope_scaling is None:
        why = "RoPE without rope_scaling"
    else:
        why = f"RoPE {cfg.rope_scaling} scaling × {cfg.rope_factor:g}"
    raise ContextLengthError(limit, prompt_tokens, max_new_tokens, why)
