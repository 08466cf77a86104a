"""Every command that takes a model takes each of the four kinds of MODEL (`lmforge.train.resolve`): a run folder,
one checkpoint of it, a Hugging Face folder and a .gguf file — the last two a foreign model (a random HF Llama with
its own byte-level BPE, ChatML specials and chat template), the GGUF written from it as llama.cpp's converter does.
And a wrong path, a folder that holds no model, a file that is not one and an architecture lmforge lacks are each
one line.

    .venv/bin/pytest tests/train/test_resolve.py -q
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from test_artifacts import MODEL  # noqa: E402
from test_gguf import write_gguf  # noqa: E402
from test_hf_parity import make_llama  # noqa: E402

from lmforge.cli import main  # noqa: E402
from lmforge.tokenizer import ImportedTokenizer, Tokenizer  # noqa: E402
from lmforge.train.resolve import resolve_model  # noqa: E402

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")  # fmt: skip
TEXT = "".join(f"What is {i} + 1? {i + 1}\nReverse abc{i}: {str(i)[::-1]}cba\n" for i in range(40))
KINDS = ("run", "checkpoint", "hf", "gguf")
ROOT = Path(__file__).resolve().parents[2]


def chatml_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    hf.train_from_iterator([TEXT, "system user assistant\n"], trainer)
    return hf


def char_run(path: Path) -> Path:
    """A run folder as `lmforge pretrain` leaves it, in milliseconds: lmforge's char tokenizer, a 1-layer model of
    its vocabulary, checkpoints of steps 1 and 2."""
    from lmforge.config import save_config
    from lmforge.model import ModelConfig, Transformer
    from lmforge.train.checkpoint import save_checkpoint
    from lmforge.train.pretrain import PretrainConfig

    path.mkdir(parents=True)
    tok = Tokenizer.train_char([TEXT, "system user assistant hi"])
    tok.save(path)
    cfg = PretrainConfig(model=ModelConfig(**MODEL | {"vocab_size": tok.vocab_size, "max_seq_len": 512}))
    save_config(cfg, path / "config.yaml")
    for step in (1, 2):
        torch.manual_seed(step)
        save_checkpoint(path / "checkpoints", step, Transformer(cfg.model), {"step": step})
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    run = char_run(root / "run")
    tok = chatml_tokenizer()
    hf = make_llama(vocab_size=tok.get_vocab_size(), max_position_embeddings=512, bos_token_id=0, eos_token_id=1)
    folder = root / "hf"
    hf.save_pretrained(folder)  # config.json, model.safetensors, generation_config.json
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                                              "chat_template": CHATML}))  # fmt: skip
    gguf = write_gguf(root / "tiny.gguf", "llama", hf=hf, tokenizer=tok, chat_template=CHATML)
    data = root / "data"
    data.mkdir()
    (data / "text.txt").write_text(TEXT[:400])
    chats = [{"messages": [{"role": "user", "content": f"What is {i} + 1?"},
                           {"role": "assistant", "content": str(i + 1)}]} for i in range(40)]  # fmt: skip
    (data / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    pairs = [{"prompt": f"What is {i} + 1?", "chosen": str(i + 1), "rejected": str(i + 2)} for i in range(40)]
    (data / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return {"run": run, "checkpoint": run / "checkpoints" / "step_000002", "hf": folder, "gguf": gguf, "data": data}


def test_each_kind_resolves_to_its_model_and_tokenizer(models):
    hf_model, hf_tok, _ = resolve_model(models["hf"])
    gguf_model, gguf_tok, _ = resolve_model(models["gguf"])
    x = torch.tensor([hf_tok.encode("What is 3 + 1?")])
    assert gguf_tok.encode("What is 3 + 1?") == x[0].tolist() and gguf_tok.fingerprint() == hf_tok.fingerprint()
    with torch.no_grad():
        torch.testing.assert_close(gguf_model(x), hf_model(x), rtol=1e-5, atol=1e-5)
    assert isinstance(hf_tok, ImportedTokenizer) and isinstance(gguf_tok, ImportedTokenizer)
    chat = [{"role": "user", "content": "hi"}]
    assert hf_tok.render_chat(chat, True) == gguf_tok.render_chat(chat, True)
    assert hf_tok.stop_ids == gguf_tok.stop_ids == (hf_tok.token_to_id("<|im_end|>"),)
    run_model, run_tok, _ = resolve_model(models["run"])
    assert isinstance(run_tok, Tokenizer)
    step_2, _, _ = resolve_model(models["checkpoint"])
    assert all(torch.equal(a, b) for a, b in zip(run_model.state_dict().values(), step_2.state_dict().values()))


def test_eval_text_is_hfs_perplexity_on_the_same_windows(models):
    import math

    import transformers

    from lmforge.train.artifacts import evaluate_text

    result = evaluate_text(models["hf"], models["data"] / "text.txt", ctx=16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(models["hf"]).eval()
    ids = resolve_model(models["hf"])[1].encode((models["data"] / "text.txt").read_text())
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 16):
            window = torch.tensor([ids[start : start + 16]])
            if window.shape[1] > 1:
                out = hf(window, labels=window)  # HF's own shifted mean NLL over the window
                total, count = total + float(out.loss) * (window.shape[1] - 1), count + window.shape[1] - 1
    assert result["tokens"] == count
    assert abs(result["perplexity"] - math.exp(total / count)) <= 1e-4 * result["perplexity"]


def stage(name: str, *args: str):
    common = ["train.steps=1", "train.batch_size=2", "train.warmup_steps=0", "train.eval_every=1",
              "train.checkpoint_every=1", "train.progress=false", "train.precision=fp32"]  # fmt: skip
    return lambda m, d, out: [*name.split(), f"base={m}", f"runs_dir={out}", *common, *[a.format(d=d) for a in args]]


COMMANDS = {
    "generate": lambda m, d, out: ["generate", m, "--prompt", "What", "--max-new-tokens", "3", "--temperature", "0"],
    "generate --ckpt": lambda m, d, out: ["generate", "--ckpt", m, "--max-new-tokens", "3", "--temperature", "0"],
    "generate --chat": lambda m, d, out: ["generate", m, "--chat", "hi", "--max-new-tokens", "3", "--temperature", "0"],
    "chat": lambda m, d, out: ["chat", m, "--max-new-tokens", "3", "--temperature", "0"],
    "sample": lambda m, d, out: ["sample", m, "--max-new-tokens", "3"],
    "eval --text": lambda m, d, out: ["eval", m, "--text", f"{d}/text.txt", "--ctx", "8"],
    "export": lambda m, d, out: ["export", m, "--out", f"{out}/hf"],
    "sft": stage("sft", "data={d}/chats.jsonl", "n_val=4", "packing=false", "name=sft"),
    "reward train": stage("reward train", "data={d}/pairs.jsonl", "name=rm"),
    "dpo": stage("dpo", "data={d}/pairs.jsonl", "name=dpo"),
    "cai supervised": lambda m, d, out: [
        "cai",
        "supervised",
        f"policy={m}",
        f"critic={m}",
        "prompts=task:reverse",
        "n_prompts=2",
        "max_new_tokens=3",
        f"constitution={ROOT / 'configs' / 'cai' / 'constitution.yaml'}",
        f"out_dir={out}/cai",
        "sft.train.steps=1",
        "sft.train.batch_size=2",
        "sft.train.progress=false",
        "sft.train.precision=fp32",
        "sft.n_val=0",
        "sft.packing=false",
        "sft.name=cai-sft",
        f"sft.runs_dir={out}",
    ],  # fmt: skip
    "grpo": stage(
        "grpo", "task=add:digits=1", "n=2", "prompts_per_step=2", "max_new_tokens=2", "eval_n=2", "name=grpo"
    ),  # fmt: skip
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("kind", KINDS)
def test_every_command_takes_every_kind_of_model(models, kind, command, tmp_path, monkeypatch, capsys):
    argv = COMMANDS[command](str(models[kind]), str(models["data"]), str(tmp_path))
    if command == "chat":
        monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/reset\nWhat is 2 + 1?\n/exit\n"))
    assert main(argv) in (0, None), capsys.readouterr().err
    out = capsys.readouterr().out
    if command == "eval --text":
        assert "perplexity" in out
    if command == "export":
        model, tok, _ = resolve_model(tmp_path / "hf")  # the export loads as the fifth kind, with its tokenizer
        assert type(tok) is type(resolve_model(models[kind])[1])
    if command in ("sft", "dpo", "grpo"):
        model, tok, _ = resolve_model(next(p for p in tmp_path.iterdir() if p.is_dir()))
        assert tok.fingerprint() == resolve_model(models[kind])[1].fingerprint()  # the run carries its tokenizer


def test_ppo_takes_an_imported_base(models, tmp_path, capsys):
    """PPO's base and reward model: the reward run trained from the GGUF base carries its tokenizer."""
    rm = stage("reward train", "data={d}/pairs.jsonl", "name=rm")(str(models["gguf"]), str(models["data"]), tmp_path)
    assert main(rm) in (0, None)
    ppo = stage("ppo", f"reward_model={tmp_path / 'rm'}", "task=add:digits=1", "prompts_per_rollout=2",
                "minibatch=2", "ppo_epochs=1", "max_new_tokens=2", "eval_n=2", "name=ppo")  # fmt: skip
    assert main(ppo(str(models["gguf"]), str(models["data"]), tmp_path)) in (0, None), capsys.readouterr().err


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge: error: ") and "\n" not in err, err
    return err


