"""report.md: the same tables as the HTML, figures linked as PNGs under figures/."""

from __future__ import annotations

from typing import Any

from orthosae.report.tables import Table, fmt


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_md(table: Table) -> str:
    lines = [f"### {table.title}", ""]
    if table.note:
        lines += [table.note, ""]
    lines.append("| " + " | ".join(_escape(h) for h in table.header) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(table.header))) + "|")
    for i, row in enumerate(table.rows):
        cells = [_escape(c.text) for c in row]
        if i in table.group_rows:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure_md(title: str, rel_path: str | None, missing: str) -> str:
    if rel_path is None:
        return f"### {title}\n\n_{missing}_\n"
    return f"### {title}\n\n![{title}]({rel_path})\n"


def features_md(features: dict[str, Any] | None, status: str, order: list[str] | None = None) -> str:
    """A summary of the browser data (the browser itself is in report.html); SAEs in `order` first."""
    lines = ["## Feature browser", "", status + ". The interactive browser is in report.html.", ""]
    if not features:
        return "\n".join(lines) + "\n"
    lines += [
        f"Sample: {features.get('n_tokens', 0):,} tokens of {features.get('cache')} "
        f"(model {features.get('model')}, layer {features.get('layer')}).",
        "",
        "| SAE | alive (sample) | co-active pairs | mean cos² | max cos² | share cos² > 0.1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    saes = features.get("saes") or {}
    names = [n for n in order or [] if n in saes] + [n for n in saes if n not in (order or [])]
    for name in names:
        s = saes[name]
        h = s.get("coactive_cos2") or {}
        lines.append(
            f"| {name} | {fmt(s.get('frac_alive'))} | {fmt(h.get('n_pairs'))} | {fmt(h.get('mean'))} | "
            f"{fmt(h.get('max'))} | {fmt(h.get('frac_above_0.1'))} |"
        )
    for name in names:
        s = saes[name]
        lines += ["", f"### {name}: shown features", "", "| feature | why | freq | max act | top logits |"]
        lines.append("|---:|---|---:|---:|---|")
        for f in s.get("features", []):
            logits = ", ".join(repr(t["token"]) for t in f.get("logits", [])[:5])
            lines.append(
                f"| {f['id']} | {_escape('; '.join(f.get('reasons', [])))} | {fmt(f.get('freq'))} | "
                f"{fmt(f.get('max_act'))} | {_escape(logits)} |"
            )
    return "\n".join(lines) + "\n"
