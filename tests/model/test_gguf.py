"""GGUF import (lmforge/model/gguf.py) against transformers. Tiny random Llama (GQA, tied, head_dim ≠ d/heads,
Mistral's window), Qwen2 and Qwen3 models are written as GGUF the way llama.cpp's convert_hf_to_gguf.py writes
them (its keys, tensor names, the q/k row permutation for `llama`; F32, F16, BF16, Q8_0 tensors), by a writer
here that shares no code with the reader; `from_gguf` must then give HF's logits. Plus mutations that prove the
check can fail, the metadata for the tokenizer, and the refusals.

    .venv/bin/pytest tests/model/test_gguf.py -q
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_hf_parity import TOL, assert_parity, make_llama, make_mistral, make_qwen, parity_error, tokens

import lmforge.model.gguf as gguf_import
from lmforge.config import UserError
from lmforge.model.gguf import from_gguf, gguf_metadata, gguf_model_config
from lmforge.model.hf import from_hf
from lmforge.model.positions import rope_inv_freq

Q = gguf.GGMLQuantizationType

MAKERS = {
    "llama": make_llama,
    # tied head, head_dim 8 (≠ 64 / 4, so the file carries attention.key_length), rope_theta 500
    "llama_tied": functools.partial(
        make_llama, tie_word_embeddings=True, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 500.0}
    ),
    "mistral": make_mistral,  # window 8: a `llama` file with attention.sliding_window
    "qwen2": functools.partial(make_qwen, "Qwen2"),
    "qwen3": functools.partial(make_qwen, "Qwen3"),
}
ARCH = {"llama": "llama", "llama_tied": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Relative logit error of a file against the unquantized model (random weights of σ 0.2 make logits of 1-10)
LOOSE = {Q.F16: 1e-2, Q.Q8_0: 0.15}
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


@functools.cache
def hf_model(case: str):
    return MAKERS[case]()  # deterministic (seeded); cached because every test only reads it


# ---- a GGUF writer in the manner of convert_hf_to_gguf.py ---------------------------------------------------
GGUF_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}  # fmt: skip
GGUF_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
GGUF_TOP["lm_head.weight"] = "output.weight"


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_TOP:
        return GGUF_TOP[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.<i>.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_LAYER[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as it is there."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def file_values(w: np.ndarray, qtype) -> np.ndarray:
    """What a tensor stored as qtype decodes to (float32)."""
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)


def write_gguf(
    path,
    case: str,
    qtype=Q.F32,
    *,
    arch=None,
    edit=None,
    drop=(),
    add=None,
    chat_template=None,
    hf=None,
    tokenizer=None,
):
    """The HF model of `case` (or `hf`, a model of that case's architecture) as a GGUF file. 2-D weights in qtype,
    1-D ones F32 (llama.cpp keeps norms and biases F32). edit(writer) changes keys after the standard ones; drop /
    add remove or add tensors. `tokenizer` (a byte-level BPE `tokenizers.Tokenizer`, its specials control tokens,
    bos/eos its first two) replaces the placeholder vocabulary, as the converter writes a real one."""
    hf = hf if hf is not None else hf_model(case)
    c = hf.config
    arch = arch or ARCH[case]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny-{case}")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    head_dim = getattr(c, "head_dim", None)
    if head_dim and head_dim != c.hidden_size // c.num_attention_heads:
        w.add_key_length(head_dim)  # (the converter writes these whenever config.json has head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":  # LlamaModel.set_gguf_parameters adds these two
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(head_dim or c.hidden_size // c.num_attention_heads)
    if getattr(c, "sliding_window", None) and case == "mistral":
        w.add_sliding_window(c.sliding_window)
    w.add_tokenizer_model("gpt2")
    if tokenizer is None:
        w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, c.vocab_size)])
        w.add_token_merges(["t 1"])
        w.add_token_types([3, 3, 3] + [1] * (c.vocab_size - 3))
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    else:
        import json

        spec = json.loads(tokenizer.to_str())
        vocab = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        specials = [t["id"] for t in spec["added_tokens"] if t["special"]]
        w.add_tokenizer_pre("gpt2")
        w.add_token_list([t for t, _ in vocab])
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
        w.add_token_types([3 if i in specials else 1 for _, i in vocab])
        w.add_bos_token_id(specials[0])
        w.add_eos_token_id(specials[1])
    if chat_template is not None:
        w.add_chat_template(chat_template)
    if edit is not None:
        edit(w)
    for hf_name, t in hf.state_dict().items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # a tied checkpoint has no lm_head in its safetensors
        name, x = gguf_name(hf_name), t.detach().numpy()
        if arch == "llama" and ".attn_q." in name:
            x = llama_cpp_permute(x, c.num_attention_heads, c.num_attention_heads)
        if arch == "llama" and ".attn_k." in name:
            x = llama_cpp_permute(x, c.num_attention_heads, c.num_key_value_heads)
        if name in drop:
            continue
        if x.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(x), qtype), raw_dtype=qtype)
    for name, x in (add or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def as_stored(hf, qtype):
    """The HF model with each 2-D weight replaced by what the file stores for it: the model a quantized file
    must reproduce. (Row order does not change a block-quantized value: blocks run along rows.)"""
    hf = copy.deepcopy(hf)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.copy_(torch.from_numpy(file_values(p.numpy(), qtype)))
    return hf


def config_fields(cfg) -> dict:
    """The architecture: every field but init_std (GGUF does not record it) and extra (provenance)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("init_std", "extra")}


