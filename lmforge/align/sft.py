"""Supervised fine-tuning: chat-formatted examples, the loss on the assistant's tokens only, packing, full
fine-tuning or LoRA, through the one training loop.

    lmforge sft --config configs/sft/arith.yaml base=runs/arith-base name=arith-sft
    lmforge sft --config configs/sft/arith.yaml lora.enabled=true lora.rank=8          # adapters only
    lmforge sft --config configs/sft/arith.yaml data=chats.jsonl                        # {"messages": [...]} lines

Data is a task spec (`task:add:digits=3`, examples from `lmforge.data.tasks`, held-out prompts never trained
on) or a JSONL file of conversations. Each conversation is rendered with the tokenizer's chat template; the
loss mask is 1 on assistant content and its closing <|end|> (`Tokenizer.render_chat`).

The run folder holds config.yaml (with the base model's `model` section, so every later stage loads it like a
pretraining run), metrics.jsonl, checkpoints, tokenizer.json, and with LoRA `adapters.safetensors` (the
adapters alone). A finished LoRA run's last checkpoint holds the merged weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.config import UserError
from lmforge.model import ModelConfig
from lmforge.runs import RunDir
from lmforge.train.loop import TrainConfig, Trainer, seed_everything

from .lora import LoRAConfig, apply_lora, finish_lora_run
from .stage import check_config, config_examples, create_run, load_base


@dataclass
class SFTConfig:
    base: str = "runs/tiny"  # the run folder fine-tuned
    data: str = "task:add:digits=3"  # task:SPEC or a JSONL file of {"messages": [...]}
    name: str | None = None
    runs_dir: str = "runs"
    resume: bool = False
    n_train: int = 20_000  # examples drawn from a task (its train split)
    n_val: int = 500  # held-out examples (task held-out split, or the JSONL's last ones) for the val loss
    seq_len: int | None = None  # packed window; None: the base model's max_seq_len
    packing: bool = True  # concatenate conversations into full windows (no padding); else one per row
    seed: int = 0
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            steps=300, batch_size=16, lr=1e-3, min_lr=1e-4, warmup_steps=20, eval_every=100, checkpoint_every=100
        )  # fmt: skip
    )
    model: ModelConfig | None = None  # copied from the base run; not set by hand

    def validate(self) -> None:
        if self.n_train <= 0 or self.n_val < 0:
            raise ValueError(f"n_train must be positive and n_val ≥ 0, got {self.n_train} and {self.n_val}")
        if self.data.startswith("task:"):
            from lmforge.data.tasks import get_task

            get_task(self.data.removeprefix("task:"))  # a bad spec fails here, before the base model loads


# ---- data -----------------------------------------------------------------------------------------------


def conversations(cfg: SFTConfig) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, val) conversations from a task spec or a JSONL file."""
    if cfg.data.startswith("task:"):
        from lmforge.data.tasks import get_task

        task = get_task(cfg.data.removeprefix("task:"))
        train = [e.messages() for e in config_examples(task, "train", cfg.n_train, cfg.seed, "n_train")]
        val = [e.messages() for e in config_examples(task, "heldout", cfg.n_val, cfg.seed, "n_val")]
        return train, val
    from lmforge.data.chat_jsonl import load_jsonl_messages

    path = Path(cfg.data)
    if not path.is_file():
        raise FileNotFoundError(f"no SFT data at {path}: give task:SPEC (e.g. task:add:digits=3) or a JSONL file")
    chats = load_jsonl_messages(path)
    if not chats:
        raise UserError(f'{path} holds no conversations: give {{"messages": [...]}} lines')
    n_val = min(cfg.n_val, len(chats) // 10)  # keep ≥ 90% for training on small files
    return chats[: len(chats) - n_val], chats[len(chats) - n_val :]


def render(tokenizer, chats: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
    return [tokenizer.render_chat(c) for c in chats]


def pack(
    rendered: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int, packing: bool = True, what: str = "the data"
):
    """Rows of seq_len + 1 tokens, their loss masks and each token's document (conversation) number, as
    [M, seq_len + 1] tensors.

    Packing concatenates every conversation (each starts with <|bos|>) and cuts the stream into windows, so
    no compute is spent on padding; a conversation may straddle two windows. The document numbers keep the
    conversations of a window apart: `masked_lm_loss` restarts positions at each and lets each attend only to
    itself, so a packed row's logits are those of each conversation alone (no cross-talk). Without packing
    each conversation is one row, padded (mask 0) or cut."""
    if packing:
        ids = [t for r in rendered for t in r[0]]
        mask = [m for r in rendered for m in r[1]]
        doc = [i for i, r in enumerate(rendered) for _ in r[0]]
        n = (len(ids) - 1) // seq_len
        if n <= 0:
            raise UserError(f"{what} has {len(ids)} tokens, fewer than one window of {seq_len + 1}: give more "
                            "conversations, a smaller seq_len, or packing=false")  # fmt: skip
        x, m, d = (torch.tensor(v[: n * seq_len + 1]) for v in (ids, mask, doc))
        starts = torch.arange(n) * seq_len
        window = starts[:, None] + torch.arange(seq_len + 1)
        return x[window], m[window], d[window]
    rows = torch.full((len(rendered), seq_len + 1), pad_id, dtype=torch.long)
    masks = torch.zeros(len(rendered), seq_len + 1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rendered):
        ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
        rows[i, : len(ids)], masks[i, : len(mask)] = torch.tensor(ids), torch.tensor(mask)
    return rows, masks, torch.zeros_like(rows)


def document_positions(docs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, T] restarting at 0 where each document starts, attention [B, T, T]: same document) for a
    row of packed documents, numbered by `docs` [B, T] (a document's tokens are contiguous)."""
    T = docs.shape[1]
    index = torch.arange(T, device=docs.device).expand_as(docs)
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values  # the doc's first index
    return index - first, docs[:, :, None] == docs[:, None, :]


def sft_flops_per_token(model: ModelConfig, seq_len: int, head_fraction: float, frozen: bool) -> float:
    """Training FLOPs per token of SFT as `masked_lm_loss` runs it: the LM head only on the `head_fraction` of
    tokens that are trained on (logits_at), and with frozen weights (LoRA) no weight gradients — 4·N where full
    fine-tuning does 6·N (PaLM's count, as `ModelConfig.flops_per_token`; the adapters' own are left out)."""
    blocks = model.param_counts()["blocks"]
    head = model.vocab_size * model.d_model
    attention = 12 * model.n_layer * model.q_dim * seq_len
    return (4 if frozen else 6) * (blocks + head_fraction * head) + attention


def masked_lm_loss(model, batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose *target* has mask 1 (the assistant's tokens); rows
    holding several conversations (packed) see each conversation alone."""
    rows, masks, *docs = batch
    forward = {}
    if docs and bool((docs[0][:, 1:] != docs[0][:, :-1]).any()):
        positions, same_doc = document_positions(docs[0][:, :-1])
        forward = {"positions": positions, "attn_mask": same_doc}
    targets = masks[:, 1:].bool()
    logits = model(rows[:, :-1], logits_at=targets, **forward)  # [N, V]: only where a target is trained on
    return F.cross_entropy(logits.float(), rows[:, 1:][targets]) if targets.any() else logits.sum() * 0.0


# ---- run ------------------------------------------------------------------------------------------------


def run(cfg: SFTConfig) -> RunDir:
    seed_everything(cfg.train.seed)  # before any weights are made: the same seed reproduces the run
    from lmforge.train.checkpoint import latest_checkpoint

    check_config(cfg)
    model, tokenizer = load_base(cfg)
    seq_len = cfg.seq_len or cfg.model.max_seq_len
    train_chats, val_chats = conversations(cfg)
    train_rows = pack(render(tokenizer, train_chats), seq_len, tokenizer.pad_id, cfg.packing)
    val_rows = (pack(render(tokenizer, val_chats), seq_len, tokenizer.pad_id, cfg.packing, "the held-out data (n_val)")
                if val_chats else None)  # fmt: skip

    if cfg.lora.enabled:
        wrapped = apply_lora(model, cfg.lora)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"LoRA rank {cfg.lora.rank} on {len(wrapped)} layers: {trainable:,} of {total:,} parameters train")
    run_dir = create_run(cfg, tokenizer)
    if cfg.resume and cfg.lora.enabled:
        last = latest_checkpoint(run_dir.checkpoints)
        if last is not None and "merged" in (last / "info.json").read_text():
            raise FileExistsError(f"{run_dir.path} is a finished LoRA run (its last checkpoint is merged): "
                                  "start a new run with base=" + str(run_dir.path))  # fmt: skip
    tcfg = cfg.train

    def batch_fn(step: int, part: int, n_parts: int):
        # A fixed permutation per epoch, the same whatever the ranks and micro-batches (exact resume needs only
        # step); the step's batch_size rows are consecutive in it, and this part is its share of them.
        per_epoch = len(train_rows[0]) // tcfg.batch_size or 1
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(len(train_rows[0]), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        rows = tcfg.batch_size // n_parts
        idx = order[(k * tcfg.batch_size + part * rows + torch.arange(rows)) % len(order)]  # wraps if data is short
        return train_rows[0][idx], train_rows[1][idx], train_rows[2][idx]

    def eval_fn(m) -> dict[str, float]:
        if val_rows is None:
            return {}
        total, weight = 0.0, 0.0
        with torch.no_grad():
            for i in range(0, len(val_rows[0]), 16):
                batch = tuple(t[i : i + 16] for t in val_rows)
                w = batch[1][:, 1:].sum().item()
                total, weight = total + masked_lm_loss(m, batch).item() * w, weight + w
        return {"val_loss": total / max(weight, 1)}

    print(f"SFT on {len(train_chats):,} conversations → {len(train_rows[0]):,} rows of {seq_len + 1} tokens "
          f"({'packed' if cfg.packing else 'padded'}); base {cfg.base}; run {run_dir.path}")  # fmt: skip
    head_fraction = float(train_rows[1][:, 1:].float().mean())  # tokens trained on ÷ tokens
    trainer = Trainer(model, tcfg, run_dir, batch_fn=batch_fn, loss_fn=masked_lm_loss, eval_fn=eval_fn,
                      tokens_fn=lambda b: b[0][:, :-1].numel(), loss_tokens_fn=lambda b: int(b[1][:, 1:].sum()),
                      flops_per_token=sft_flops_per_token(cfg.model, seq_len, head_fraction, cfg.lora.enabled),
                      resume=cfg.resume)  # fmt: skip
    trainer.fit()
    if cfg.lora.enabled:
        finish_lora_run(model, run_dir, trainer, cfg.lora)
    return run_dir
