"""report.html (figures and tables on one page) and analysis.json (every number, for scripts).

    report = HtmlReport("detkit analysis")
    report.heading("TIDE errors"); report.image("tide.png"); report.table(rows)
    report.write("out/report.html")

Image paths are relative to the report, so the folder can be moved or zipped as a whole.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detkit.utils.files import write_text_atomic

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { border-bottom: 2px solid #ddd; } h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
p.note { color: #555; font-size: 0.9em; }
"""


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, (float, np.floating)):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return html.escape(str(value))


class HtmlReport:
    """A single static HTML page built from headings, paragraphs, images and tables."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, note: bool = False) -> None:
        attribute = ' class="note"' if note else ""
        self.parts.append(f"<p{attribute}>{html.escape(text)}</p>")

    def image(self, relative_path: str, alt: str = "") -> None:
        self.parts.append(f'<img src="{html.escape(relative_path)}" alt="{html.escape(alt or relative_path)}">')

    def links(self, items: Sequence[tuple[str, str]]) -> None:
        """(label, relative path) links on one line."""
        self.parts.append(
            "<p>" + " · ".join(f'<a href="{html.escape(p)}">{html.escape(t)}</a>' for t, p in items) + "</p>"
        )

    def table(self, rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 1) -> None:
        """One row per dict; columns default to the first row's keys; floats to `digits` decimals."""
        if not rows:
            self.paragraph("(none)", note=True)
            return
        columns = list(columns or rows[0].keys())
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{_cell(r.get(c, ''), digits)}</td>" for c in columns) + "</tr>" for r in rows
        )
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def write(self, path: str | Path) -> Path:
        page = (
            f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(self.parts) + "\n</body></html>\n"
        )
        return write_text_atomic(path, page)


def to_json_safe(value: Any) -> Any:
    """numpy scalars/arrays -> Python; NaN/inf -> None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(to_json_safe(data), indent=2, allow_nan=False) + "\n")
