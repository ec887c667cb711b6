"""The `python -m monai.bundle trt_export` commands a bundle's README documents (how its zoo engine was exported)."""

from __future__ import annotations

import ast
import logging
import re
import shlex
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COMMAND = "monai.bundle trt_export"


def find_readme(bundle_root: Path, readme: str | Path | None = None) -> Path | None:
    """`readme` (relative to the bundle root unless absolute), else `docs/README.md` or `README.md` if present."""
    if readme is not None:
        return Path(readme) if Path(readme).is_absolute() else bundle_root / readme
    return next((p for p in (bundle_root / "docs" / "README.md", bundle_root / "README.md") if p.is_file()), None)


def parse_trt_export_commands(readme: str) -> list[dict[str, Any]]:
    """Flags of every `python -m monai.bundle trt_export ...` command in a README (line continuations joined).

    Values are parsed as Python literals where they are (`"[1, 4, 8]"`, `"True"`, `"{'a': 1}"`), else kept as
    strings (`models/model_trt.ts`, `<fp32/fp16>`). Config overrides (`--network_def#use_list_output`) are kept
    under their own names.
    """
    text = re.sub(r"\\[ \t]*\r?\n", " ", readme)
    commands = []
    for line in text.splitlines():
        at = line.find(COMMAND)
        if at < 0:
            continue
        try:
            tokens = shlex.split(line[at + len(COMMAND):].replace("`", " "))
        except ValueError:
            logger.warning("could not parse the trt_export command %r", line.strip())
            continue
        flags: dict[str, Any] = {}
        for index, token in enumerate(tokens):
            if not token.startswith("--"):
                continue
            name, eq, value = token[2:].partition("=")
            if not eq:
                following = tokens[index + 1] if index + 1 < len(tokens) else "--"
                value = "True" if following.startswith("--") else following
            flags[name] = _literal(value)
        commands.append(flags)
    return commands


def _literal(value: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
