"""report.html: one self-contained file (inline CSS, base64 PNG figures, inline SVG histograms, a few
lines of vanilla JS for tabs). Nothing is fetched: it opens offline from any browser."""

from __future__ import annotations

import base64
import html
import re
from typing import Any

from orthosae.report.tables import Table, fmt

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d1d1f;
background:#fafafa}
header{background:#24292f;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c9d1d9;font-size:13px}
nav{display:flex;gap:4px;padding:8px 24px 0;background:#eaeef2;position:sticky;top:0;z-index:1}
nav button{border:0;background:none;padding:8px 14px;font:inherit;cursor:pointer;border-radius:6px 6px 0 0}
nav button.active{background:#fafafa;font-weight:600}
main{padding:8px 24px 40px;max-width:1400px}
section.tab{display:block}body.js section.tab{display:none}body.js section.tab.active{display:block}
table{border-collapse:collapse;margin:8px 0 18px;font-size:13px;background:#fff}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f4f6;position:sticky;top:38px}td.num,td.ok,td.bad{text-align:right;font-variant-numeric:tabular-nums}
td.ok{color:#116329;background:#e6f4ea}td.bad{color:#a40e26;background:#fdecee}td.na{color:#8c959f;font-style:italic}
tr.group td{background:#eaeef2;font-weight:600}
p.note{color:#57606a;font-size:12.5px;max-width:1000px}.missing{color:#8c959f;font-style:italic}
img.fig{max-width:100%;background:#fff;border:1px solid #d0d7de;margin:6px 0 18px}
details.feat{background:#fff;border:1px solid #d0d7de;border-radius:6px;margin:6px 0;padding:4px 10px}
details.feat summary{cursor:pointer;font-weight:600}details.feat .why{font-weight:400;color:#57606a}
.ctx{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px;white-space:pre-wrap;
margin:2px 0;padding:2px 4px;border-bottom:1px solid #eee}
.ctx span{border-radius:2px}.ctx span.max{outline:1px solid #b35900}.ctx .val{color:#57606a;margin-right:8px}
.cols{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
.logits td{font-family:ui-monospace,monospace}
"""

JS = """
document.body.classList.add('js');
function showTab(id){
document.querySelectorAll('section.tab').forEach(s=>s.classList.toggle('active',s.id===id));
document.querySelectorAll('nav button').forEach(b=>b.classList.toggle('active',b.dataset.tab===id));}
document.querySelectorAll('nav button').forEach(b=>b.addEventListener('click',()=>{
showTab(b.dataset.tab);try{history.replaceState(null,'','#'+b.dataset.tab);}catch(err){}}));
const first=document.querySelector('nav button').dataset.tab;
const asked=location.hash.slice(1);
showTab(document.getElementById(asked)?asked:first);
"""

e = html.escape


def table_html(table: Table) -> str:
    out = [f"<h3>{e(table.title)}</h3>"]
    if table.note:
        out.append(f'<p class="note">{e(table.note)}</p>')
    out.append(
        "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in table.header) + "</tr></thead><tbody>"
    )
    for i, row in enumerate(table.rows):
        cls = ' class="group"' if i in table.group_rows else ""
        cells = "".join(
            f'<td class="{c.cls}">{e(c.text)}</td>' if c.cls else f"<td>{e(c.text)}</td>" for c in row
        )
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def paragraphs_html(paragraphs: list[str]) -> str:
    """Markdown-lite paragraphs (the verdict): **bold**, and lines starting with "- " as a list."""

    def inline(text: str) -> str:
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))

    out = []
    for para in paragraphs:
        lines = para.split("\n")
        items = [ln[2:] for ln in lines if ln.startswith("- ")]
        text = " ".join(ln for ln in lines if ln and not ln.startswith("- "))
        out.append(f"<p>{inline(text)}</p>" if text else "")
        if items:
            out.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
    return "".join(out)


def figure_html(title: str, png: bytes | None, missing: str) -> str:
    if png is None:
        return f'<h3>{e(title)}</h3><p class="missing">{e(missing)}</p>'
    data = base64.b64encode(png).decode("ascii")
    return f'<h3>{e(title)}</h3><img class="fig" alt="{e(title)}" src="data:image/png;base64,{data}">'


def _histogram_svg(edges: list[float], counts: list[int], width: int = 260, height: int = 90) -> str:
    """Bars of a log-binned activation histogram as inline SVG (bins are equal width on a log axis)."""
    if not counts or max(counts) == 0:
        return '<p class="missing">no activations in the sample</p>'
    peak = max(counts)
    bw = width / len(counts)
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - 14 - c / peak * (height - 18):.1f}" '
        f'width="{max(bw - 1, 1):.1f}" height="{c / peak * (height - 18):.1f}" fill="#e07b00">'
        f"<title>{fmt(edges[i])}–{fmt(edges[i + 1])}: "
        f"{c}</title></rect>"
        for i, c in enumerate(counts)
    )
    labels = (
        f'<text x="0" y="{height - 2}" font-size="10">{fmt(edges[0])}</text>'
        f'<text x="{width}" y="{height - 2}" font-size="10" text-anchor="end">{fmt(edges[-1])}</text>'
    )
    return (
        f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="activation histogram">'
        f"{bars}{labels}</svg>"
    )


def _token_html(tok: str, act: float, peak: float, is_max: bool) -> str:
    alpha = 0.0 if peak <= 0 else max(0.0, min(1.0, act / peak))
    shown = tok.replace("\n", "↵").replace("\t", "→") or "∅"
    cls = ' class="max"' if is_max else ""
    return (
        f'<span{cls} style="background:rgba(255,140,0,{alpha:.2f})" title="{e(repr(tok))}: {fmt(act)}">'
        f"{e(shown)}</span>"
    )


def _feature_html(f: dict[str, Any], is_open: bool = False) -> str:
    why = "; ".join(f.get("reasons", []))
    head = (
        f'<summary>#{f["id"]} <span class="why">— {e(why)} — freq {fmt(f.get("freq"))}, '
        f"max {fmt(f.get('max_act'))}</span></summary>"
    )
    peak = float(f.get("max_act") or 0.0)
    examples = []
    for ex in f.get("examples", []):
        toks = "".join(
            _token_html(t, a, peak, i == ex.get("center"))
            for i, (t, a) in enumerate(zip(ex.get("tokens", []), ex.get("acts", []), strict=False))
        )
        where = f"context {ex.get('context')}, position {ex.get('position')}"
        examples.append(
            f'<div class="ctx" title="{e(where)}"><span class="val">{fmt(ex.get("act"))}</span>{toks}</div>'
        )
    logits = "".join(
        f'<tr><td>{e(repr(t["token"]))}</td><td class="num">{fmt(t["value"])}</td></tr>'
        for t in f.get("logits", [])
    )
    hist = f.get("hist") or {}
    return (
        f'<details class="feat"{" open" if is_open else ""}>{head}'
        '<div class="cols"><div style="flex:1;min-width:420px">'
        f"<h4>Top-activating contexts</h4>"
        f"{''.join(examples) or '<p class=missing>none in the sample</p>'}</div>"
        f"<div><h4>Activation histogram</h4>{_histogram_svg(hist.get('edges', []), hist.get('counts', []))}"
        f'<h4>Top promoted logits</h4><table class="logits"><tr><th>token</th><th>W_dec·W_U</th></tr>{logits}'
        "</table></div></div></details>"
    )


def _relu_note(s: dict[str, Any]) -> str:
    cap = s.get("latent_cap")
    return f" (among each token's {cap} strongest latents: a ReLU SAE's L0 is unbounded)" if cap else ""


def features_html(features: dict[str, Any] | None, status: str, order: list[str] | None = None) -> str:
    """The browser tab; SAEs in `order` (e.g. baseline first), the first feature of each expanded."""
    out = [f'<p class="note">{e(status)}.</p>']
    if not features:
        return "\n".join(out)
    out.append(
        f'<p class="note">Sample: {features.get("n_tokens", 0):,} tokens of {e(str(features.get("cache")))} '
        f"(model {e(str(features.get('model')))}, layer {features.get('layer')}). "
        "Token opacity ∝ the feature's activation relative to its maximum in the sample; "
        "the outlined token is the max-activating one. "
        "Logits: W_dec[f] · W_Uᵀ with the LM's unembedding (no final norm).</p>"
    )
    saes = features.get("saes") or {}
    for name in [n for n in order or [] if n in saes] + [n for n in saes if n not in (order or [])]:
        s = saes[name]
        h = s.get("coactive_cos2") or {}
        out.append(
            f'<h3>{e(name)}</h3><p class="note">{s.get("arch")} SAE, d_sae {s.get("d_sae")}, alive in sample '
            f"{fmt(s.get('frac_alive'))}; co-active decoder cos²: mean {fmt(h.get('mean'))}, max "
            f"{fmt(h.get('max'))} over {fmt(h.get('n_pairs'))} pair-tokens"
            f"{_relu_note(s)}.</p>"
        )
        pairs = "".join(
            f'<tr><td>{p["a"]}</td><td>{p["b"]}</td><td class="num">{fmt(p["cos2"])}</td></tr>'
            for p in s.get("top_pairs", [])
        )
        if pairs:
            out.append(
                "<details><summary>Highest-cos² co-active pairs</summary><table><tr><th>a</th><th>b</th>"
                f"<th>cos²</th></tr>{pairs}</table></details>"
            )
        out += [_feature_html(f, i == 0) for i, f in enumerate(s.get("features", []))]
    return "\n".join(out)


def page(title: str, subtitle: str, tabs: list[tuple[str, str, str]]) -> str:
    """tabs: (id, label, inner HTML)."""
    nav = "".join(f'<button data-tab="{tid}">{e(label)}</button>' for tid, label, _ in tabs)
    body = "".join(
        f'<section class="tab" id="{tid}"><h2>{e(label)}</h2>{inner}</section>' for tid, label, inner in tabs
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{e(title)}</h1><p>{e(subtitle)}</p></header><nav>{nav}</nav><main>{body}</main>"
        f"<script>{JS}</script></body></html>\n"
    )
