"""MkDocs hooks: let the site see files that live outside docs/, without copying them into the repository.

* ``notebooks/*.ipynb`` are added as pages (mkdocs-jupyter renders them, not executed);
* ``figures/notebooks/*.png`` are added as static files (served under ``figures/notebooks/``);
* ``gallery.md`` is generated from ``figures/README.md``: one section per notebook, each committed
  full-mode figure with its caption;
* ``{{ readme("Heading") }}`` in a page is replaced by that section of README.md (heading level
  dropped by one), with README-relative links rewritten for the site.

Everything is read at build time, so the site follows README.md, figures/README.md and the notebooks
as they change.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

from markdown.extensions.toc import slugify
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_GLOB = "notebooks/*.ipynb"
FIGURE_GLOB = "figures/notebooks/*.png"

# README-relative targets that have a page on the site; any other relative link becomes plain code text.
_SITE_LINKS = {
    "docs/semantics.md": "semantics.md",
    "docs/reliability.md": "reliability.md",
    "docs/paper_numbers.md": "paper_numbers.md",
}
_README_CALL = re.compile(r"\{\{\s*readme\(\s*\"([^\"]+)\"\s*\)\s*\}\}")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


@event_priority(100)  # before mkdocs-jupyter's on_files, which wraps the .ipynb files it finds
def on_files(files: Files, config) -> Files:
    for pattern in (NOTEBOOK_GLOB, FIGURE_GLOB):
        for path in sorted(ROOT.glob(pattern)):
            rel = path.relative_to(ROOT).as_posix()
            if files.get_file_from_path(rel) is None:
                # a plain File whose source folder is the repository root (not File.generated: mkdocs-jupyter's
                # wrapper reads abs_src_path from src_dir, which a generated file lacks)
                files.append(File(rel, src_dir=str(ROOT), dest_dir=config.site_dir,
                                  use_directory_urls=config.use_directory_urls))
    files.append(File.generated(config, "gallery.md", content=gallery_markdown()))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    return _README_CALL.sub(lambda m: readme_section(m.group(1)), markdown)


def on_page_content(html_text: str, page, config, files) -> str:
    """A notebook page says it is shown without outputs and links to its figures in the gallery."""
    src = page.file.src_uri
    if not (src.startswith("notebooks/") and src.endswith(".ipynb")):
        return html_text
    stem = Path(src).stem
    rows = dict(gallery_sections()).get(stem, [])
    gallery = files.get_file_from_path("gallery.md")
    title = notebook_title(ROOT / src) or stem
    where = (f'its {len(rows)} full-mode figures are in the <a href="{gallery.url_relative_to(page.file)}#'
             f'{slugify(title, "-")}">gallery</a>' if rows and gallery else "run it to see its figures")
    note = ('<div class="admonition note"><p class="admonition-title">Shown as committed: without outputs</p>'
            f"<p>The notebook is rendered without running it; {where}. Open it in Jupyter (or "
            f"<code>TASKVEC_FAST=1</code> headless) for the widgets, tables and the asserted claims. "
            f'Download: <a href="{Path(src).name}"><code>{Path(src).name}</code></a>.</p></div>')
    end = html_text.find("</h1>")
    return html_text[: end + 5] + note + html_text[end + 5:] if end >= 0 else note + html_text


# ---------------------------------------------------------------------------------------------- README


def readme_section(heading: str) -> str:
    """The README section under ``## heading`` (or the text before the first ``##`` for "intro")."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    text = re.sub(r"<!--.*?-->\n?", "", text, flags=re.S)
    parts = re.split(r"^## ", text, flags=re.M)
    if heading == "intro":
        body = re.sub(r"^# .*\n", "", parts[0]).strip()
    else:
        match = [p for p in parts[1:] if p.split("\n", 1)[0].strip() == heading]
        if not match:
            raise ValueError(f"README.md has no section '## {heading}' (docs/hooks.py)")
        body = match[0].split("\n", 1)[1].strip()
        body = re.sub(r"^###", "##", body, flags=re.M)
    return _site_links(body)


