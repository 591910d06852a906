"""Griffe extension for the API reference: fence doctest examples (``>>>`` blocks) in docstrings.

Unfenced, Markdown reads a doctest's output such as ``['attn_q', 'norm']`` as a reference link, which
the strict build rejects; fenced as ``pycon`` they render as highlighted console sessions. The
docstrings themselves stay plain doctests (``python -m doctest`` still runs them).
"""
from __future__ import annotations

import re

import griffe

_FENCE = re.compile(r"^\s*(```|~~~)")


def fence_doctests(text: str) -> str:
    out: list[str] = []
    in_fence = in_doctest = False
    indent = ""
    for line in text.split("\n"):
        if not in_doctest and _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and not in_doctest and line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}```pycon")
            in_doctest = True
        elif in_doctest and not line.strip():
            out.append(f"{indent}```")
            in_doctest = False
        out.append(line)
    if in_doctest:
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
