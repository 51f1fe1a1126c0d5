"""A report as a list of blocks, rendered twice: Markdown (images as files next to it) and one self-contained HTML
page (images as base64 data URIs, inline CSS, no script, nothing fetched)."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retain.report.tables import COLUMNS, MISSING, TEXT_KEYS, column_header, format_value, table_keys, to_markdown

__all__ = ["Block", "Bullets", "Code", "Details", "Heading", "Image", "Table", "Text", "to_html", "to_md"]


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Text:
    """A paragraph; ```code``` spans become ``<code>`` in HTML."""

    text: str


@dataclass(frozen=True)
class Bullets:
    items: Sequence[str]


@dataclass(frozen=True)
class Table:
    rows: Sequence[dict[str, Any]]
    columns: dict[str, str] | None = None  # key -> header; None: the run table's columns


@dataclass(frozen=True)
class Image:
    path: Path  # a PNG in the report folder
    alt: str


@dataclass(frozen=True)
class Code:
    text: str


@dataclass(frozen=True)
class Details:
    """Collapsed preformatted text (a run's resolved config)."""

    summary: str
    text: str


Block = Heading | Text | Bullets | Table | Image | Code | Details

# ----------------------------------------------------------------------------------------------- Markdown


def to_md(blocks: Sequence[Block]) -> str:
    """GitHub Markdown; images link to their files by name (they sit next to the Markdown file)."""
    return "\n".join(_md(b) for b in blocks)


def _md(b: Block) -> str:
    if isinstance(b, Heading):
        return f"{'#' * b.level} {b.text}\n"
    if isinstance(b, Text):
        return f"{b.text}\n"
    if isinstance(b, Bullets):
        return "".join(f"- {item}\n" for item in b.items)
    if isinstance(b, Table):
        return to_markdown(b.rows, b.columns)
    if isinstance(b, Image):
        return f"![{b.alt}]({b.path.name})\n"
    if isinstance(b, Code):
        return f"```text\n{b.text}\n```\n"
    return f"<details><summary>{html.escape(b.summary)}</summary>\n\n```yaml\n{b.text.rstrip()}\n```\n\n</details>\n"


# ----------------------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328; line-height: 1.45;
       max-width: 1500px; margin: 24px auto; padding: 0 20px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; margin-top: 32px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 16px; margin: 20px 0 4px; }
p.note, li { font-size: 14px; color: #444; }
.scroll { overflow-x: auto; max-width: 100%; border: 1px solid #d0d7de; border-radius: 6px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 8px; border-bottom: 1px solid #e5e7eb; white-space: nowrap; }
th { background: #f3f4f6; text-align: right; vertical-align: bottom; white-space: normal; min-width: 3em; }
th.text, td.text { text-align: left; } td { text-align: right; }
tbody tr:nth-child(even) td { background: #f9fafb; } tbody tr:hover td { background: #eef4ff; }
figure { margin: 8px 0; } img.plot { max-width: 100%; height: auto; border: 1px solid #e5e7eb; }
pre { background: #f6f8fa; padding: 8px 12px; overflow-x: auto; font-size: 12px; border-radius: 6px; }
details { margin: 4px 0 8px; } summary { cursor: pointer; font-size: 14px; color: #0550ae; }
code { background: #f6f8fa; padding: 0 4px; border-radius: 4px; font-size: 90%; }
"""


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _html_table(rows: Sequence[dict[str, Any]], columns: dict[str, str] | None) -> str:
    columns = COLUMNS if columns is None else columns
    keys = table_keys(rows, columns)
    cls = [' class="text"' if k in TEXT_KEYS else "" for k in keys]
    head = "".join(f"<th{c}>{html.escape(column_header(k, columns))}</th>"
                   for k, c in zip(keys, cls, strict=True))  # fmt: skip
    body = "".join(
        "<tr>" + "".join(f"<td{c}>{html.escape(format_value(k, r.get(k, MISSING)))}</td>"
                         for k, c in zip(keys, cls, strict=True)) + "</tr>"
        for r in rows
    )  # fmt: skip
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _html(b: Block) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level}>{html.escape(b.text)}</h{b.level}>"
    if isinstance(b, Text):
        return f'<p class="note">{_inline(b.text)}</p>'
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in b.items) + "</ul>"
    if isinstance(b, Table):
        return _html_table(b.rows, b.columns)
    if isinstance(b, Image):
        data = base64.b64encode(b.path.read_bytes()).decode("ascii")
        alt = html.escape(b.alt)
        return f'<figure><img class="plot" alt="{alt}" title="{alt}" src="data:image/png;base64,{data}"></figure>'
    if isinstance(b, Code):
        return f"<pre>{html.escape(b.text)}</pre>"
    return f"<details><summary>{html.escape(b.summary)}</summary><pre>{html.escape(b.text)}</pre></details>"


def to_html(blocks: Sequence[Block], title: str) -> str:
    """One self-contained HTML page: inline CSS, PNGs as data URIs, no script and no external resource."""
    body = "\n".join(_html(b) for b in blocks)
    head = (f'<meta charset="utf-8">\n<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>")  # fmt: skip
    return f'<!DOCTYPE html>\n<html lang="en">\n<head>\n{head}\n</head>\n<body>\n{body}\n</body>\n</html>\n'