def _site_links(markdown: str) -> str:
    def fix(match: re.Match) -> str:
        label, target = match.group(1), match.group(2)
        if re.match(r"^[a-z]+://|^#|^mailto:", target):
            return match.group(0)
        if target in _SITE_LINKS:
            return f"[{label}]({_SITE_LINKS[target]})"
        shown = label if label.startswith("`") else f"`{label}`"
        return shown if label.strip("`") == target else f"{shown} (`{target}` in the repository)"

    return _LINK.sub(fix, markdown)


# --------------------------------------------------------------------------------------------- gallery


def gallery_sections() -> list[tuple[str, list[tuple[str, str]]]]:
    """[(notebook stem, [(png file name, caption), ...]), ...] from figures/README.md."""
    text = (ROOT / "figures" / "README.md").read_text(encoding="utf-8")
    sections = []
    for block in re.split(r"^## ", text, flags=re.M)[1:]:
        title, _, body = block.partition("\n")
        m = re.match(r"notebooks/(\S+)", title.strip())
        if not m:
            continue
        rows = []
        for line in body.splitlines():
            row = re.match(r"^\|\s*`([^`]+\.png)`\s*\|\s*(.+?)\s*\|\s*$", line)
            if row:
                rows.append((row.group(1), row.group(2)))
        sections.append((m.group(1), rows))
    return sections


def gallery_markdown() -> str:
    out = [
        "# Notebook gallery",
        "",
        "The figures that notebooks 00–07 write in **full mode** (the full zoo, whole test splits), as",
        "committed under `figures/notebooks/`, with the captions of `figures/README.md`. The notebooks",
        "themselves are rendered on this site without outputs, as they are committed; run them in Jupyter",
        "(or headless with `TASKVEC_FAST=1`) to see the widgets and tables. Click a figure for full size.",
        "",
    ]
    for stem, rows in gallery_sections():
        nb = ROOT / "notebooks" / f"{stem}.ipynb"
        out.append(f"## {notebook_title(nb) or stem}")
        out.append("")
        if nb.exists():
            out.append(f"[The notebook]({'notebooks/' + stem + '.ipynb'}) (`notebooks/{stem}.ipynb`), rendered without outputs.")
            out.append("")
        out.append('<div class="tv-gallery" markdown>')
        out.append("")
        for png, caption in rows:
            if not (ROOT / "figures" / "notebooks" / png).exists():
                out.append(f"- `{png}` (not committed): {caption}")
                continue
            out.append('<figure class="tv-wide" markdown>' if _is_wide(ROOT / "figures" / "notebooks" / png)
                       else "<figure markdown>")
            out.append(f"[![{_alt(caption)}](figures/notebooks/{png}){{ loading=lazy }}](figures/notebooks/{png})")
            out.append(f"<figcaption><code>{png}</code>: {_caption_html(caption)}</figcaption>")
            out.append("</figure>")
            out.append("")
        out.append("</div>")
        out.append("")
    return "\n".join(out)


def notebook_title(path: Path) -> str | None:
    """The notebook's first Markdown heading (its title), or None."""
    if not path.exists():
        return None
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] == "markdown":
            m = re.match(r"#\s+(.+)", "".join(cell["source"]).strip())
            return m.group(1).strip() if m else None
    return None


def _is_wide(png: Path) -> bool:
    """A multi-panel figure (wide, or large), which gets a whole gallery row; size from the PNG header."""
    with png.open("rb") as f:
        head = f.read(24)[16:24]
    width, height = int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")
    return width / max(height, 1) > 2.2 or width >= 1600


def _alt(caption: str) -> str:
    return re.sub(r"[\[\]`*_|\\{}]", "", caption)[:120]


def _caption_html(caption: str) -> str:
    text = html.escape(caption.replace("\\|", "|"), quote=False)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