def test_what_is_not_a_model_is_one_line(models, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "empty"): "holds no model",
        str(tmp_path / "notes.txt"): "not a GGUF model",
        str(models["data"]): "holds no model",
    }
    for path, message in cases.items():
        assert main(["generate", path, "--max-new-tokens", "1"]) == 2
        assert message in one_line_error(capsys)
    assert main(["generate", "--max-new-tokens", "1"]) == 2
    assert "give one MODEL" in one_line_error(capsys)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (other / name).write_bytes((models["hf"] / name).read_bytes())
    config = json.loads((models["hf"] / "config.json").read_text()) | {"model_type": "gemma2"}
    (other / "config.json").write_text(json.dumps(config))
    assert main(["generate", str(other), "--max-new-tokens", "1"]) == 2
    assert "gemma2" in one_line_error(capsys)


def test_eval_data_of_another_tokenizer_is_named_for_an_imported_model(models, tmp_path, capsys):
    """The tokenizer check of `eval --data` reads an imported model's tokenizer as such, not as a broken file."""
    Tokenizer.train_char(["abc"]).save(tmp_path)  # data prepared with lmforge's own tokenizer
    assert main(["eval", str(models["hf"]), "--data", str(tmp_path)]) == 2
    assert "was tokenized with another tokenizer" in one_line_error(capsys)
