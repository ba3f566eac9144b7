"""Strict YAML reading: duplicate keys are errors, and every key keeps its source line."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from quantpub.errors import MatrixError

KeyPath = tuple[str | int, ...]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"duplicate key {key!r} (first at line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _line_index(node: yaml.Node | None, path: KeyPath, out: dict[KeyPath, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, key_node.value)
            out[child] = key_node.start_mark.line + 1
            _line_index(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            child = (*path, i)
            out[child] = item.start_mark.line + 1
            _line_index(item, child, out)


def load(path: str | Path) -> tuple[Any, dict[KeyPath, int]]:
    """Parse ``path``; return the data and a map from key path to 1-based line number.

    Raises:
        MatrixError: the file is missing, unreadable, not UTF-8 or not valid YAML.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MatrixError(str(path), "no such file; `quantpub matrices` lists the shipped ones") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MatrixError(str(path), f"cannot read: {exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
        lines: dict[KeyPath, int] = {}
        _line_index(yaml.compose(text, Loader=yaml.SafeLoader), (), lines)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise MatrixError(str(path), f"YAML syntax error: {problem}", line=line) from None
    except yaml.YAMLError as exc:
        raise MatrixError(str(path), f"YAML syntax error: {exc}") from None
    return data, lines


def nearest_line(lines: dict[KeyPath, int], path: KeyPath) -> int | None:
    """The line of ``path``, or of its closest ancestor that has one."""
    for end in range(len(path), 0, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


_FRONT = re.compile(r"^---\s*\n(.*?)\n---\s*(?:\n|$)", re.S)


def front_matter(text: str) -> tuple[str | None, str]:
    """The YAML between a card's leading ``---`` lines (None when there is none) and the body after it."""
    match = _FRONT.match(text)
    return (match.group(1), text[match.end():]) if match else (None, text)
