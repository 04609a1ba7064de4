"""Tables: a list of row dicts that shows as HTML in a notebook and as Markdown in a file.

Shared by the stages that report rows (evaluate's before/after answers, runs' comparison), so
neither has to import the other for it.
"""

from __future__ import annotations

import html
from typing import Any


class Table(list):
    """A list of row dicts that shows as an HTML table in a notebook and as Markdown in a file."""

    def columns(self) -> list[str]:
        """Column names, in first-seen order."""
        names: dict[str, None] = {}
        for row in self:
            names.update(dict.fromkeys(row))
        return list(names)

    def _repr_html_(self) -> str:
        head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in self.columns())
        body = "".join(
            "<tr>" + "".join(
                f"<td style='text-align:left;white-space:pre-wrap'>{html.escape(cell_text(row.get(c)))}</td>"
                for c in self.columns()) + "</tr>"
            for row in self
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table (newlines and pipes escaped)."""
        cols = self.columns()
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for row in self:
            cells = [cell_text(row.get(c)).replace("|", "\\|").replace("\n", "<br>") for c in cols]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def cell_text(value: Any) -> str:
    """How a table shows one value: floats to 4 significant digits, a chat as its last user turn, None as nothing.

    Args:
        value: A cell's value.

    Returns:
        The text shown in the cell.
    """
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):  # a chat: show the last user turn
        users = [m["content"] for m in value if m.get("role") == "user"]
        return users[-1] if users else str(value)
    return str(value)