# ---- parity ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(MAKERS))
def test_f32_parity_and_the_config_from_hf_builds(case, tmp_path):
    hf = hf_model(case)
    ours = from_gguf(write_gguf(tmp_path / "m.gguf", case))
    reference = from_hf(hf).cfg
    assert config_fields(ours.cfg) == config_fields(reference)
    assert ours.cfg.extra["hf"]["model_type"] == reference.extra["hf"]["model_type"]
    assert ours.cfg.extra["hf"]["bos_token_id"] == 1 and ours.cfg.extra["gguf"]["architecture"] == ARCH[case]
    assert not ours.training
    if case == "llama_tied":
        assert ours.cfg.tie_embeddings and ours.lm_head.weight is ours.tok_emb.weight
        assert (ours.cfg.head_dim, ours.cfg.rope_theta) == (8, 500.0)
    if case == "mistral":
        assert ours.cfg.window == 8
    assert_parity(ours, hf, tokens(24))


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0], ids=["F16", "Q8_0"])
def test_f16_and_q8_0_equal_hf_with_the_stored_weights(case, qtype, tmp_path):
    hf = as_stored(hf_model(case), qtype)
    ours = from_gguf(write_gguf(tmp_path / "m.gguf", case, qtype))
    layer = hf.model.layers[1]
    assert torch.equal(ours.blocks[1].attn.wq.weight, layer.self_attn.q_proj.weight)  # un-permuted, bit for bit
    assert torch.equal(ours.blocks[1].attn.wk.weight, layer.self_attn.k_proj.weight)
    assert torch.equal(ours.blocks[1].ffn.down.weight, layer.mlp.down_proj.weight)
    assert torch.equal(ours.tok_emb.weight, hf.model.embed_tokens.weight)
    assert_parity(ours, hf, tokens(24))
    assert parity_error(ours, hf_model(case), tokens(24)) < LOOSE[qtype]  # and near the unquantized model


@pytest.mark.parametrize(
    "qtype, dtype", [(Q.F32, torch.float32), (Q.F16, torch.float16), (Q.BF16, torch.bfloat16), (Q.Q8_0, torch.bfloat16)]
)
def test_dtypes_hold_the_stored_values_and_rope_stays_fp32(qtype, dtype, tmp_path):
    hf = hf_model("llama_tied")
    ours = from_gguf(write_gguf(tmp_path / "m.gguf", "llama_tied", qtype), dtype=dtype)
    assert {p.dtype for p in ours.parameters()} == {dtype}
    q_proj = hf.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert torch.equal(ours.blocks[0].attn.wq.weight, torch.from_numpy(file_values(q_proj, qtype)).to(dtype))
    assert ours.lm_head.weight is ours.tok_emb.weight
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    assert ours.rope.inv_freq.dtype == torch.float32 and torch.equal(ours.rope.inv_freq, rope_inv_freq(ours.cfg))
    with torch.no_grad():  # the weights are the model's own memory, not a read-only view of the file
        ours.blocks[0].ffn.up.weight.mul_(2)


