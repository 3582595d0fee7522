"""What a preference row is: format detection, checks that name the field, and normalisation.

Every layout below becomes one `Pair` before tokenizing:

  TRL standard        {"prompt": str, "chosen": str, "rejected": str}          no "prompt": implicit
  TRL conversational  {"prompt": [msg], "chosen": [msg], "rejected": [msg]}    no "prompt": implicit
  OpenAI preference   {"input": {"messages": [msg], "tools"?}, "preferred_output": [msg],
                       "non_preferred_output": [msg]}
  ShareGPT            {"conversations": [{"from", "value"}], "chosen": {"from", "value"},
                       "rejected": {"from", "value"}, "system"?, "tools"?}
  LLaMA-Factory       {"chosen_messages": [msg], "rejected_messages": [msg]}   whole conversations,
                       content as [{"type": "text"|"reasoning"|"tool_call", "value"}] parts

TRL rows may also carry `tools` (JSON schemas, or a JSON string of them) and `chat_template_kwargs`;
any row may carry `image` (one) or `images` (a list): a vision row (raydpo.data.images).
A bad row raises `RowError`, whose message names the field; the caller adds the row index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

from raydpo.data import images

LAYOUTS = {"trl": "TRL", "openai": "OpenAI preference", "sharegpt": "ShareGPT",
           "llamafactory": "LLaMA-Factory messages"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "observation": "tool", "tool": "tool", "function_call": "assistant"}


class RowError(ValueError):
    """Why one row can't be trained on. `fatal` errors are never skipped (a whole file is unreadable,
    or the tokenizer can't handle the format at all)."""

    def __init__(self, message: str, fatal: bool = False):
        super().__init__(message)
        self.fatal = fatal


@dataclass
class Pair:
    """The one row shape tokenization reads. Text throughout (standard) or message lists throughout
    (conversational); an implicit prompt has already been extracted."""

    prompt: Union[str, list]
    chosen: Union[str, list]
    rejected: Union[str, list]
    tools: Optional[list] = None
    chat_template_kwargs: Optional[dict] = None
    images: Optional[list] = None  # encoded image bytes (an `image` or `images` field): a vision row

    @property
    def conversational(self) -> bool:
        return isinstance(self.chosen, list)


def format_label(code: str) -> str:
    """'trl:conversational:implicit' -> 'conversational, implicit prompt' (the layout named if not TRL's)."""
    layout, kind, prompt = code.split(":")
    label = f"{kind}, {prompt} prompt"
    return label if layout == "trl" else f"{LAYOUTS[layout]} ({label})"


def format_difference(code: str, other: str) -> str:
    """Name the field that makes a row's format `code` differ from the dataset's `other`."""
    (layout, kind, prompt), (o_layout, o_kind, o_prompt) = code.split(":"), other.split(":")
    if layout != o_layout:
        return f"this row is in the {LAYOUTS[layout]} layout but the dataset is in the {LAYOUTS[o_layout]} layout"
    if kind != o_kind:
        what = {"standard": "text", "conversational": "a list of messages"}
        return f"field 'chosen' is {what[kind]} here but {what[o_kind]} in the rest of the dataset"
    return (f"field 'prompt' is {'missing' if prompt == 'implicit' else 'present'} here but "
            f"{'missing' if o_prompt == 'implicit' else 'present'} in the rest of the dataset")


def normalize(raw: Any) -> Tuple[str, Pair]:
    """Detect a raw row's format and return (format code 'layout:kind:prompt', Pair)."""
    if not isinstance(raw, dict):
        raise RowError(f"expected a dict (one preference pair), got {type(raw).__name__}")
    raw = {k: v for k, v in raw.items() if v is not None}  # Arrow sources fill absent fields with None
    if raw.keys() & {"input", "preferred_output", "non_preferred_output"}:
        code, pair = _openai(raw)
    elif "conversations" in raw:
        code, pair = _sharegpt(raw)
    elif raw.keys() & {"chosen_messages", "rejected_messages"}:
        code, pair = _llamafactory(raw)
    else:
        code, pair = _trl(raw)
    pair.images = _images(raw)
    return code, pair


