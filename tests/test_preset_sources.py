"""Every value of every preset names its source.

Presets are all of ``configs/*.yaml``: the paper's presets, the modern recipe, the built-in
demos and the small files that only name a ``base:`` and override a few keys (each value
they set is read here like any other).

The convention: a value line (``key: value``, the value on the same line; a flow mapping
such as ``backbone: {depth: 110, residual: false}`` is one value line) carries at least one
source tag, in square brackets, in its own trailing comment or in the comment block directly
above it (comment lines with no blank line between them and the value). A tag on a section
line (``solver:``) does not cover the values under it. ``base:`` is the file's parent, not a
setting, and needs none. The tags:

- ``[A]``, ``[B]``, ``[C]``: He et al. 2015, Appendices A (detection baselines), B
  (detection improvements), C (ImageNet localization);
- ``[paper]``: the same paper's main text (a section, table or figure after the tag);
- ``[32]``: Faster R-CNN (Ren et al. 2015), the paper's reference 32, which it follows
  "where not specified"; ``[Fast R-CNN]`` (Girshick 2015); ``[R-CNN]`` (Girshick et al. 2014);
- ``[py-frcnn]``: py-faster-rcnn, the released code of [32] (its config names after the tag);
- ``[d2]``: detectron2's defaults and R101-C4 configs (the modern recipe);
- ``[ours]``: our choice, where the sources are silent, or a declared departure from them;
- ``[run]``: housekeeping that changes neither what is learned nor what is measured
  (output folder, logging, checkpoint and evaluation periods, loader workers, threads, device).

A bracketed word that is not one of these (``[A: ...]``, ``[256]``) is an error too, so a
comment never looks like a source it is not. Flow lists with commas (``[224, 256]``) are not
tags. Lines the scanner cannot read (a value continued over several lines) fail, so no
value escapes the check.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))
TAGS = {"A", "B", "C", "paper", "32", "Fast R-CNN", "R-CNN", "py-frcnn", "d2", "ours", "run"}
EXEMPT_KEYS = {"base"}

_KEY_LINE = re.compile(r"^\s*(?P<key>[A-Za-z_][\w-]*)\s*:(?:\s+(?P<value>.*))?$")
_TAG = re.compile(r"\[([^\[\],]+)\]")


def split_comment(line: str) -> tuple[str, str | None]:
    """(code, comment) of one YAML line; a ``#`` inside quotes is part of the code."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:]
    return line.rstrip(), None


def source_problems(text: str, name: str) -> list[str]:
    """One message per value line without a known source tag ("file:line: key: ...")."""
    problems, block = [], []      # block: the comment lines directly above the current line
    for number, line in enumerate(text.splitlines(), start=1):
        code, comment = split_comment(line)
        if not code.strip():
            block = block + [comment] if comment is not None else []
            continue
        match = _KEY_LINE.match(code)
        value = (match["value"] or "") if match else ""
        if match is None or any(value.count(a) != value.count(b) for a, b in ("[]", "{}")):
            problems.append(f"{name}:{number}: cannot read {code.strip()!r} (one key per "
                            f"line, its value on the same line)")
        elif value and match["key"] not in EXEMPT_KEYS:
            found = [t.strip() for c in block + [comment or ""] for t in _TAG.findall(c)]
            unknown = sorted(set(found) - TAGS)
            if unknown:
                problems.append(f"{name}:{number}: {match['key']}: unknown source tag(s) "
                                f"{unknown} (known: {sorted(TAGS)})")
            elif not found:
                problems.append(f"{name}:{number}: {match['key']}: no source tag in its "
                                f"comment or the comment block above it")
        block = []
    return problems


def test_presets_exist():
    assert len(PRESETS) >= 20 and CONFIGS / "frcnn_r101_coco.yaml" in PRESETS


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_value_names_its_source(path):
    text = path.read_text(encoding="utf-8")
    assert isinstance(yaml.safe_load(text), dict)
    problems = source_problems(text, path.name)
    assert not problems, "\n".join(problems)


def test_a_missing_tag_fails_with_file_line_and_key():
    text = ("model:  # [A] a section's tag covers nothing under it\n"
            "  depth: 101                # [A] ResNet-101\n"
            "  # [32] 3.3\n"
            "  sizes: [128, 256, 512]\n"
            "  norm: frozen_bn\n"
            "solver:\n"
            "  # [ours] a tag above a blank line does not reach the value\n"
            "\n"
            "  base_lr: 0.001\n")
    assert source_problems(text, "p.yaml") == [
        "p.yaml:5: norm: no source tag in its comment or the comment block above it",
        "p.yaml:9: base_lr: no source tag in its comment or the comment block above it"]


def test_unknown_tags_and_unreadable_lines_fail():
    text = ("base: other.yaml\n"
            "weights: torchvision://resnet101   # [A: ImageNet pretraining]\n"
            "steps: [60000]  # [32] 4.1; scales=[256]\n"
            "scales: [224, 256]  # [paper] 3.4, not a tag: [224, 256]\n"
            "name: 'a # b'  # [run]\n"
            "splits: [a,\n"
            "  b]  # [ours]\n")
    problems = source_problems(text, "p.yaml")
    assert problems[0].startswith("p.yaml:2: weights: unknown source tag(s) "
                                  "['A: ImageNet pretraining']")
    assert problems[1].startswith("p.yaml:3: steps: unknown source tag(s) ['256']")
    assert problems[2].startswith("p.yaml:6: cannot read")
    assert problems[3].startswith("p.yaml:7: cannot read")
    assert len(problems) == 4
