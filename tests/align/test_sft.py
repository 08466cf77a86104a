"""SFT: the assistant-only loss against a hand computation, packing, and end-to-end runs (full and LoRA) from a
tiny pretrained base, whose run folders later stages load like any other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.align.sft import SFTConfig, masked_lm_loss, pack, sft_flops_per_token
from lmforge.config import load_config
from lmforge.model import ModelConfig, Transformer


def test_masked_loss_is_the_mean_over_assistant_targets_only():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=20, max_seq_len=8, n_layer=1, d_model=16, n_head=2))
    rows = torch.randint(0, 20, (2, 7))
    masks = torch.tensor([[0, 0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0, 1]])
    logp = F.log_softmax(model(rows[:, :-1]).float(), -1)
    picked = [-logp[b, t - 1, rows[b, t]] for b in range(2) for t in range(1, 7) if masks[b, t]]
    expected = torch.stack(picked).mean()  # by hand: targets at masked positions, predicted one step earlier
    torch.testing.assert_close(masked_lm_loss(model, (rows, masks)), expected)


def test_sft_flops_count_the_head_where_it_runs_and_no_weight_gradients_under_lora():
    cfg = ModelConfig(vocab_size=1000, max_seq_len=64, n_layer=2, d_model=32, n_head=4)
    head, blocks = 1000 * 32, cfg.param_counts()["blocks"]
    assert sft_flops_per_token(cfg, 64, 1.0, frozen=False) == cfg.flops_per_token(64)  # PaLM's 6·N + attention
    attention = cfg.flops_per_token(64) - 6 * (blocks + head)
    assert sft_flops_per_token(cfg, 64, 0.25, frozen=True) == 4 * (blocks + 0.25 * head) + attention


def test_packing_cuts_one_stream_and_padding_keeps_one_conversation_per_row():
    rendered = [([1, 2, 3, 4], [0, 0, 1, 1]), ([1, 5, 6], [0, 1, 1]), ([1, 7, 8, 9, 10], [0, 0, 0, 1, 1])]
    x, m, d = pack(rendered, seq_len=4, pad_id=0)
    stream = [1, 2, 3, 4, 1, 5, 6, 1, 7, 8, 9, 10]
    assert x.tolist() == [stream[0:5], stream[4:9]]  # windows of T + 1 overlapping by one token
    assert m.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]]
    assert d.tolist() == [[0, 0, 0, 0, 1], [1, 1, 1, 2, 2]]  # the conversation each token belongs to
    x, m, _ = pack(rendered, seq_len=4, pad_id=0, packing=False)
    assert x.tolist() == [[1, 2, 3, 4, 0], [1, 5, 6, 0, 0], [1, 7, 8, 9, 10]]
    assert m[1].tolist() == [0, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="fewer than one window"):
        pack(rendered[:1], seq_len=8, pad_id=0)


@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
def test_a_packed_row_scores_each_conversation_as_if_alone(position):
    """Three conversations packed into one row: every target's log-prob equals that conversation's own forward
    (positions restart, attention stays inside it) to 1e-5; without the document mask they do not."""
    from lmforge.align.sft import document_positions

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=20, max_seq_len=16, n_layer=2, d_model=16, n_head=2,
                                    position=position, init_std=0.2)).eval()  # fmt: skip
    docs = [[1, 4, 5, 6], [1, 7, 8], [1, 9, 3, 2, 5]]
    rows, masks, ids = pack([(d, [1] * len(d)) for d in docs], seq_len=11, pad_id=0)
    positions, same = document_positions(ids[:, :-1])
    with torch.no_grad():
        packed = F.log_softmax(model(rows[:, :-1], positions=positions, attn_mask=same).float(), -1)[0]
        naive = F.log_softmax(model(rows[:, :-1]).float(), -1)[0]  # the old convention: one 11-token sequence
        start = 0
        for d in docs:
            alone = F.log_softmax(model(torch.tensor([d])).float(), -1)[0]
            n = min(len(d), 11 - start)  # the last conversation is cut by the window
            torch.testing.assert_close(packed[start : start + n], alone[:n], atol=1e-5, rtol=0)
            start += len(d)
    assert (packed[4:] - naive[4:]).abs().max() > 1e-3  # cross-talk changes the later conversations
    loss = masked_lm_loss(model, (rows, masks, ids))
    with torch.no_grad():
        targets = rows[0, 1:]
        expected = -torch.stack([packed[t, targets[t]] for t in range(11) if masks[0, t + 1]]).mean()
    torch.testing.assert_close(loss, expected)


def sft_config(root, base, chats, name, *extra):
    from lmforge.align.sft import SFTConfig

    overrides = [f"base={base}", f"data={chats}", f"runs_dir={root / 'runs'}", f"name={name}", "n_val=40",
                 "train.steps=6", "train.batch_size=4", "train.warmup_steps=1", "train.eval_every=3",
                 "train.checkpoint_every=3", "train.progress=false", "train.precision=fp32", *extra]  # fmt: skip
    return load_config(SFTConfig, None, overrides)


def test_full_sft_run_loads_like_a_pretraining_run(base_run):
    from lmforge.align.sft import run
    from lmforge.infer.loading import load_for_inference

    root, base, chats, _ = base_run
    run_dir = run(sft_config(root, base, chats, "full"))
    rows = run_dir.read_metrics()
    assert rows[-1]["step"] == 6 and "val_loss" in rows[-1]
    model, tok = load_for_inference(run_dir.path)  # config.yaml carries the base's model section
    base_model, _ = load_for_inference(base)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, base_model.get_parameter(n))]
    assert changed  # full fine-tuning moved the weights


def test_lora_run_saves_adapters_alone_and_its_last_checkpoint_is_the_merge(base_run):
    from lmforge.align.lora import load_adapters, merge_lora
    from lmforge.align.sft import run
    from lmforge.infer.loading import load_for_inference

    root, base, chats, _ = base_run
    run_dir = run(sft_config(root, base, chats, "lora", "lora.enabled=true", "lora.rank=2", "train.lr=1e-2"))
    merged, _ = load_for_inference(run_dir.path)
    rebuilt, _ = load_for_inference(base)
    load_adapters(rebuilt, run_dir.path / "adapters.safetensors")
    merge_lora(rebuilt)
    for name, p in merged.named_parameters():
        torch.testing.assert_close(p, rebuilt.get_parameter(name), rtol=1e-6, atol=1e-7)
    base_model, _ = load_for_inference(base)
    untouched = [n for n, _ in base_model.named_parameters() if n.rpartition(".")[2] != "weight" or "attn" not in n]
    for name in untouched:  # everything outside the adapted projections is bit-identical to the base
        assert torch.equal(merged.get_parameter(name), base_model.get_parameter(name)), name


def test_missing_data_is_a_one_line_error(base_run, capsys):
    from lmforge.cli import main

    root, base, _, _ = base_run
    assert main(["sft", f"base={base}", f"data={root / 'nope.jsonl'}", f"runs_dir={root / 'runs'}"]) == 2
    assert "no SFT data" in capsys.readouterr().err
    assert SFTConfig  # the dataclass is importable without torch work


def test_data_too_small_or_a_bad_task_is_one_line(base_run, tmp_path, capsys):
    import json

    from lmforge.cli import main

    root, base, _, _ = base_run
    short = tmp_path / "short.jsonl"
    chat = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    short.write_text(json.dumps({"messages": chat}))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    runs = f"runs_dir={tmp_path / 'runs'}"
    for argv, message in [
        ([f"base={base}", f"data={short}"], "fewer than one window of 33: give more conversations, a smaller seq_len"),
        ([f"base={base}", f"data={empty}"], "holds no conversations"),
        ([f"base={base}", "data=task:add:digits=1", "n_train=5000"], "n_train=5000: add:digits=1: cannot draw"),
        ([f"base={tmp_path / 'no-base'}", "data=task:nosuch"], "unknown task 'nosuch'"),  # before the base loads
    ]:
        assert main(["sft", *argv, runs]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)


def test_a_config_built_in_python_is_validated_as_one_line(base_run):
    from lmforge.align.sft import run
    from lmforge.config import ConfigError

    _, base, _, _ = base_run
    with pytest.raises(ConfigError, match="n_train must be positive"):
        run(SFTConfig(base=str(base), n_train=0))


def test_resume_refuses_to_turn_lora_on_or_change_the_base_in_one_line(base_run, tmp_path, capsys):
    from lmforge.cli import main

    root, base, chats, _ = base_run
    common = [f"runs_dir={tmp_path}", "name=s", "train.progress=false", "train.precision=fp32"]
    assert main(["sft", f"base={base}", f"data={chats}", "train.steps=2", "train.batch_size=2", *common]) in (0, None)
    config = (tmp_path / "s" / "config.yaml").read_bytes()
    for change, key in (("lora.enabled=true", "lora.enabled"), (f"base={root}", "base")):
        capsys.readouterr()
        assert main(["sft", *common, "--resume", change]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"cannot change what the checkpoint was trained as: {key}" in err
    assert (tmp_path / "s" / "config.yaml").read_bytes() == config
    assert main(["sft", *common, "--resume", "train.steps=3"]) in (0, None)  # more steps: fine