def extract_prompt(chosen, rejected):
    """TRL 1.16's `extract_prompt`: the prompt is the longest common prefix of chosen and rejected
    (characters for text, messages for conversations). A text split right after a space moves one
    character left, so the space starts the completions. Kept exactly, quirk included: when one is a
    prefix of the other, the split lands one element before the shorter one ends."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


# --- layouts -------------------------------------------------------------------------------------

def _trl(raw: dict) -> Tuple[str, Pair]:
    for field in ("chosen", "rejected"):
        if field not in raw:
            raise RowError(f"field {field!r} is missing (the row has: {', '.join(map(str, raw)) or 'no fields'})")
    conversational = any(isinstance(raw.get(k), list) for k in ("prompt", "chosen", "rejected"))
    # A text prompt beside whole conversations (UltraFeedback-style) is ignored and the prompt is
    # extracted from the messages, as TRL's maybe_extract_prompt does.
    implicit = "prompt" not in raw or (conversational and isinstance(raw["prompt"], str)
                                       and not isinstance(raw["chosen"], str))
    code = f"trl:{'conversational' if conversational else 'standard'}:{'implicit' if implicit else 'explicit'}"
    if conversational:
        chosen, rejected = _messages(raw["chosen"], "chosen"), _messages(raw["rejected"], "rejected")
        if implicit:
            pair = _split_implicit(chosen, rejected, text_prompt="prompt" in raw)
        else:
            pair = Pair(_messages(raw["prompt"], "prompt"), chosen, rejected)
        _check_completions(pair)
        pair.tools = _tools(raw.get("tools"))
        pair.chat_template_kwargs = _template_kwargs(raw.get("chat_template_kwargs"))
        return code, pair
    chosen, rejected = _text(raw["chosen"], "chosen"), _text(raw["rejected"], "rejected")
    if implicit:
        pair = _split_implicit(chosen, rejected, text_prompt=False)
    else:
        pair = Pair(_text(raw["prompt"], "prompt", allow_empty=True), chosen, rejected)
    if raw.get("tools"):
        raise RowError("field 'tools' is set on a standard (text) row; tools need conversational rows")
    return code, pair


def _openai(raw: dict) -> Tuple[str, Pair]:
    source = raw.get("input")
    if not isinstance(source, dict):
        raise RowError("field 'input' is missing" if source is None else
                       f"field 'input' must be an object with 'messages', got {type(source).__name__}")
    pair = Pair(_messages(source.get("messages"), "input.messages"),
                _messages(raw.get("preferred_output"), "preferred_output"),
                _messages(raw.get("non_preferred_output"), "non_preferred_output"),
                tools=_tools(source.get("tools"), "input.tools"))
    _check_completions(pair, ("preferred_output", "non_preferred_output"))
    return "openai:conversational:explicit", pair


def _sharegpt(raw: dict) -> Tuple[str, Pair]:
    prompt = _sharegpt_turns(raw["conversations"], "conversations")
    if isinstance(raw.get("system"), str) and raw["system"]:
        prompt = [{"role": "system", "content": raw["system"]}] + prompt
    pair = Pair(prompt, _sharegpt_turns(raw.get("chosen"), "chosen"), _sharegpt_turns(raw.get("rejected"), "rejected"),
                tools=_tools(raw.get("tools")))
    _check_completions(pair)
    return "sharegpt:conversational:explicit", pair


def _llamafactory(raw: dict) -> Tuple[str, Pair]:
    chosen = _messages(raw.get("chosen_messages"), "chosen_messages", parts_key="value")
    rejected = _messages(raw.get("rejected_messages"), "rejected_messages", parts_key="value")
    pair = _split_implicit(chosen, rejected, names=("chosen_messages", "rejected_messages"))
    _check_completions(pair, ("chosen_messages", "rejected_messages"))
    pair.tools = _tools(raw.get("tools"))
    return "llamafactory:conversational:implicit", pair


# --- field checks --------------------------------------------------------------------------------

def _text(value, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowError(f"field {field!r} must be a string or a list of messages, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"field {field!r} is empty")
    return value


def _messages(value, field: str, parts_key: Optional[str] = None) -> list:
    """Check a list of chat messages and return clean copies (None-valued keys dropped: Arrow adds
    them for keys other messages have, and a chat template would see e.g. tool_calls=None as set)."""
    if value is None:
        raise RowError(f"field {field!r} is missing")
    if not isinstance(value, list):
        raise RowError(f"field {field!r} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise RowError(f"field {field!r} is empty")
    messages = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise RowError(f"field {where!r} must be a message dict with 'role' and 'content', "
                           f"got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        if not isinstance(message.get("role"), str):
            raise RowError(f"field '{where}.role' is missing" if "role" not in message
                           else f"field '{where}.role' must be a string, got {type(message['role']).__name__}")
        if parts_key is not None:
            message = _from_parts(message, where, parts_key)
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            raise RowError(f"field '{where}.content' is missing")
        if content is not None and not isinstance(content, (str, list)):
            raise RowError(f"field '{where}.content' must be a string or a list of parts, got {type(content).__name__}")
        messages.append(message)
    return messages


def _from_parts(message: dict, where: str, key: str) -> dict:
    """LLaMA-Factory typed content parts -> content text, reasoning_content and tool_calls (the
    fields chat templates read). Its per-message loss_weight is dropped."""
    out = {"role": message["role"]}
    parts = message.get("content")
    if not isinstance(parts, list):
        out["content"] = parts
        return out
    texts, reasoning, calls = [], [], []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        value = part.get(key) if isinstance(part, dict) else None
        if kind not in ("text", "reasoning", "tool_call") or not isinstance(value, str):
            raise RowError(f"field '{where}.content[{j}]' must be {{'type': 'text'|'reasoning'|'tool_call', "
                           f"{key!r}: str}}, got {part!r:.80}")
        if kind == "tool_call":
            try:
                calls.append({"type": "function", "function": json.loads(value)})
            except json.JSONDecodeError as e:
                raise RowError(f"field '{where}.content[{j}]' is a tool_call that is not valid JSON: {e}") from None
        else:
            (texts if kind == "text" else reasoning).append(value)
    out["content"] = "".join(texts)
    if reasoning:
        out["reasoning_content"] = "".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return out


def _sharegpt_turns(value, field: str) -> list:
    if value is None:
        raise RowError(f"field {field!r} is missing")
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list):
        raise RowError(f"field {field!r} must be a list of {{'from', 'value'}} turns, got {type(value).__name__}")
    if not turns:
        raise RowError(f"field {field!r} is empty")
    messages = []
    for i, turn in enumerate(turns):
        where = field if isinstance(value, dict) else f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(f"field {where!r} must be a {{'from', 'value'}} turn, got {type(turn).__name__}")
        if turn.get("from") not in SHAREGPT_ROLES:
            raise RowError(f"field '{where}.from' is {turn.get('from')!r}, expected one of {sorted(SHAREGPT_ROLES)}")
        if not isinstance(turn.get("value"), str):
            raise RowError(f"field '{where}.value' must be a string, got {type(turn.get('value')).__name__}")
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
    return messages


def _split_implicit(chosen, rejected, text_prompt: bool = False, names=("chosen", "rejected")) -> Pair:
    if chosen == rejected:
        raise RowError(f"fields {names[0]!r} and {names[1]!r} are identical, so there is no preference")
    prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if not prompt:
        hint = ("field 'prompt' is text while the completions are message lists, and " if text_prompt
                else "field 'prompt' is missing (an implicit prompt), and " if names[0] == "chosen" else "")
        raise RowError(f"{hint}fields {names[0]!r} and {names[1]!r} share no prompt: they differ from their "
                       f"first {'message' if isinstance(chosen, list) else 'character'}")
    return Pair(prompt, chosen, rejected)


def _check_completions(pair: Pair, names=("chosen", "rejected")) -> None:
    for name, messages in zip(names, (pair.chosen, pair.rejected)):
        assistant = [m for m in messages if m["role"] == "assistant"]
        if not assistant:
            raise RowError(f"field {name!r} has no assistant message (roles: "
                           f"{', '.join(m['role'] for m in messages)})")
        if not any(m.get("content") or m.get("tool_calls") for m in assistant):
            raise RowError(f"field {name!r} is empty: its assistant message has no content")


def _images(raw: dict) -> Optional[list]:
    """A row's `image` (one) or `images` (a list) as encoded bytes; None for a text row."""
    if "image" in raw and "images" in raw:
        raise RowError("fields 'image' and 'images' are both set; use 'image' for one image or 'images' for a list")
    if "image" in raw:
        fields = [("image", raw["image"])]
    elif "images" in raw:
        if not isinstance(raw["images"], (list, tuple)):
            raise RowError(f"field 'images' must be a list of images, got {type(raw['images']).__name__}")
        fields = [(f"images[{i}]", value) for i, value in enumerate(raw["images"])]
    else:
        return None
    encoded = []
    for field, value in fields:
        try:
            encoded.append(images.encode_image(value))
        except ValueError as e:
            raise RowError(f"field {field!r} {e}") from None
    return encoded


def _tools(value, field: str = "tools") -> Optional[list]:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"field {field!r} is a string but not valid JSON: {e}") from None
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise RowError(f"field {field!r} must be a list of tool JSON schemas (dicts), got {type(value).__name__}")
    return value


def _template_kwargs(value) -> Optional[dict]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RowError(f"field 'chat_template_kwargs' must be a dict, got {type(value).__name__}")
    return {k: v for k, v in value.items() if v is not None}
