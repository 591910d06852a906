"""Griffe extension for the API reference: read taskvec's plain-text docstrings as Markdown means them.

* Doctest examples (``>>>`` blocks) are fenced as ``pycon``: unfenced, Markdown reads a doctest's output
  such as ``['attn_q', 'norm']`` as a reference link, which the strict build rejects. The docstrings
  stay plain doctests (``python -m doctest`` still runs them).
* A bulleted list that follows its introducing line without a blank line ("Parameter values may be
  given as" / "  * a scalar ...") gets one, so Markdown renders a list instead of running the items
  into the paragraph.
"""
from __future__ import annotations

import re

import griffe

_FENCE = re.compile(r"^\s*(```|~~~)")
_ITEM = re.compile(r"^ {0,3}([*+-]|\d+[.)]) \S")


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


def separate_lists(text: str) -> str:
    out: list[str] = []
    in_fence = in_list = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            if not line.strip():
                in_list = False
            elif _ITEM.match(line):
                if not in_list and out and out[-1].strip():
                    out.append("")
                in_list = True
        out.append(line)
    return "\n".join(out)


class DoctestFences(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is None:
            return
        text = obj.docstring.value
        if ">>>" in text:
            text = fence_doctests(text)
        obj.docstring.value = separate_lists(text)
