"""User chat data in JSONL, checked line by line: SFT conversations and preference pairs.

    {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}
    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}

Every bad line fails with a UserError (lmforge.config), one line naming the file and the line number.
Standard library and lmforge.config only.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from lmforge.config import UserError

__all__ = ["ROLES", "jsonl_objects", "load_jsonl_messages", "load_jsonl_preferences"]

ROLES = ("system", "user", "assistant")  # lmforge.tokenizer's chat roles (not imported: it needs `tokenizers`)


def jsonl_objects(path: str | Path):
    """(line number, object) for each non-blank line; UserError naming the line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        number = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{number}: not UTF-8 text ({e.reason}); save the file as UTF-8") from None
    # newline=None splits lines as a text-mode file does (\n, \r\n, \r), not at U+2028 inside a JSON string
    for number, line in enumerate(io.StringIO(text, newline=None), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise UserError(f"{path}:{number}: not usable JSON (nested too deeply)") from None
        except ValueError as e:  # an integer of more than 4300 digits
            raise UserError(f"{path}:{number}: not usable JSON ({e})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def load_jsonl_messages(path: str | Path) -> list[list[dict]]:
    """Conversations for SFT, one a line: {"messages": [{"role": "user", "content": "..."}, ...]}. Roles are
    system, user, assistant; each conversation needs an assistant turn (something to learn)."""
    conversations = []
    for number, obj in jsonl_objects(path):
        where = f"{path}:{number}"
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            raise UserError(f'{where}: expected "messages": a non-empty list of {{"role", "content"}} objects')
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UserError(f'{where}: message {i} needs "role" and "content"')
            if m["role"] not in ROLES:
                raise UserError(f"{where}: message {i} has role {m['role']!r}; roles: {', '.join(ROLES)}")
            if not isinstance(m["content"], str):
                raise UserError(f"{where}: message {i} content must be a string, got {type(m['content']).__name__}")
            clean.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in clean):
            raise UserError(f"{where}: no assistant message, so nothing to learn")
        conversations.append(clean)
    return conversations


def load_jsonl_preferences(path: str | Path) -> list[dict]:
    """Preference pairs, one a line: {"prompt": "...", "chosen": "...", "rejected": "..."}, all strings. Lines
    written by `lmforge prefs collect` carry a "label": only those labelled "a" or "b" are pairs (ties,
    both-bad, skips and unlabelled ones are left out). An optional number "margin" says by how much the chosen
    answer should win (reward training's per-pair margin, Llama 2's "degree of preference"); without it, 0."""
    pairs = []
    for number, obj in jsonl_objects(path):
        if "label" in obj and obj["label"] not in ("a", "b"):
            continue
        pair = {}
        for key in ("prompt", "chosen", "rejected"):
            if key not in obj:
                raise UserError(f'{path}:{number}: missing "{key}" (need "prompt", "chosen", "rejected")')
            if not isinstance(obj[key], str):
                raise UserError(f'{path}:{number}: "{key}" must be a string, got {type(obj[key]).__name__}')
            pair[key] = obj[key]
        if "margin" in obj:
            if isinstance(obj["margin"], bool) or not isinstance(obj["margin"], int | float):
                raise UserError(f'{path}:{number}: "margin" must be a number, got {type(obj["margin"]).__name__}')
            pair["margin"] = float(obj["margin"])
        pairs.append(pair)
    return pairs
