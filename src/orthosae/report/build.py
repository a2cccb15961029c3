"""`build_report`: experiment directory → report.md + report.html (+ figures/*.png, features.json)."""

from __future__ import annotations

import datetime as dt
import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from orthosae.atomic import write_text, write_with
from orthosae.errors import UserError
from orthosae.models.loader import LoadedModel
from orthosae.report import html as H
from orthosae.report import markdown as M
from orthosae.report import plots, study, tables
from orthosae.report.features import FeatureOptions, ensure_features, load_features
from orthosae.report.load import Experiment, load_experiment, order_saes

FIGURES_DIR = "figures"


def _figures(
    exp: Experiment, baseline: str, features: dict[str, Any] | None, answer: study.Study
) -> list[tuple[str, str, Figure | None, str]]:
    """(file stem, title, figure or None, what to say when missing)."""
    return [
        (
            "pareto",
            "Absorption against reconstruction (and, right, the toy model's exact absorption against λ)",
            plots.pareto(answer, exp.synthetic),
            "not run: no absorption results",
        ),
        (
            "training_curves",
            "Training curves",
            plots.training_curves(exp, baseline),
            "not run: no metrics.jsonl",
        ),
        (
            "absorption_by_letter",
            "Absorption rate per first letter",
            plots.absorption_by_letter(exp, baseline),
            "not run: no absorption results",
        ),
        (
            "sparse_probing_vs_k",
            "Sparse probing: test accuracy vs k",
            plots.probing_vs_k(exp, baseline),
            "not run: no sparse-probing results",
        ),
        (
            "coactive_cos2",
            "Decoder cos² of co-active latent pairs",
            plots.coactive_cos2(features, baseline),
            "not computed: needs the feature-browser pass over the activation cache",
        ),
    ]


def build_report(
    exp_dir: str | Path,
    baseline: str = "topk",
    *,
    features: bool = True,
    recompute_features: bool = False,
    feature_options: FeatureOptions | None = None,
    model: LoadedModel | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[Path, Path]:
    """(Re)generate `exp_dir`/report.md and report.html. Returns their paths.

    With `features`, the feature-browser data is computed (model + a bounded pass over the cache) unless an
    up-to-date features.json exists; without it, an existing features.json is used as is.
    """
    exp = load_experiment(exp_dir)
    if baseline not in exp.saes:
        hint = difflib.get_close_matches(baseline, list(exp.saes), n=1)
        extra = f" (did you mean '{hint[0]}'?)" if hint else ""
        raise UserError(
            f"baseline SAE '{baseline}' is not in {exp.path}{extra}; "
            f"pass --baseline one of {sorted(exp.saes)}"
        )
    if features:
        feat, status = ensure_features(
            exp.path, options=feature_options, recompute=recompute_features, model=model, progress=progress
        )
    else:
        feat = load_features(exp.path)
        status = (
            "feature browser: reused features.json"
            if feat
            else "feature browser not computed (--no-features)"
        )
    if log:
        log(status)

    fig_dir = exp.path / FIGURES_DIR
    fig_dir.mkdir(exist_ok=True)
    figures: list[tuple[str, str, bytes | None, str]] = []
    answer = study.build_study(exp, baseline)
    for stem, title, fig, missing in _figures(exp, baseline, feat, answer):
        png = plots.to_png(fig) if fig is not None else None
        if png is not None:
            write_with(fig_dir / f"{stem}.png", lambda f, data=png: f.write(data))
        figures.append((stem, title, png, missing))

    verdict = study.verdict(answer)
    pareto_t = study.pareto_table(exp, answer)
    metric_t = tables.metrics_table(exp, baseline)
    speed_t = tables.speed_table(exp)  # speed.json always times against the plain TopK step
    train_t = tables.training_table(exp, baseline)
    sae_t = tables.sae_table(exp, baseline)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"orthosae report: {exp.name}"
    subtitle = f"{len(exp.saes)} SAEs ({', '.join(exp.saes)}), baseline {baseline}; generated {stamp}"

    order = order_saes(list(exp.saes), baseline)
    md_path, html_path = exp.path / "report.md", exp.path / "report.html"
    study_md = ["## Study\n", *(p + "\n" for p in verdict), M.table_md(pareto_t)]
    write_text(
        md_path,
        _markdown(title, subtitle, metric_t, sae_t, train_t, speed_t, figures, feat, status, order, study_md),
    )
    fig = {stem: (title_, png, missing) for stem, title_, png, missing in figures}
    tabs = [
        (
            "study",
            "Study",
            H.paragraphs_html(verdict) + H.table_html(pareto_t) + H.figure_html(*fig["pareto"]),
        ),
        ("metrics", "Metrics", H.table_html(metric_t) + H.table_html(sae_t)),
        ("training", "Training", H.figure_html(*fig["training_curves"]) + H.table_html(train_t)),
        ("speed", "Speed", H.table_html(speed_t)),
        (
            "plots",
            "Plots",
            "".join(
                H.figure_html(*fig[s])
                for s in ("absorption_by_letter", "sparse_probing_vs_k", "coactive_cos2")
            ),
        ),
        ("browser", "Feature browser", H.features_html(feat, status, order)),
    ]
    write_text(html_path, H.page(title, subtitle, tabs))
    return md_path, html_path


def _markdown(
    title: str,
    subtitle: str,
    metric_t: tables.Table,
    sae_t: tables.Table,
    train_t: tables.Table,
    speed_t: tables.Table,
    figures: list[tuple[str, str, bytes | None, str]],
    feat: dict[str, Any] | None,
    status: str,
    order: list[str],
    study_md: list[str],
) -> str:
    by_stem = {stem: (t, png, missing) for stem, t, png, missing in figures}

    def fig_md(stem: str) -> str:
        t, png, missing = by_stem[stem]
        return M.figure_md(t, f"{FIGURES_DIR}/{stem}.png" if png is not None else None, missing)

    parts = [f"# {title}\n\n{subtitle}\n", *study_md, fig_md("pareto")]
    parts += ["## Metrics\n", M.table_md(metric_t), M.table_md(sae_t)]

    parts += ["## Training\n", fig_md("training_curves"), M.table_md(train_t)]
    parts += ["## Speed\n", M.table_md(speed_t)]
    parts += [
        "## Plots\n",
        fig_md("absorption_by_letter"),
        fig_md("sparse_probing_vs_k"),
        fig_md("coactive_cos2"),
    ]
    parts.append(M.features_md(feat, status, order))
    return "\n".join(parts)
