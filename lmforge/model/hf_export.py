"""Hugging Face export: the transformers class that reproduces an lmforge config, its weights, and a folder that
`AutoModelForCausalLM` loads (the import side is `lmforge.model.hf`; tests/model/test_hf_parity.py checks both).

    from lmforge.model.hf_export import save_hf, to_hf
    hf_model = to_hf(model)        # GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2/Qwen3ForCausalLM
    save_hf(model, "out/hf", tokenizer=tok, chat_template=template)  # atomic; a non-empty folder needs overwrite=True

Needs transformers. A config no HF class reproduces exactly is refused with a ValueError naming the field.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .hf import _gpt2_names, _is_conv1d, _llama_names
from .transformer import Transformer


def state_dict_to_hf(model: Transformer, family: str) -> dict[str, torch.Tensor]:
    """lmforge state dict -> the state dict of the HF *ForCausalLM class of `family`."""
    cfg, sd = model.cfg, model.state_dict()
    if family != "gpt2":
        out = {f"model.{hf}": sd[ours] for hf, ours in _llama_names(cfg).items()}
        out["lm_head.weight"] = sd["lm_head.weight"]
        return out
    out = {}
    for hf, ours in _gpt2_names(cfg).items():
        out[f"transformer.{hf}"] = sd[ours].t() if _is_conv1d(hf) else sd[ours]
    for i in range(cfg.n_layer):
        p = f"blocks.{i}.attn."
        out[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([sd[p + f"w{x}.weight"] for x in "qkv"]).t()
        out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat([sd[p + f"w{x}.bias"] for x in "qkv"])
    out["lm_head.weight"] = sd["lm_head.weight"]
    return out


# ---- export --------------------------------------------------------------------------------------------
def _hf_family(cfg: ModelConfig) -> str:
    """Which HF class reproduces this config; ValueError naming the field that none of them has."""

    def need(field: str, allowed: tuple, family: str) -> None:
        if getattr(cfg, field) not in allowed:
            raise ValueError(f"to_hf: {field}={getattr(cfg, field)!r} has no {family} equivalent (allowed: {allowed})")

    if cfg.norm_position == "output":
        for field, allowed in (("norm", ("rmsnorm",)), ("ffn", ("swiglu",)), ("position", ("rope",))):
            need(field, allowed, "OLMo 2")
        for field, allowed in (("qk_norm", ("full",)), ("bias", (False,)), ("qkv_bias", (False,)), ("window", (None,))):
            need(field, allowed, "OLMo 2")
        return "olmo2"
    if cfg.norm_position != "pre":
        raise ValueError(
            f"to_hf: norm_position={cfg.norm_position!r}: only OLMo 2 (output) and pre-norm have HF classes"
        )
    need("attention", ("sdpa", "naive", "sliding_window"), "GPT-2/Llama/Mistral")
    need("position", ("learned", "rope"), "GPT-2/Llama/Mistral")
    if cfg.position == "learned":
        need("norm", ("layernorm",), "GPT-2")
        need("bias", (True,), "GPT-2")
        need("ffn", ("gelu_tanh", "gelu", "relu"), "GPT-2")
        need("window", (None,), "GPT-2")
        need("n_kv_head", (cfg.n_head,), "GPT-2 (no GQA)")
        need("head_dim", (cfg.d_model // cfg.n_head,), "GPT-2 (head_dim = d_model / n_head)")
        need("qk_norm", (None,), "GPT-2")
        return "gpt2"
    need("qk_norm", (None, "head"), "Llama/Mistral/Qwen (qk_norm='full' is OLMo 2's, with norm_position='output')")
    need("norm", ("rmsnorm",), "Llama/Mistral/Qwen")
    need("ffn", ("swiglu",), "Llama/Mistral/Qwen")
    if cfg.qk_norm:
        need("qk_norm", ("head",), "Qwen3 (per-head q/k norm)")
        need("bias", (False,), "Qwen3 (biases only with attention_bias, never in the MLP)")
        need("qkv_bias", (False,), "Qwen3")
        need("window", (None,), "Qwen3")
        return "qwen3"
    if cfg.qkv_bias and not cfg.bias:
        need("window", (None,), "Qwen2")
        return "qwen2"
    if cfg.window:
        need("bias", (False,), "Mistral")
        return "mistral"
    return "llama"


def hf_config(cfg: ModelConfig):
    """The transformers config (5.x style, sdpa attention) that reproduces `cfg`."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Olmo2Config, Qwen2Config, Qwen3Config

    family = _hf_family(cfg)
    ids = {k: v for k, v in cfg.extra.get("hf", {}).items() if k.endswith("_token_id")}
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None} | ids
    if family == "gpt2":
        act = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu", "relu": "relu"}[cfg.ffn]
        return GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function=act, layer_norm_epsilon=cfg.norm_eps,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
            initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
            attn_implementation="sdpa", **ids,
        )  # fmt: skip
    max_len = cfg.max_seq_len
    rope = {"rope_type": cfg.rope_scaling or "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "dynamic":  # transformers reads the trained length from max_position_embeddings
        max_len = cfg.rope_original_max_len or cfg.max_seq_len
    if cfg.rope_scaling == "llama3":
        rope |= {
            "original_max_position_embeddings": cfg.rope_original_max_len or cfg.max_seq_len,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
        }
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=max_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=rope, attention_dropout=cfg.dropout, initializer_range=cfg.init_std,
        attn_implementation="sdpa", **ids,
    )  # fmt: skip
    if family == "mistral":
        return MistralConfig(sliding_window=cfg.window, **common)
    if family == "olmo2":
        return Olmo2Config(attention_bias=False, **common)
    if family == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if family == "qwen3":
        return Qwen3Config(attention_bias=False, use_sliding_window=False, **common)
    return LlamaConfig(attention_bias=cfg.bias, mlp_bias=cfg.bias, **common)


HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "olmo2": "Olmo2ForCausalLM"}  # fmt: skip


def to_hf(model: Transformer):
    """The equivalent transformers model (GPT2LMHeadModel, LlamaForCausalLM, ...: `HF_CLASSES`), in eval mode and
    the dtype of `model`'s parameters."""
    import transformers

    family = _hf_family(model.cfg)
    hf = getattr(transformers, HF_CLASSES[family])(hf_config(model.cfg))
    hf.load_state_dict(state_dict_to_hf(model, family), strict=True)
    return hf.to(model.tok_emb.weight.dtype).eval()


def save_hf(
    model: Transformer,
    folder,
    tokenizer=None,
    chat_template: str | None = None,
    *,
    overwrite: bool = False,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write `to_hf(model)` (safetensors) and optionally a tokenizer (a `tokenizers.Tokenizer`) and chat
    template into `folder`; `extra(tmp)` may add files of its own (written into the same temporary folder).

    A non-empty `folder` is refused unless `overwrite`, and then only the files written here are replaced:
    anything else in it (a README, a checkpoints/ folder) stays. Everything is first written to a temporary
    folder beside `folder`, and each file is then renamed into place, so a crash while writing leaves
    `folder` as it was, and every file in it is always a complete old or new version."""
    from lmforge.runs import check_output_folder, count_write, fsync_dir

    folder = check_output_folder(folder, overwrite, option="folder", flag="overwrite=True")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # transformers writes through its own code: into a scratch folder, each file counted as it joins.
        scratch = tmp / ".transformers"
        to_hf(model).save_pretrained(scratch)
        for f in sorted(scratch.iterdir()):
            count_write(tmp / f.name)
            os.replace(f, tmp / f.name)
        scratch.rmdir()
        if tokenizer is not None:
            tok_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
            if chat_template is not None:
                tok_config["chat_template"] = chat_template
            _write(tmp / "tokenizer.json", tokenizer.to_str())
            _write(tmp / "tokenizer_config.json", json.dumps(tok_config, indent=2))
        if extra is not None:
            extra(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if not folder.exists():
            tmp.rename(folder)  # one rename: the folder appears complete or not at all
        else:
            for f in sorted(tmp.iterdir()):
                os.replace(f, folder / f.name)
            fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write(path: Path, text: str) -> None:
    from lmforge.runs import count_write

    count_write(path)
    path.write_text(text)
