"""The docs stay in step with the code: docs/configuration.md is generated from DPOConfig's field help,
every field has help, and the README and docs/ link only to files that exist. No Ray."""

import dataclasses
import os
import re

import pytest

from raydpo import config_docs
from raydpo.config import DPOConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGURATION = os.path.join(ROOT, "docs", "configuration.md")


def test_configuration_doc_is_generated_from_the_field_help():
    with open(CONFIGURATION) as f:
        written = f.read()
    assert written == config_docs.render(), (
        f"docs/configuration.md is out of date with DPOConfig's field help (raydpo/config.py); "
        f"regenerate it with `{config_docs.COMMAND}`")


@pytest.mark.parametrize("field", dataclasses.fields(DPOConfig), ids=lambda f: f.name)
def test_every_field_has_help(field):
    text = field.metadata.get("help", "")
    assert isinstance(text, str) and text.strip(), f"DPOConfig.{field.name} has no metadata['help']"
    # argparse formats help with %: a bare one breaks `raydpo train -h`.
    assert "%" not in text, f"DPOConfig.{field.name}'s help has a '%' (argparse would need '%%')"


def test_every_field_is_in_a_section_in_order():
    listed = [f.name for _, _, group in config_docs.sections() for f in group]
    assert listed == [f.name for f in dataclasses.fields(DPOConfig)]


def test_raydpo_train_help_shows_the_field_help():
    from raydpo.script_args import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "--share_prompt" in text and "computed once instead of twice" in text


def test_readme_is_short():
    assert os.path.getsize(os.path.join(ROOT, "README.md")) <= 12 * 1024


def _markdown_files():
    yield os.path.join(ROOT, "README.md")
    for name in sorted(os.listdir(os.path.join(ROOT, "docs"))):
        if name.endswith(".md"):
            yield os.path.join(ROOT, "docs", name)


def _anchors(path):
    with open(path) as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("path", list(_markdown_files()), ids=os.path.basename)
def test_links_point_at_files_and_headings_that_exist(path):
    with open(path) as f:
        text = f.read()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        assert os.path.exists(resolved), f"{os.path.relpath(path, ROOT)} links to {target}: no such file"
        if anchor and resolved.endswith(".md"):
            assert anchor in _anchors(resolved), f"{os.path.relpath(path, ROOT)} links to {target}: no such heading"
