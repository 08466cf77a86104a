"""Folder import/export (safetensors, sharded index, 4.x configs), refusals of what lmforge cannot reproduce,
and the tokenizer import. Parity helpers come from test_hf_parity.

    .venv/bin/pytest tests/model/test_hf_import.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_hf_parity import TOL, greedy, make_gpt2, make_llama, make_mistral, parity_error, tokens

from lmforge.config import UserError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf import HF_DEFAULTS, config_from_hf, from_hf
from lmforge.model.hf_export import save_hf, to_hf
from lmforge.tokenizer import ImportedTokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

MAKERS = {"gpt2": make_gpt2, "llama": make_llama, "mistral": make_mistral}
VOCAB_SMALL = 64


# ---- folders -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(MAKERS))
def test_save_hf_loads_in_transformers(family, tmp_path):
    hf = MAKERS[family]()
    folder = save_hf(from_hf(hf), tmp_path / "export")
    assert (folder / "model.safetensors").is_file() and not list(tmp_path.glob(".export*"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(loaded) is type(hf)
    idx = tokens(24)
    assert parity_error(loaded, hf, idx) <= TOL
    assert torch.equal(greedy(loaded, idx), greedy(hf, idx))


def test_save_hf_refuses_a_non_empty_folder_and_overwrite_replaces_only_its_files(tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    hf = make_llama()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_hf(from_hf(hf), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["stale.txt"]
    save_hf(from_hf(hf), folder, overwrite=True)
    assert (folder / "stale.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert parity_error(from_hf(folder), hf, tokens(24)) <= TOL


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_from_sharded_folder(family, tmp_path):
    hf = MAKERS[family]()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = from_hf(tmp_path)
    idx = tokens(24)
    assert parity_error(ours, hf, idx) <= TOL
    assert torch.equal(greedy(ours, idx), greedy(hf, idx))


def test_shards_outside_the_folder_are_refused(tmp_path):
    hf = make_llama()
    hf.save_pretrained(tmp_path / "m", max_shard_size="100KB")
    index = tmp_path / "m" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"].values()))
    (tmp_path / "m" / name).rename(tmp_path / name)  # one shard moved out of the folder, named by a relative path
    data["weight_map"] = {k: f"../{v}" if v == name else v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    with pytest.raises(UserError, match="inside"):
        from_hf(tmp_path / "m")


def test_4x_style_config(tmp_path):
    """A transformers 4.x config.json: `rope_theta` and `rope_scaling` with `type`, no `rope_parameters`."""
    hf = make_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    config = {k: v for k, v in hf.config.to_dict().items() if k != "rope_parameters"}
    config |= {
        "rope_theta": 5000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "transformers_version": "4.44.0",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    ours = from_hf(tmp_path)
    cfg = ours.cfg
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_theta, cfg.max_seq_len) == ("linear", 2.0, 5000.0, 64)
    assert parity_error(ours, hf, tokens(40)) <= TOL


def test_4x_style_config_minimal_defaults():
    """Keys left out fall back to transformers' class defaults (4.x wrote only the differences)."""
    cfg = config_from_hf({"model_type": "mistral", "num_hidden_layers": 2, "rope_theta": 1e6})
    assert (cfg.window, cfg.n_kv_head, cfg.norm_eps, cfg.rope_theta, cfg.d_ff) == (4096, 8, 1e-6, 1e6, 14336)


@pytest.mark.parametrize("family", list(HF_DEFAULTS))
def test_defaults_match_transformers(family):
    config_cls = {"gpt2": transformers.GPT2Config, "llama": transformers.LlamaConfig}
    config_cls |= {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}
    config_cls |= {"qwen3": transformers.Qwen3Config, "olmo2": transformers.Olmo2Config}
    reference = config_cls[family]().to_dict()
    for key, value in HF_DEFAULTS[family].items():
        if value is not None:  # None: derived in __post_init__ (head_dim, kv heads)
            assert reference[key] == value, key


