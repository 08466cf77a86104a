"""GGUF import: llama.cpp's model files (architectures llama, Mistral-style llama, qwen2 and qwen3) into an lmforge
`Transformer` with the logits `from_hf` gives for the checkpoint the file was converted from (F32 tensors: ≤1e-4
relative; tests/model/test_gguf.py checks it against transformers).

    from lmforge.model.gguf import from_gguf, gguf_metadata, gguf_model_config, load_gguf
    model = from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")            # eval mode, fp32
    model, meta = load_gguf("model.gguf")      # both from one parse
    model = from_gguf("model.gguf", dtype=torch.bfloat16)
    meta = gguf_metadata("model.gguf")         # every key/value: tokenizer.ggml.*, tokenizer.chat_template, ...
    cfg = gguf_model_config(meta, tensor_names)  # the ModelConfig alone (tensor names: is there an output.weight?)

The container is parsed by `gguf_file.py` (a typed binary format, bounds-checked; nothing is unpickled), and the
`gguf` package, llama.cpp's own, dequantizes its tensors (Q8_0, Q4_1, K-quants, ...) once, at load; transformers
is never imported. The model then holds plain `dtype` weights with the values the file encodes. Anything lmforge
cannot reproduce exactly (another architecture, scaled or partial RoPE, Llama 3's per-frequency RoPE factors,
experts, tensors the metadata does not explain) is refused with a one-line UserError
rather than imported with different math.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Collection
from typing import Any

import gguf
import numpy as np
import torch

from lmforge.config import UserError

from .config import ModelConfig
from .empty import attach, empty_transformer
from .gguf_file import GGUFFile
from .hf import _llama_names, config_from_hf
from .transformer import Transformer

ARCHITECTURES = ("llama", "qwen2", "qwen3")
REQUIRED = ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.layer_norm_rms_epsilon")  # fmt: skip
# Names of the q and k projections (weight and bias) that llama.cpp's converter permutes for the llama architecture
PERMUTED = {"attn.wq": "n_head", "attn.wk": "n_kv_head"}


def _refuse(source: str, what: str) -> UserError:
    return UserError(f"{source}: {what} is not supported; lmforge cannot reproduce it exactly")


def _open(path: str | os.PathLike, source: str) -> GGUFFile:
    """The file, memory-mapped read-only (`lmforge.model.gguf_file`). A missing path is the OS's own error."""
    try:
        return GGUFFile.open(path)
    except (ValueError, struct.error, OverflowError) as e:  # FormatError, bad UTF-8, unknown type codes
        raise UserError(f"{source} is not a GGUF file or is truncated ({e}); convert or download it again") from None


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Every key/value of a GGUF file as plain Python values (str, int, float, bool, lists of those), without the
    `GGUF.*` header fields. Arrays such as tokenizer.ggml.tokens come back as lists."""
    return _open(path, str(path)).metadata


# ---- config: GGUF metadata -> ModelConfig ---------------------------------------------------------------
def gguf_model_config(
    metadata: dict[str, Any], tensor_names: Collection[str], *, source: str = "GGUF file"
) -> ModelConfig:
    """The ModelConfig of a GGUF file from its metadata and tensor names (a file without `output.weight` ties
    the LM head to the embedding). It is built by from_hf's own mapping, so it is what from_hf builds for the
    Hugging Face checkpoint the file was converted from (bar init_std, which GGUF does not record)."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise _refuse(source, f"general.architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})")

    def get(key: str, default: Any = None, kind: type | tuple[type, ...] = int) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        # bool is an int to Python; a list is a per-layer value (llama.cpp allows some), which lmforge has not
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise _refuse(source, f"{arch}.{key} = {repr(value)[:60]}")
        return value

    missing = [f"{arch}.{key}" for key in REQUIRED if f"{arch}.{key}" not in metadata]
    if missing:
        raise UserError(f"{source} lacks {', '.join(missing)}: not a complete llama.cpp model; convert it again")
    scaling = get("rope.scaling.type", kind=str)
    if scaling not in (None, "none"):
        raise _refuse(source, f"{arch}.rope.scaling.type {scaling!r} (only unscaled RoPE)")
    for key in ("rope.scaling.factor", "rope.scale_linear"):  # a factor alone means linear scaling to llama.cpp
        factor = get(key, kind=(int, float))
        if scaling is None and factor not in (None, 0, 1):
            raise _refuse(source, f"{arch}.{key} {factor} (scaled RoPE)")
    if "rope_freqs.weight" in tensor_names:
        raise _refuse(source, "the tensor rope_freqs.weight (per-frequency RoPE factors, Llama 3.1's scaling)")
    experts = get("expert_count")
    if experts:
        raise _refuse(source, f"{arch}.expert_count {experts} (mixture of experts)")
    window = get("attention.sliding_window")
    if window is not None and arch != "llama":  # Qwen's window covers only some layers: from_hf refuses it too
        raise _refuse(source, f"{arch}.attention.sliding_window {window}")

    n_head = get("attention.head_count")
    head_dim = get("attention.key_length") or get("embedding_length") // max(n_head, 1)
    for key in ("rope.dimension_count", "attention.value_length"):
        width = get(key)
        if width is not None and width != head_dim:
            what = "partial rotary" if key.startswith("rope") else "values narrower or wider than keys"
            raise _refuse(source, f"{arch}.{key} {width} with head_dim {head_dim} ({what})")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens) if isinstance(tokens, list) else None)
    if not vocab:
        raise UserError(f"{source} has neither {arch}.vocab_size nor tokenizer.ggml.tokens: convert it again")

    hf = {
        "model_type": "mistral" if window else arch,  # the HF family (and defaults) of the converted checkpoint
        "vocab_size": vocab,
        "hidden_size": get("embedding_length"),
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": get("attention.head_count_kv") or n_head,
        "head_dim": get("attention.key_length"),
        "max_position_embeddings": get("context_length"),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", kind=(int, float)),
        "rope_theta": get("rope.freq_base", 10000.0, kind=(int, float)),  # llama.cpp's default too
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",  # the three architectures' FFN is SwiGLU by definition in llama.cpp
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }
    if window:
        hf["sliding_window"] = window
    try:
        cfg = config_from_hf(hf)
    except ValueError as e:  # ModelConfig's checks on the file's numbers (heads that do not divide d, ...)
        raise UserError(f"{source}: its metadata describes no valid model ({e})") from None
    cfg.extra["gguf"] = {"architecture": arch, "name": metadata.get("general.name")}
    return cfg


