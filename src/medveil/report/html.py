"""Self-contained HTML pages: inline CSS, figures embedded as base64 PNG, no script, no server.

A page is a list of sections; each section is built from :func:`table`, :func:`figure`,
:func:`pre` and :func:`para`, all escaping their text.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from medveil.report.plots import plt  # the Agg backend, set up once

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #1d2330; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 2em;
     border-bottom: 1px solid #d8dce3; padding-bottom: 0.2em; }
.sub { color: #5b6474; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d8dce3; padding: 0.25em 0.6em; text-align: right; }
th { background: #f1f3f6; } td:first-child, th:first-child { text-align: left; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #e3e6eb; }
.warn { background: #fff4e5; border-left: 4px solid #f0a030; padding: 0.5em 0.8em; }
.note { color: #5b6474; font-size: 0.9em; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def cell(value: Any) -> str:
    """A table cell's text: floats to 3 decimals, None / NaN as a dash."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    cap = f"<caption class='note'>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png_tag(png: bytes, alt: str) -> str:
    return f"<img alt='{esc(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"


def figure(fig: Figure, alt: str) -> str:
    """Embed a matplotlib figure (closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return png_tag(buf.getvalue(), alt)


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def para(text: str, cls: str = "") -> str:
    return f"<p class='{cls}'>{esc(text)}</p>" if cls else f"<p>{esc(text)}</p>"


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str]]) -> str:
    """The whole document; ``sections``: (heading, inner HTML already escaped)."""
    body = "".join(f"<h2>{esc(h)}</h2>{inner}" for h, inner in sections)
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1><p class='sub'>{esc(subtitle)}</p>"
            f"{body}</body></html>\n")