def test_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(make_gpt2().config.to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        from_hf(tmp_path)


# ---- refusals ----------------------------------------------------------------------------------------
def llama_dict(**kw) -> dict:
    return make_llama().config.to_dict() | kw


@pytest.mark.parametrize(
    "config, feature",
    [
        (llama_dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "yarn"),
        (
            llama_dict(rope_scaling={"type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}),
            "longrope",
        ),
        (llama_dict(qk_norm=True), "qk_norm"),
        (llama_dict(use_qk_norm=True), "use_qk_norm"),
        (llama_dict(attention_bias=True), "attention_bias"),
        (llama_dict(mlp_bias=True), "mlp_bias"),
        (llama_dict(hidden_act="gelu"), "hidden_act"),
        (llama_dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        (llama_dict(is_causal=False), "is_causal"),
        (llama_dict(model_type="gpt_neox"), "gpt_neox"),
        (make_mistral().config.to_dict() | {"attention_bias": True}, "attention_bias"),
        (
            make_gpt2().config.to_dict() | {"scale_attn_by_inverse_layer_idx": True},
            "scale_attn_by_inverse_layer_idx",
        ),
        (make_gpt2().config.to_dict() | {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        (make_gpt2().config.to_dict() | {"activation_function": "quick_gelu"}, "quick_gelu"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_config_refusals(config, feature):
    with pytest.raises(ValueError, match=feature) as info:
        config_from_hf(config)
    assert "cannot reproduce" in str(info.value) and "\n" not in str(info.value)


def test_unknown_weights_are_refused():
    """A qk-norm checkpoint whose config says nothing: its extra tensors must not be dropped silently."""
    hf = make_llama()
    hf.model.layers[0].self_attn.register_parameter("q_norm", torch.nn.Parameter(torch.ones(16)))
    with pytest.raises(ValueError, match="q_norm"):
        from_hf(hf)


def test_pretraining_tp_is_harmless():
    """transformers 5.x no longer reads pretraining_tp (4.x split matmuls by it: same math)."""
    hf = make_llama(pretraining_tp=2)
    assert parity_error(from_hf(hf), hf, tokens(24)) <= TOL


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(position="alibi"), "position"),
        (dict(position="rope", norm="layernorm", ffn="swiglu", bias=False), "norm"),
        (dict(position="learned", norm="layernorm", ffn="swiglu"), "ffn"),
        (dict(position="learned", norm="layernorm", bias=False), "bias"),
        (dict(position="rope", norm="rmsnorm", ffn="swiglu", bias=True, window=8), "bias"),
        (dict(norm_position="post"), "norm_position"),
        (dict(attention="linear"), "attention"),
    ],
)
def test_to_hf_refusals(changes, field):
    model = Transformer(ModelConfig(vocab_size=VOCAB_SMALL, n_layer=1, d_model=32, n_head=2, **changes))
    with pytest.raises(ValueError, match=field):
        to_hf(model)


# ---- tokenizer -------------------------------------------------------------------------------------------
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
TEXT = "def add(a, b):\n    return a + b  # héllo"


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([TEXT, "def sub(a, b):\n    return a - b"] * 20, trainer=trainer)
    return tok


@pytest.mark.parametrize("where", ["tokenizer_config", "jinja", "none"])
def test_hf_folder_tokenizer_and_template(where, tmp_path):
    tiny_tokenizer().save(str(tmp_path / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>"}
    if where == "tokenizer_config":
        config["chat_template"] = TEMPLATE
    elif where == "jinja":  # chat_template.jinja wins, as in transformers
        config["chat_template"] = "overridden"
        (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = ImportedTokenizer.from_folder(tmp_path)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and len(ids) < len(TEXT.encode())
    assert tok.chat_template == (None if where == "none" else TEMPLATE)


def test_hf_folder_eos_from_the_generation_config(tmp_path):
    tiny_tokenizer().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0]}))
    assert ImportedTokenizer.from_folder(tmp_path).stop_ids == (0,)
    (tmp_path / "generation_config.json").unlink()
    with pytest.raises(UserError, match="no eos_token"):
        ImportedTokenizer.from_folder(tmp_path)


def test_save_hf_with_tokenizer(tmp_path):
    folder = save_hf(from_hf(make_gpt2()), tmp_path / "out", tokenizer=tiny_tokenizer(), chat_template=TEMPLATE)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    tok = ImportedTokenizer.from_folder(folder)
    assert tok.decode(tok.encode(TEXT)) == TEXT and tok.chat_template == TEMPLATE
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert hf_tok.decode(hf_tok(TEXT)["input_ids"]) == TEXT and hf_tok.chat_template == TEMPLATE


def test_an_unsupported_hf_folder_is_one_line_from_the_cli(tmp_path, capsys):
    import json

    from safetensors.torch import save_file

    from lmforge.cli import main
    from lmforge.tokenizer import Tokenizer

    Tokenizer.train_char(["abc"]).save(tmp_path)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen9", "architectures": ["Qwen9ForCausalLM"]}))
    assert main(["sample", str(tmp_path), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unsupported Hugging Face checkpoint: model_type 'qwen9'" in err
