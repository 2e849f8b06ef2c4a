"""How numbers, tables, images and pages are written in every report: run reports, comparisons, the
demo's comparison, the lens and the intervention.

One place, so that a value reads the same everywhere: scores to 3 decimals (``0.000``, never
``1.35e-10`` or ``-0.000``), timesteps to one decimal, an undefined score (NaN, as in
``metrics.csv``) as ``nan``, and a value that does not exist (no emergence step, no head) as
:data:`MISSING`.
"""
from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: how a value that does not exist is shown (an undefined score is ``nan``)
MISSING = "—"
#: the style every HTML report shares
STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}"
         "figcaption{font-size:13px;color:#333;margin:2px 0 18px}")


def fmt_value(v: float | None, digits: int = 3) -> str:
    """A score as people read it: ``0.853``; ``nan``; :data:`MISSING` for None; and ``0.000`` rather
    than ``1.35e-10`` for the vanishing values of an empty prediction (metrics.csv keeps the full
    precision)."""
    if v is None:
        return MISSING
    if v != v:
        return "nan"
    if abs(v) < 0.5 * 10 ** -digits:
        v = 0.0                                  # also avoids "-0.000"
    return f"{v:.{digits}f}"


def fmt_percent(v: float | None, digits: int = 1) -> str:
    """A share as a percentage: ``93.5%``; ``nan``; :data:`MISSING` for None."""
    if v is None:
        return MISSING
    if v != v:
        return "nan"
    return f"{100 * v:.{digits}f}%"


def fmt_cell(v: Any, digits: int = 3) -> str:
    """A table cell: floats as :func:`fmt_value`, None as :data:`MISSING`, anything else as text."""
    if v is None or isinstance(v, float):
        return fmt_value(v, digits)
    return str(v)


def fmt_timestep(t: float) -> str:
    """A scheduler timestep to one decimal (K-LMS visits fractional ones such as 927.64...)."""
    return "nan" if t != t else f"{t:.1f}"


def tick_timestep(t: float) -> str:
    """A timestep on a plot axis: ``999``, ``927.6`` (one decimal only where it is fractional)."""
    return "nan" if t != t else (f"{t:.0f}" if abs(t - round(t)) < 0.05 else f"{t:.1f}")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> tuple[str, str]:
    """A table as Markdown and as HTML (reports are written in both). Cells are written as given
    (format numbers with :func:`fmt_value` first); None is :data:`MISSING`."""
    body = [[MISSING if c is None else str(c) for c in r] for r in rows]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in body]
    h = "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in header) + "</tr>"
    h += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body) + "</table>"
    return "\n".join(md), h


def embed_png(path: Path, caption: str | None = None) -> str:
    """A PNG embedded in the HTML (the report is one self-contained file), under its caption."""
    caption = path.stem if caption is None else caption
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def html_page(title: str, parts: Sequence[str]) -> str:
    """A whole HTML report: the shared style, then ``parts`` (already HTML)."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>" + "\n".join(parts) + "</body></html>")
