"""Smoke tests of benchmarks/decode.py and benchmarks/speculative.py: both `--quick` runs in-process (tiny random
models, one thread), and the helpers their figures rest on, on tiny models and a tokenizer trained here."""

import pytest
import torch

from benchmarks import decode, spec_inputs, speculative
from lmforge.infer.generate import generate
from lmforge.infer.speculative import SpeculativeStats
from lmforge.model import ModelConfig, Transformer


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: tiny models on a busy 2-core machine run several times faster. `--threads 1` sets torch's
    global thread count too; put it back for the other tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt2() -> Transformer:
    cfg = ModelConfig(vocab_size=97, max_seq_len=2048, n_layer=2, d_model=32, n_head=2, ffn="gelu_tanh",
                      position="learned", norm="layernorm")  # fmt: skip
    torch.manual_seed(0)
    return Transformer(cfg).eval()


# ---- decode.py ----------------------------------------------------------------------------------------------


def test_decode_quick_main_reports_every_figure(capsys):
    figures = decode.main(["--quick", "--threads", "1"])
    assert set(figures) == {"ours_fp32_vs_hf", "roofline_fraction", "roofline_fraction_fastest", "roofline_tok_s",
                            "bf16_vs_hf", "int8_vs_hf", "int4_vs_hf", "pos1024_vs_pos128"}  # fmt: skip
    assert all(v > 0 for v in figures.values())
    out = capsys.readouterr().out
    for row in ("HF generate fp32", "ours fp32", "ours bf16", "ours int8", "ours w8a8", "ours int4", "GEMV roofline",
                "step @1024", "goals"):  # fmt: skip
        assert row in out
    assert "16/16 (vs HF)" in out  # ours fp32 greedy = HF greedy, all 16 tokens


def test_ours_generate_stops_at_n_tokens_and_matches_generate():
    model, prompt = tiny_gpt2(), [1, 2, 3, 4]
    out = decode.ours_generate(model, prompt, 7)
    assert out == generate(model, prompt, max_new_tokens=7, temperature=0)


def test_hf_generate_matches_ours_on_the_same_weights():
    model, prompt = tiny_gpt2(), [5, 6, 7, 8, 9]
    assert decode.hf_generate(decode.make_hf(model), prompt, 6) == decode.ours_generate(model, prompt, 6)


def test_stepped_decode_yields_the_same_tokens_and_scales_the_steps():
    model, prompt = tiny_gpt2(), [3, 1, 4, 1, 5]
    stepped = decode.SteppedDecode(model, prompt, steps=3, total=10)
    stepped.run(stepped.setup())
    assert stepped.tokens == decode.ours_generate(model, prompt, 4)  # the first token, then 3 steps
    stepped.prefill_times = [9.0, 2.0]  # the first (a warmup round) is dropped
    assert stepped.estimate(steps_median=0.3, warmup=1) == pytest.approx(2.0 + 0.3 * 9 / 3)


def test_linear_weights_are_every_matrix_a_step_reads():
    model = tiny_gpt2()
    weights = decode.linear_weights(model)
    assert len(weights) == 6 * model.cfg.n_layer + 1  # q, k, v, o, up, down per block; the LM head
    assert weights[-1].data_ptr() == model.tok_emb.weight.data_ptr()  # tied: the head is the embedding
    assert decode.weight_bytes(weights) == 4 * sum(w.numel() for w in weights)
    table, readers = decode.gemv_by_shape(weights, repeats=1, warmup=0)
    assert set(readers) == {tuple(w.shape) for w in weights}  # the fastest reader of every shape
    decode.gemv_sweep(weights, readers)()


def test_decode_step_runs_at_the_filled_length_every_time():
    model = tiny_gpt2()
    cache = decode.filled_cache(model.cfg, 128)
    assert cache.length == 128
    step = decode.decode_step(model, cache)
    first = step()
    assert cache.length == 128 and step() == first  # truncated back: the same position, the same output


def test_slow_cases_are_stepped_within_the_budget():
    probes = {"ours fp32": 0.05, "ours w8a8": 0.02, "ours int8": 0.12, "ours bf16": 0.3, "ours int4": 5.0}
    steps = decode.choose_steps(probes, n=128, fp32_steps=16)
    # fp32 always (the roofline); w8a8 is fast, so it times the whole generation; the rest fit 1/4 of fp32's 128
    assert steps == {"ours fp32": 16, "ours int8": 13, "ours bf16": 5, "ours int4": 2}


