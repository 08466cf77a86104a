"""Preference pairs as tensors: {"prompt", "chosen", "rejected"} records rendered with the chat template,
right-padded into rows for the reward model and DPO.

    pairs = load_pairs("prefs.jsonl")                 # lmforge prefs collect output, or plain pair JSONL
    batch = collate(tokenizer, pairs[:16], max_len=256)
    batch.chosen, batch.chosen_mask, batch.chosen_last  # [B, L] ids, [B, L] response mask, [B] index of <|end|>
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import UserError


def load_pairs(path: str | Path) -> list[dict]:
    """Training pairs from a JSONL of {"prompt", "chosen", "rejected"} or of `lmforge prefs collect` records
    (`lmforge.data.chat_jsonl.load_jsonl_preferences`), refusing a file without any."""
    from lmforge.data.chat_jsonl import load_jsonl_preferences

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no preference file {path}: collect one with `lmforge prefs collect`")
    pairs = load_jsonl_preferences(path)
    if not pairs:
        raise UserError(f"{path} holds no labelled pairs: label some with `lmforge prefs collect` (a or b)")
    return pairs


def render(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Ids of a user prompt and an assistant response, and the mask of the response's tokens (with <|end|>)."""
    return tokenizer.render_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])


@dataclass
class PairBatch:
    chosen: torch.Tensor  # [B, L] right-padded ids
    chosen_mask: torch.Tensor  # [B, L] 1 on the response's tokens
    chosen_last: torch.Tensor  # [B] index of each row's last token (the response's <|end|>)
    rejected: torch.Tensor
    rejected_mask: torch.Tensor
    rejected_last: torch.Tensor
    margin: torch.Tensor | None = None  # [B] each pair's own margin (0 where it has none); None: no pair has one

    def __len__(self) -> int:
        return self.chosen.shape[0]


def pad(seqs: list[tuple[list[int], list[int]]], pad_id: int, max_len: int) -> tuple[torch.Tensor, ...]:
    """Right-pad (ids, mask) pairs, cut from the left past max_len so the response is kept; rows, masks, last."""
    seqs = [(ids[-max_len:], mask[-max_len:]) for ids, mask in seqs]
    width = max(len(ids) for ids, _ in seqs)
    rows = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    masks = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, (ids, mask) in enumerate(seqs):
        rows[i, : len(ids)], masks[i, : len(mask)] = torch.tensor(ids), torch.tensor(mask)
    last = torch.tensor([len(ids) - 1 for ids, _ in seqs])
    return rows, masks, last


def collate(tokenizer, pairs: list[dict], max_len: int) -> PairBatch:
    chosen = pad([render(tokenizer, p["prompt"], p["chosen"]) for p in pairs], tokenizer.pad_id, max_len)
    rejected = pad([render(tokenizer, p["prompt"], p["rejected"]) for p in pairs], tokenizer.pad_id, max_len)
    margin = None
    if any("margin" in p for p in pairs):
        margin = torch.tensor([p.get("margin", 0.0) for p in pairs], dtype=torch.float32)
    return PairBatch(*chosen, *rejected, margin)
