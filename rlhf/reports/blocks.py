"""Generated blocks of a Markdown page: the lines between `<!-- NAME:start -->` and `<!-- NAME:end -->`, written by
the commands that render tables from stored runs (`rlhf seeds table|compare --into`, `rlhf history table --into`,
`bench/paired_eval.py --into`), so a published table is rebuilt in place and a test can compare it with its source."""

from __future__ import annotations

import re

from rlhf.errors import StateError


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def _pattern(name: str, body: str) -> re.Pattern:
    """A block whose start marker begins a line after its indentation (group 1) and whose end marker has the same
    indentation: a block inside a list item is indented with it."""
    start, end = markers(name)
    return re.compile(r"^([ \t]*)" + re.escape(start) + r"\n" + body + r"^\1" + re.escape(end), re.S | re.M)


def replace_block(text: str, name: str, body: str, where: str) -> str:
    """`text` with the lines between `<!-- name:start -->` and `<!-- name:end -->` replaced by `body`, each line
    indented as the start marker is."""
    start, end = markers(name)
    pattern = _pattern(name, r".*?")
    if len(pattern.findall(text)) != 1:
        raise StateError(f"{where}: needs exactly one block {start} … {end}")

    def fill(found: re.Match) -> str:
        indent = found.group(1)
        lines = "".join(indent + line if line.strip() else line for line in body.splitlines(keepends=True))
        return f"{indent}{start}\n{lines}{indent}{end}"

    return pattern.sub(fill, text)


def block(text: str, name: str) -> str | None:
    """The lines between a block's markers, without the markers' indentation (None without the block)."""
    found = _pattern(name, r"(.*?)").search(text)
    if not found:
        return None
    indent = found.group(1)
    return "".join(line.removeprefix(indent) for line in found.group(2).splitlines(keepends=True))
