"""docs/configuration.md, generated from DPOConfig: each field's type, default and help (its metadata["help"]).

    python -m raydpo.config_docs > docs/configuration.md

The sections are the `# --- title (note) ---` comment lines of `DPOConfig` in raydpo/config.py.
tests/test_docs.py fails when docs/configuration.md differs from what this writes.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import List, Tuple

from raydpo.config import DPOConfig

COMMAND = "python -m raydpo.config_docs > docs/configuration.md"
_SECTION = re.compile(r"^\s*# --- (.+?) ---\s*$")
_FIELD = re.compile(r"^    (\w+)\s*:")


def sections() -> List[Tuple[str, str, List[dataclasses.Field]]]:
    """(title, note, fields) in DPOConfig's order; the note is the section comment's parenthesis."""
    fields = {f.name: f for f in dataclasses.fields(DPOConfig)}
    out = []
    for line in inspect.getsource(DPOConfig).splitlines():
        section = _SECTION.match(line)
        if section:
            text = section.group(1)
            title, _, note = text.partition(" (")
            out.append((title[0].upper() + title[1:], note[:-1] if note else "", []))
            continue
        name = _FIELD.match(line)
        if name and name.group(1) in fields:
            if not out:
                raise ValueError(f"DPOConfig.{name.group(1)} comes before the first '# --- section ---' line")
            out[-1][2].append(fields[name.group(1)])
    listed = [f.name for _, _, group in out for f in group]
    if listed != list(fields):
        raise ValueError(f"the section comments of DPOConfig do not cover its fields in order: {listed} vs {list(fields)}")
    return [s for s in out if s[2]]


def type_name(annotation) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
    return text.replace("typing.", "")


def default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _link(note: str) -> str:
    """`docs/x.md` in a section note becomes a link relative to docs/."""
    return re.sub(r"docs/([\w-]+\.md)", r"[\1](\1)", note)


def render() -> str:
    lines = [
        "# Configuration: every `DPOConfig` field",
        "",
        "<!-- Generated from the field help in raydpo/config.py; do not edit by hand. Regenerate with:",
        f"     {COMMAND} -->",
        "",
        "`DPOConfig` (`raydpo/config.py`) is a dataclass. Its fields use TRL 1.16's names, with TRL's defaults,",
        "plus raydpo's data, reference-mode, Ray and DeepSpeed fields. Every field is also a `raydpo train` flag",
        "(`--field value`; `raydpo train -h` shows this help) and a key of a YAML config. Dict fields also take",
        "JSON text. An invalid value raises `ValueError` when the config is built, and the message names the field.",
        "",
    ]
    for title, note, group in sections():
        lines += [f"## {title}", ""]
        if note:
            lines += [f"*{_link(note)}*", ""]
        lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for f in group:
            lines.append(f"| `{f.name}` | `{_cell(type_name(f.type))}` | `{_cell(default_text(f))}` | "
                         f"{_link(_cell(f.metadata.get('help', '')))} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