def test_prefix_match():
    assert decode.prefix_match([1, 2, 3], [1, 2, 4, 5]) == "2/3"
    assert decode.prefix_match([1, 2], [1, 2]) == "2/2"


# ---- speculative.py -----------------------------------------------------------------------------------------


def test_speculative_quick_main_reports_every_figure(capsys):
    figures = speculative.main(["--quick", "--threads", "1"])
    for key in (
        "c",
        "v4",
        "greedy_alpha",
        "greedy_speedup",
        "greedy_predicted",
        "greedy_vs_predicted",
        "sampled_alpha",
        "sampled_vs_predicted",
        "lookup_speedup",
        "lookup_alpha",
        "lookup_accepted_per_step",
    ):
        assert figures[key] is not None, key  # fmt: skip
    out = capsys.readouterr().out
    for row in ("target only (base)", "target only, spec loop", "draft γ=2", "draft γ=4", "draft adaptive γ",
                "lookup γ=4", "lookup adaptive γ", "sampled T=0.8", "goals"):  # fmt: skip
        assert row in out
    assert "random" in out  # says that the quick models are random


def test_spec_cases_and_their_stats_reproduce_greedy_target_only():
    model = tiny_gpt2()
    prompts = spec_inputs.random_lookup_prompts(model.cfg.vocab_size, 2, 12)
    cases = speculative.spec_cases(model, model.cfg.vocab_size, prompts, 0.0, 10, (2, 4))
    assert [c.name for c in cases] == ["target only", "lookup γ=2", "lookup γ=4", "lookup adaptive γ (from 4, ≤8)"]
    for case in cases:
        case.run()
        assert case.outputs == cases[0].outputs  # greedy speculation emits exactly the target's tokens
        assert all(len(out) == 10 for out in case.outputs)
    assert cases[0].stats is None and cases[1].stats.emitted == 20  # summed over both prompts


def test_sum_stats_adds_every_counter():
    a = SpeculativeStats(target_forwards=2, drafted=8, accepted=5, rejected=1, emitted=7)
    b = SpeculativeStats(target_forwards=3, drafted=4, accepted=4, rejected=0, emitted=7, draft_forwards=4)
    total = speculative.sum_stats([a, b])
    assert (total.target_forwards, total.drafted, total.accepted, total.emitted) == (5, 12, 9, 14)
    assert total.alpha == pytest.approx(9 / 10)


SOURCE = '''import os


def add(a, b):
    """Add two numbers."""
    return a + b


class Box:
    def size(self):
        if self.items:
            return len(self.items)

        return 0

x = 1
'''


def test_function_blocks_take_each_def_with_its_body_dedented():
    blocks = spec_inputs.function_blocks(SOURCE)
    assert blocks[0] == 'def add(a, b):\n    """Add two numbers."""\n    return a + b'
    assert blocks[1] == "def size(self):\n    if self.items:\n        return len(self.items)\n\n    return 0"


def test_lookup_prompt_ends_inside_the_copy_and_copied_chars_scores_it():
    block = spec_inputs.function_blocks(SOURCE)[0]
    prompt, rest = spec_inputs.lookup_prompt_text(block)
    assert prompt == block + spec_inputs.LOOKUP_CUE + "def add(a, b):"
    assert rest == block[len("def add(a, b):") :]  # what a faithful copy continues with
    assert spec_inputs.copied_chars([rest, "\n    x"], [rest, "\n    ret"]) == (len(rest) + 5, len(rest) + 6)


def test_text_and_lookup_prompts_from_documents():
    from lmforge.tokenizer import Tokenizer

    docs = [SOURCE.replace("add", f"add{i}").replace("Box", f"Box{i}") * 3 for i in range(4)]
    tok = Tokenizer.train_bpe(docs, vocab_size=300)
    prompts = spec_inputs.text_prompts(docs, tok, count=2, length=8)
    assert len(prompts) == 2 and all(len(p) == 8 for p in prompts)
    copy_prompts, rests = spec_inputs.lookup_prompts(docs, tok, count=2, block_tokens=(1, 1000))
    assert len(copy_prompts) == len(rests) == 2
    assert tok.decode(copy_prompts[0]).endswith(spec_inputs.LOOKUP_CUE.strip("\n") + "\n" + "def size(self):")
