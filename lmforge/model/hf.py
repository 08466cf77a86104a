"""Hugging Face import: GPT-2, Llama, Mistral, Qwen2, Qwen3 and OLMo 2 checkpoints into an lmforge `Transformer`
with the same logits (fp32: ≤1e-4 relative; tests/model/test_hf_parity.py checks it).
Export is `lmforge.model.hf_export`.

    from lmforge.model.hf import from_hf
    model = from_hf("path/to/hf_folder")           # config.json + model.safetensors (or a sharded index)
    model = from_hf(hf_model, dtype=torch.bfloat16)  # or a transformers PreTrainedModel already in memory

The folder's tokenizer and chat template are `lmforge.tokenizer.ImportedTokenizer.from_folder`'s.

A folder import reads config.json as a plain dict and the weights with safetensors (never pickles), so it
needs no transformers install; export does. Anything in a checkpoint that lmforge cannot reproduce
exactly (YaRN/LongRoPE scaling, partial rotary, mixed biases, a foreign family's flags, unknown weights, ...) is
refused with a UserError rather than imported with silently different math.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from lmforge.config import UserError

from .config import ModelConfig
from .transformer import Transformer

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "olmo2")
# Class defaults of transformers' configs, for config.json files that leave a default out (4.x wrote diffs).
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {
        "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": True,
    },
    "llama": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    },
    "mistral": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 4096 * 32, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "sliding_window": 4096,
    },
    "qwen2": {  # q, k and v with biases, o and the MLP without (not a config flag: Qwen2Attention hard-codes it)
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "use_sliding_window": False,
    },
    "qwen3": {  # RMSNorm of each head's q and k over head_dim, before RoPE
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
    },
    "olmo2": {  # norms on each sublayer's output (no input norms) and on the whole q and k projections
        "vocab_size": 50304, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "attention_bias": False,
    },
}  # fmt: skip
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
QK_NORM = {"qwen3": "head", "olmo2": "full"}  # ModelConfig.qk_norm of the families that norm q and k
# Flags of other architectures (qk-norm, Gemma's soft-capping, ...) that a llama-typed config may carry.
FOREIGN_FLAGS = (
    "qk_norm",
    "use_qk_norm",
    "qk_layernorm",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "use_sliding_window",
    "attention_chunk_size",
    "no_rope_layers",
)


def _refuse(what: str) -> UserError:
    # A user error: the folder (or the architecture asked to export) is one lmforge cannot represent exactly.
    return UserError(f"unsupported Hugging Face checkpoint: {what}; lmforge cannot reproduce it")


# ---- config: HF dict -> ModelConfig ------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map a transformers config (as the dict in config.json, 4.x or 5.x style) to a ModelConfig."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise _refuse(f"model_type {model_type!r} (supported: {', '.join(FAMILIES)})")
    d = {**HF_DEFAULTS[model_type], **hf}
    if d.get("is_causal") is False:
        raise _refuse("is_causal=False (bidirectional attention)")
    for flag in FOREIGN_FLAGS:
        if d.get(flag):
            raise _refuse(f"{flag}={d[flag]!r}")
    meta = {k: d.get(k) for k in ("model_type", "bos_token_id", "eos_token_id", "pad_token_id")}
    common = dict(dropout=0.0, init_std=d["initializer_range"], norm_position="pre", extra={"hf": meta})
    if model_type == "gpt2":
        return _gpt2_config(d, common)
    return _llama_config(d, common, model_type)


def _gpt2_config(d: dict, common: dict) -> ModelConfig:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if d[flag]:
            raise _refuse(f"GPT-2 {flag}=True")
    if not d["scale_attn_weights"]:
        raise _refuse("GPT-2 scale_attn_weights=False (attention without 1/sqrt(d))")
    act = d["activation_function"]
    if act not in GPT2_ACTIVATIONS:
        raise _refuse(f"GPT-2 activation_function {act!r}")
    return ModelConfig(
        vocab_size=d["vocab_size"], max_seq_len=d["n_positions"], n_layer=d["n_layer"], d_model=d["n_embd"],
        n_head=d["n_head"], d_ff=d["n_inner"] or 4 * d["n_embd"], attention="sdpa", position="learned",
        ffn=GPT2_ACTIVATIONS[act], norm="layernorm", norm_eps=d["layer_norm_epsilon"], bias=True,
        tie_embeddings=d["tie_word_embeddings"], **common,
    )  # fmt: skip


def _rope_parameters(d: dict) -> dict:
    """One flat rope dict from either 5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling`
    (`rope_scaling` wins, as in transformers' own conversion)."""
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in rope.values()):
        raise _refuse("per-layer-type rope_parameters")
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    rope.setdefault("rope_theta", d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta") or 1e4)
    return rope


def _llama_config(d: dict, common: dict, model_type: str) -> ModelConfig:
    if d["hidden_act"] not in ("silu", "swish"):
        raise _refuse(f"{model_type} hidden_act {d['hidden_act']!r} (only silu, i.e. SwiGLU)")
    attn_bias, mlp_bias = bool(d.get("attention_bias")), bool(d.get("mlp_bias"))
    if model_type == "mistral" and (attn_bias or mlp_bias):
        raise _refuse("Mistral with attention_bias/mlp_bias")
    if attn_bias != mlp_bias:
        raise _refuse(f"attention_bias={attn_bias} with mlp_bias={mlp_bias} (lmforge's bias is all or nothing)")
    layer_types = d.get("layer_types")
    if layer_types and len(set(layer_types)) > 1:
        raise _refuse(f"mixed layer_types {sorted(set(layer_types))}")
    rope = _rope_parameters(d)
    kind = rope["rope_type"]
    if kind not in ROPE_TYPES:
        raise _refuse(f"rope type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise _refuse(f"partial_rotary_factor={partial}")
    required = {
        "linear": ["factor"],
        "dynamic": ["factor"],
        "llama3": ["factor", "low_freq_factor", "high_freq_factor"],
    }
    missing = [key for key in required.get(kind, []) if rope.get(key) is None]
    if missing:
        raise ValueError(f"rope type {kind!r} needs {missing} in rope_parameters (or 4.x rope_scaling)")
    max_len = d["max_position_embeddings"]
    scaling: dict[str, Any] = {}
    if kind != "default":
        scaling = dict(rope_scaling=kind, rope_factor=float(rope["factor"]))
    if kind == "dynamic":
        # transformers stretches from max_position_embeddings whatever else the dict says. Its dynamic RoPE is
        # also stateful: after a longer input, shorter ones (still past that length) reuse the longer input's
        # frequencies; lmforge's depend on the current input only, so they agree when lengths only grow.
        scaling["rope_original_max_len"] = max_len
    if kind == "llama3":
        scaling.update(
            rope_original_max_len=rope.get("original_max_position_embeddings") or max_len,
            rope_low_freq_factor=float(rope["low_freq_factor"]),
            rope_high_freq_factor=float(rope["high_freq_factor"]),
        )
    n_head = d["num_attention_heads"]
    window = d.get("sliding_window") if model_type == "mistral" else None
    return ModelConfig(
        vocab_size=d["vocab_size"], max_seq_len=max_len, n_layer=d["num_hidden_layers"],
        d_model=d["hidden_size"], n_head=n_head, n_kv_head=d["num_key_value_heads"] or n_head,
        head_dim=d["head_dim"] or d["hidden_size"] // n_head, d_ff=d["intermediate_size"], attention="sdpa",
        window=window, position="rope", rope_theta=float(rope["rope_theta"]), ffn="swiglu", norm="rmsnorm",
        norm_eps=d["rms_norm_eps"], bias=attn_bias, qkv_bias=model_type == "qwen2", qk_norm=QK_NORM.get(model_type),
        tie_embeddings=d["tie_word_embeddings"], **scaling,
        **common | ({"norm_position": "output"} if model_type == "olmo2" else {}),
    )  # fmt: skip


# ---- weights: HF names <-> lmforge names --------------------------------------------------------------
LLAMA_LAYER = {
    "input_layernorm.weight": "norm1.weight", "post_attention_layernorm.weight": "norm2.weight",
    "self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
    "self_attn.o_proj": "attn.wo", "mlp.gate_proj": "ffn.gate", "mlp.up_proj": "ffn.up",
    "mlp.down_proj": "ffn.down",
}  # fmt: skip
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# OLMo 2 norms each sublayer's output instead of its input (norm_position="output")
OLMO2_LAYER = {k: v for k, v in LLAMA_LAYER.items() if not k.endswith("layernorm.weight")}
OLMO2_LAYER |= {"post_attention_layernorm.weight": "norm1.weight", "post_feedforward_layernorm.weight": "norm2.weight"}
GPT2_LAYER = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_proj": "attn.wo", "mlp.c_fc": "ffn.up"}
GPT2_LAYER["mlp.c_proj"] = "ffn.down"
GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # Conv1D stores weights as [in, out]
# Buffers that old checkpoints saved: GPT-2's causal mask, Llama's RoPE frequencies.
IGNORED = re.compile(r"(^h\.\d+\.attn\.(bias|masked_bias)$)|(rotary_emb\.inv_freq$)")


def _llama_names(cfg: ModelConfig) -> dict[str, str]:
    """HF Llama/Mistral/Qwen parameter name -> lmforge name (HF names without the `model.` prefix)."""
    names = {"embed_tokens.weight": "tok_emb.weight", "norm.weight": "norm_f.weight"}
    layer = LLAMA_LAYER if cfg.norm_position == "pre" else OLMO2_LAYER
    for i in range(cfg.n_layer):
        for hf, ours in layer.items():
            biased = cfg.bias or (cfg.qkv_bias and hf in QKV)
            for s in ("",) if hf.endswith("weight") else (".weight", ".bias") if biased else (".weight",):
                names[f"layers.{i}.{hf}{s}"] = f"blocks.{i}.{ours}{s}"
        if cfg.qk_norm:
            for x in "qk":
                names[f"layers.{i}.self_attn.{x}_norm.weight"] = f"blocks.{i}.attn.{x}_norm.weight"
    return names


def _gpt2_names(cfg: ModelConfig) -> dict[str, str]:
    names = {"wte.weight": "tok_emb.weight", "wpe.weight": "add_positions.weight"}
    names |= {"ln_f.weight": "norm_f.weight", "ln_f.bias": "norm_f.bias"}
    for i in range(cfg.n_layer):
        for hf, ours in GPT2_LAYER.items():
            for s in (".weight", ".bias"):
                names[f"h.{i}.{hf}{s}"] = f"blocks.{i}.{ours}{s}"
    return names


def _is_conv1d(gpt2_name: str) -> bool:
    """`h.<i>.attn.c_proj.weight` and friends: stored [in, out] by GPT-2's Conv1D."""
    parts = gpt2_name.split(".", 2)
    return parts[0] == "h" and gpt2_name.endswith(".weight") and parts[-1].startswith(GPT2_CONV1D)


def _strip_prefix(name: str, family: str) -> str:
    prefix = "transformer." if family == "gpt2" else "model."
    return name[len(prefix) :] if name.startswith(prefix) else name


def state_dict_from_hf(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict -> lmforge state dict. Every HF tensor must be used: an unknown one (q_norm, a bias the
    config does not announce, ...) means math lmforge would silently drop, so it is refused."""
    family = cfg.extra["hf"]["model_type"]
    gpt2 = family == "gpt2"
    left = {_strip_prefix(k, family): v for k, v in hf_sd.items()}
    left = {k: v for k, v in left.items() if not IGNORED.search(k)}
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in left:
            raise ValueError(f"Hugging Face checkpoint lacks the tensor {name!r} its config implies")
        return left.pop(name)

    for hf_name, ours in (_gpt2_names(cfg) if gpt2 else _llama_names(cfg)).items():
        w = take(hf_name)
        out[ours] = w.t() if gpt2 and _is_conv1d(hf_name) else w
    if gpt2:  # c_attn is q|k|v fused along its output dimension
        for i in range(cfg.n_layer):
            w, b = take(f"h.{i}.attn.c_attn.weight").t(), take(f"h.{i}.attn.c_attn.bias")
            for part, wp, bp in zip("qkv", w.split(cfg.d_model), b.split(cfg.d_model)):
                out[f"blocks.{i}.attn.w{part}.weight"], out[f"blocks.{i}.attn.w{part}.bias"] = wp, bp
    if cfg.tie_embeddings:
        left.pop("lm_head.weight", None)  # transformers ties it to the embedding whatever the file holds
        out["lm_head.weight"] = out["tok_emb.weight"]
    else:
        out["lm_head.weight"] = take("lm_head.weight")
    if left:
        raise _refuse(f"unexpected weights {sorted(left)[:4]}{' ...' if len(left) > 4 else ''}")
    return {k: v.contiguous() for k, v in out.items()}


# ---- import --------------------------------------------------------------------------------------------
def read_hf_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json as a dict and every tensor of model.safetensors or of the shards its index lists."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path} is not valid JSON ({e}); export or download the folder again") from None
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return config, _load_safetensors(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not isinstance(shard, str) or Path(shard).name != shard or shard in (".", ".."):
                raise UserError(f"{index} names the shard {shard!r}: shards must be files inside {folder}")
            weights.update(_load_safetensors(folder / shard))
        return config, weights
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {folder} (pickled .bin checkpoints are not "
        "loaded: convert them to safetensors first)"
    )


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the folder's safetensors index names it; copy it there")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise UserError(f"{path} is truncated or not a safetensors file ({e}); export or download it again") from None


def from_hf(model_or_folder, dtype: torch.dtype | None = None) -> Transformer:
    """A Transformer with the architecture and weights of a HF GPT-2/Llama/Mistral model (a PreTrainedModel
    or a local folder). dtype: None keeps the checkpoint's dtype. Dropout starts at 0 (a training choice)."""
    from .empty import attach, empty_transformer

    folder = isinstance(model_or_folder, (str, os.PathLike))
    if folder:
        hf_config, hf_sd = read_hf_folder(model_or_folder)
    else:
        hf_config, hf_sd = model_or_folder.config.to_dict(), model_or_folder.state_dict()
    cfg = config_from_hf(hf_config)
    sd = state_dict_from_hf(hf_sd, cfg)
    del hf_sd
    dtype = dtype or sd["tok_emb.weight"].dtype
    # The tensors read from a folder become the model's own (no second copy); an in-memory HF model's are copied,
    # so that the two models never share weights. Buffers (RoPE frequencies) stay fp32.
    sd = {k: v.to(dtype) if folder else v.detach().to(dtype, copy=True) for k, v in sd.items()}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    return attach(empty_transformer(cfg), sd)