# ---- weights ----------------------------------------------------------------------------------------------
def _gguf_names(cfg: ModelConfig, arch: str | None = None) -> dict[str, str]:
    """GGUF tensor name -> lmforge name: from_hf's list of tensors for this config, renamed by llama.cpp's own
    HF -> GGUF table (the one its converter uses), so both imports, and the export, name the same tensors.
    `arch`: the file's architecture (default: the one the config was imported from)."""
    arch = arch or cfg.extra["gguf"]["architecture"]
    table = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], cfg.n_layer)
    names = {table.get_name(hf, try_suffixes=(".weight", ".bias")): ours for hf, ours in _llama_names(cfg).items()}
    if None in names:
        raise RuntimeError(f"gguf's tensor table lacks a {arch} name lmforge needs")  # a gguf version we do not know
    if not cfg.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    return names


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), which reorders each head's rows of q and k
    from HF's half-split RoPE pairs (i, i + d/2) to ggml's interleaved pairs (2i, 2i + 1)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """What llama.cpp's converter does (the inverse of `_unpermute`), for GGUF export."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _projection(name: str) -> str:
    """blocks.3.attn.wq.weight -> attn.wq (the key of PERMUTED)."""
    return name.split(".", 2)[-1].rpartition(".")[0]


CHUNK_VALUES = 1 << 20  # values dequantized at a time (4 MB of float32): the transient, whatever the tensor's size


def _tensor(t, dtype: torch.dtype, source: str) -> torch.Tensor:
    """One tensor of the file as a torch tensor of `dtype` that owns its memory: allocated once, and filled from
    the file (quantized rows a chunk at a time, so the float32 scratch stays small). Never a view of the file: the
    reader maps it read-only, so an in-place write to such a weight (an optimizer step, a LoRA merge) would crash,
    and the model would keep the file mapped for as long as it lives."""
    kinds = gguf.GGMLQuantizationType
    shape = tuple(int(n) for n in reversed(t.shape))  # ggml lists dimensions fastest first: [in, out]
    data = np.asarray(t.data)
    if t.tensor_type == kinds.BF16 and dtype == torch.bfloat16:  # numpy has no bfloat16: move the bits as they are
        return torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16).reshape(shape)
    if t.tensor_type in (kinds.F32, kinds.F16) and dtype in (torch.float32, torch.float16):
        return torch.from_numpy(data.astype(np.float32 if dtype == torch.float32 else np.float16)).reshape(shape)
    out = torch.empty(shape, dtype=dtype)
    rows = out.view(data.shape[0], -1) if data.ndim == 2 else out.view(1, -1)
    data = data if data.ndim == 2 else data.reshape(1, -1)
    step = max(1, CHUNK_VALUES // max(rows.shape[1], 1))
    for start in range(0, data.shape[0], step):
        try:  # quantized blocks run along a row, so a slice of rows dequantizes on its own
            values = gguf.quants.dequantize(data[start : start + step], t.tensor_type)
        except NotImplementedError:
            raise _refuse(source, f"tensor {t.name} of type {t.tensor_type.name} (gguf cannot dequantize it)") from None
        values = values if values.flags.writeable else values.copy()  # F32 "dequantized" is a view of the file
        rows[start : start + step] = torch.from_numpy(np.ascontiguousarray(values)).view(-1, rows.shape[1])
    return out


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[Transformer, dict[str, Any]]:
    """(`from_gguf`'s model, `gguf_metadata`'s dict) from one parse of the file (the tokenizer's 49k tokens and
    merges take the `gguf` parser seconds)."""
    return _load(path, dtype)


def from_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Transformer:
    """A Transformer (eval mode) with the architecture and weights of a llama.cpp GGUF file; quantized tensors
    are dequantized to `dtype`. RoPE's frequencies stay fp32, as in from_hf."""
    return _load(path, dtype)[0]


