"""GGUF export: an lmforge Llama-style model and its byte-level BPE tokenizer as a llama.cpp model file, so a model
trained or tuned here runs in llama.cpp and ollama (`lmforge export --to gguf MODEL --out F.gguf --quantize q8_0`).

    save_gguf(model, tokenizer, "model.gguf", quantize="f32")     # f32 | f16 | q8_0 (norms stay f32)

The file is what llama.cpp's `convert_hf_to_gguf.py` writes for the model's HF export (architecture `llama`): the
same metadata keys, tensor names (from the `gguf` package's own table) and q/k row order (llama.cpp interleaves
each head's RoPE pairs; `gguf.py` undoes it on import). Written by the `gguf` package's writer to a temporary
file beside the target, then renamed. A model llama.cpp's `llama` architecture cannot express (biases, learned or
ALiBi positions, GELU, LayerNorm, post-norms, QK-norm, sliding windows) and a tokenizer that is not byte-level BPE
are refused in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np

from lmforge.config import UserError

from .config import ModelConfig
from .gguf import PERMUTED, _gguf_names, _permute, _projection
from .transformer import Transformer

QUANTS = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0}  # fmt: skip
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}  # fmt: skip


def check_exportable(cfg: ModelConfig) -> None:
    """UserError naming the first field llama.cpp's llama architecture has no equivalent for."""
    wanted = {"position": ("rope",), "ffn": ("swiglu",), "norm": ("rmsnorm",), "norm_position": ("pre",),
              "bias": (False,), "qkv_bias": (False,), "qk_norm": (None,), "window": (None,),
              "attention": ("sdpa", "naive"), "rope_scaling": (None,)}  # fmt: skip
    for field, allowed in wanted.items():
        if getattr(cfg, field) not in allowed:
            raise UserError(f"export --to gguf: {field}={getattr(cfg, field)!r} has no llama.cpp 'llama' equivalent "
                            f"(needs {field} in {allowed}); export --to hf instead")  # fmt: skip


def _tokenizer_fields(writer: gguf.GGUFWriter, tokenizer) -> None:
    spec = json.loads(tokenizer.hf.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UserError("export --to gguf: llama.cpp reads byte-level BPE tokenizers; this one is "
                        f"{model.get('type', 'unknown')} (train it with --kind bpe)")  # fmt: skip
    vocab = tokenizer.vocab_size
    tokens = [tokenizer.id_to_token(i) for i in range(vocab)]
    special = set(getattr(tokenizer, "special_ids", {}).values()) | {
        t["id"] for t in spec.get("added_tokens", []) if t.get("special")}  # fmt: skip
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    pre = tokenizer.gguf_pre()  # the name llama.cpp splits text by, as this tokenizer does
    if pre is None:
        raise UserError("export --to gguf: the tokenizer splits text in a way llama.cpp has no name for (known: "
                        "GPT-2, SmolLM, Llama 3, Qwen 2); export --to hf instead")  # fmt: skip
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(vocab)])
    writer.add_token_merges(merges)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, tokenizer.eos_id),
                          (writer.add_pad_token_id, tokenizer.pad_id)):  # fmt: skip
        if token_id is not None:
            add(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos", False)))
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)


def save_gguf(model: Transformer, tokenizer, path: str | os.PathLike, quantize: str = "f32") -> Path:
    """Write `model` and `tokenizer` as a GGUF file (see the module docstring); returns the path."""
    if quantize not in QUANTS:
        raise UserError(f"export --to gguf --quantize {quantize!r}: choose one of {', '.join(QUANTS)}")
    cfg = model.cfg
    check_exportable(cfg)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(path.stem)
    writer.add_file_type(FILE_TYPES[quantize])
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.d_model // cfg.n_head:  # heads narrower or wider than d / n_head (Qwen3's)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    _tokenizer_fields(writer, tokenizer)

    sd = model.state_dict()
    Q = gguf.GGMLQuantizationType
    for name, ours in _gguf_names(cfg, arch).items():  # the importer's table: the names it reads back
        w = sd[ours].detach().float().cpu()
        projection = _projection(ours)
        if projection in PERMUTED:  # q and k rows interleaved per head, as the llama architecture expects
            w = _permute(w, getattr(cfg, PERMUTED[projection]))
        data = w.numpy()
        qtype = QUANTS[quantize] if data.ndim == 2 else Q.F32  # norms stay f32
        if qtype == Q.Q8_0 and data.shape[-1] % 32:  # Q8_0 packs rows in blocks of 32: F16, as llama.cpp falls back
            qtype = Q.F16
        if qtype == Q.F16:
            writer.add_tensor(name, data.astype(np.float16))
        elif qtype == Q.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return path