# ---- mutations: the parity check can fail ---------------------------------------------------------------
@pytest.mark.parametrize("mutation", ["no_unpermute", "k_with_n_head"])
def test_a_wrong_unpermute_breaks_parity(mutation, tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf", "llama")
    if mutation == "no_unpermute":
        monkeypatch.setattr(gguf_import, "_unpermute", lambda w, n_head: w)
    else:  # GQA: k has n_kv_head heads of rows, not n_head
        monkeypatch.setattr(gguf_import, "PERMUTED", {"attn.wq": "n_head", "attn.wk": "n_head"})
    assert parity_error(from_gguf(path), hf_model("llama"), tokens(24)) > 100 * TOL


# ---- metadata ---------------------------------------------------------------------------------------------
def test_metadata_is_plain_python_for_the_tokenizer(tmp_path):
    meta = gguf_metadata(write_gguf(tmp_path / "m.gguf", "llama", chat_template=CHAT_TEMPLATE))
    toks = meta["tokenizer.ggml.tokens"]
    assert type(toks) is list and len(toks) == 128 and all(type(t) is str for t in toks) and toks[2] == "</s>"
    assert meta["tokenizer.ggml.merges"] == ["t 1"] and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert meta["llama.attention.layer_norm_rms_epsilon"] == 1e-6  # float32 in the file, the decimal it came from
    assert not [k for k in meta if k.startswith("GGUF.")]
    assert "tokenizer.chat_template" not in gguf_metadata(write_gguf(tmp_path / "n.gguf", "llama"))


def test_config_alone_from_metadata_and_tensor_names(tmp_path):
    meta = gguf_metadata(write_gguf(tmp_path / "m.gguf", "llama"))
    names = [t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors]
    assert not gguf_model_config(meta, names).tie_embeddings
    assert gguf_model_config(meta, [n for n in names if n != "output.weight"]).tie_embeddings
    del meta["llama.vocab_size"]  # the vocabulary's length stands in
    assert gguf_model_config(meta, names).vocab_size == 128


def test_the_import_never_imports_transformers(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "qwen3")
    code = f"import sys; from lmforge.model.gguf import from_gguf; from_gguf({str(path)!r}); "
    code += "print('transformers' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


# ---- refusals -----------------------------------------------------------------------------------------------
def _pop(key: str):
    return lambda w: w.kv_data[0].pop(key)


REFUSALS = {
    "architecture": (dict(arch="gemma2"), "general.architecture 'gemma2'"),
    "partial_rotary": (dict(edit=lambda w: w.add_rope_dimension_count(8)), "llama.rope.dimension_count 8"),
    "yarn": (dict(edit=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN)), "rope.scaling.type 'yarn'"),
    "linear_factor": (dict(edit=lambda w: w.add_rope_scaling_factor(4.0)), "rope.scaling.factor 4"),
    "llama3_rope": (dict(add={"rope_freqs.weight": np.ones(8, np.float32)}), "rope_freqs.weight"),
    "experts": (dict(edit=lambda w: w.add_expert_count(8)), "llama.expert_count 8"),
    "missing_key": (dict(edit=_pop("llama.block_count")), "lacks llama.block_count"),
    "missing_tensor": (dict(drop={"blk.1.ffn_up.weight"}), "lacks the tensor blk.1.ffn_up.weight"),
    "unknown_tensor": (dict(add={"blk.0.attn_output.bias": np.zeros(64, np.float32)}), "blk.0.attn_output.bias"),
    "wrong_shape": (dict(edit=lambda w: w.add_feed_forward_length(128)), "blk.0.ffn_gate.weight has shape"),
    "bad_heads": (dict(edit=lambda w: w.add_head_count_kv(3)), "n_kv_head"),
    "qwen_window": (dict(case="qwen2", edit=lambda w: w.add_sliding_window(8)), "qwen2.attention.sliding_window"),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_refusals_name_the_field(refusal, tmp_path):
    kw, match = REFUSALS[refusal]
    path = write_gguf(tmp_path / "m.gguf", **{"case": "llama"} | kw)
    with pytest.raises(UserError, match=match) as e:
        from_gguf(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("damage", ["junk", "empty", "truncated_header", "truncated_tensors"])
def test_damaged_files_are_refused(damage, tmp_path):
    path = tmp_path / "m.gguf"
    if damage == "junk":
        path.write_bytes(b"PK\x03\x04 this is a zip file, not a model" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        data = write_gguf(path, "llama").read_bytes()
        path.write_bytes(data[:200] if damage == "truncated_header" else data[: len(data) - 1000])
    with pytest.raises(UserError, match="not a GGUF file or is truncated"):
        from_gguf(path)
    with pytest.raises(UserError, match="not a GGUF file or is truncated"):
        gguf_metadata(path)