def _load(path: str | os.PathLike, dtype: torch.dtype) -> tuple[Transformer, dict[str, Any]]:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UserError(f"dtype must be a floating-point torch dtype, got {dtype!r}")
    source = str(path)
    reader = _open(path, source)
    tensors = {t.name: t for t in reader.tensors}
    metadata = reader.metadata
    cfg = gguf_model_config(metadata, tensors.keys(), source=source)
    # Built on the meta device, the model allocates nothing: each weight is made once, from the file, and assigned.
    model = empty_transformer(cfg)
    expected = model.state_dict()
    permuted = cfg.extra["gguf"]["architecture"] == "llama"  # qwen2 and qwen3 are converted unpermuted
    sd: dict[str, torch.Tensor] = {}
    for name, ours in _gguf_names(cfg).items():
        t = tensors.pop(name, None)
        if t is None:
            raise UserError(f"{source} lacks the tensor {name} that its metadata implies; convert or download it again")
        w = _tensor(t, dtype, source)
        reader.release_pages()
        if w.shape != expected[ours].shape:
            raise UserError(
                f"{source}: tensor {name} has shape {tuple(w.shape)}, its metadata implies "
                f"{tuple(expected[ours].shape)}; convert or download it again"
            )
        projection = _projection(ours)
        sd[ours] = _unpermute(w, getattr(cfg, PERMUTED[projection])) if permuted and projection in PERMUTED else w
    if tensors:
        left = sorted(tensors)
        raise _refuse(source, f"the tensors {left[:4]}{' ...' if len(left) > 4 else ''} (unknown to its architecture)")
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    return attach(model, sd), metadata
