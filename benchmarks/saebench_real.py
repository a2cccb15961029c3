"""Our absorption, sparse probing and unlearning evals against SAEBench 0.6.0's own code, on REAL inputs:
the activations of the bundled SmolLM2-135M at the SAE's layer and real trained SAEs.

For each SAE both sides get the same words / prompts / texts, the same LM activations (read once by our
eval; SAEBench's functions receive them through stand-in model objects, since SAEBench cannot load our
model through transformer_lens offline) and the same SAE weights (a stand-in SAE object holding our folded
weights). SAEBench runs in its own venv (tests/saebench_peer.py builds .venv-peers/saebench on first use).
What each eval compares, and which SAEBench functions run, is in the docstrings of
benchmarks/saebench_real_{absorption,probing,unlearning}.py and in benchmarks/README.md.

    PYTHONPATH=src .venv/bin/python benchmarks/saebench_real.py --quick
    PYTHONPATH=src .venv/bin/python benchmarks/saebench_real.py --saes runs/seed/saes/topk runs/seed/saes/relu

Each table row: metric, ours, SAEBench's, ours − SAEBench's, and our bootstrap 95 % interval (the eval's
`_ci95`), with whether SAEBench's value lies inside it. Results go to --out (JSON, written atomically).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

import saebench_real_common as common
from orthosae.atomic import write_json
from orthosae.eval import sparse_probing as SP
from orthosae.eval import unlearning as U
from orthosae.eval.context import EvalContext
from orthosae.models.loader import load_model

EVALS = ("absorption", "sparse_probing", "unlearning")
DEFAULT_SAES = common.ROOT / "runs" / "seed" / "saes"
DEFAULT_OUT = common.ROOT / "benchmarks" / "results" / "saebench_real.json"

# Sizes: (quick, default). Chosen so that the default runs 3 SAEs in well under 20 min on 2 loaded cores.
SIZES: dict[str, tuple[Any, Any]] = {
    "abs_words": (200, 1000),
    "abs_icl": (4, 10),
    "abs_max_k": (3, 10),
    "abs_min_letters": (20, 20),
    "probe_datasets": (["pang_lee_sentiment"], list(SP.Config().dataset_names)),
    "probe_train": (40, 100),
    "probe_test": (20, 50),
    "probe_max_classes": (2, 6),
    "probe_k": ([1, 2, 5], [1, 2, 5, 10, 20, 50]),
    "unl_questions": (20, 60),
    "unl_corpus_seqs": (8, 24),
    "unl_seq_len": (64, 128),
    "unl_multipliers": ([50, 200], [25, 50, 100, 200]),
    "n_bootstrap": (200, 1000),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--saes", nargs="+", type=Path, help="SAE run directories (default: every dir in runs/seed/saes/)"
    )
    p.add_argument("--evals", default=",".join(EVALS), help=f"comma-separated subset of {','.join(EVALS)}")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (< 3 min)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workdir", type=Path, help="where the SAEBench peer scripts run (default: a temp dir)")
    p.add_argument(
        "--abs-words",
        type=int,
        help="alphabetic tokens used (quick 200, default 1000), at least 8 per letter",
    )
    p.add_argument(
        "--abs-icl", type=int, help="in-context examples per prompt (quick 4, default 10 = SAEBench)"
    )
    p.add_argument(
        "--abs-min-letters",
        type=int,
        help="usable letters needed to report absorption, both sides (SAEBench's min_feats_for_eval, 20). "
        "Below it the tables compare the means over the letters that do pass, with our interval for them",
    )
    p.add_argument("--abs-max-k", type=int, help="largest k of the k-sparse probes (quick 3, default 10)")
    p.add_argument(
        "--abs-variants",
        default="shipped,newton",
        help="SAEBench absorption variants: shipped (as released), newton (k-sparse probes at the optimum)",
    )
    p.add_argument("--probe-datasets", help="comma-separated probing datasets (default: all five)")
    p.add_argument("--probe-train", type=int, help="train texts per task (quick 40, default 100)")
    p.add_argument("--probe-test", type=int, help="test texts per task (quick 20, default 50)")
    p.add_argument("--probe-max-classes", type=int, help="classes per dataset (quick 2, default 6)")
    p.add_argument("--unl-questions", type=int, help="questions per set (quick 20, default 60)")
    p.add_argument(
        "--unl-corpus-seqs", type=int, help="packed corpus sequences per domain (quick 8, default 24)"
    )
    p.add_argument("--unl-seq-len", type=int, help="tokens per packed sequence (quick 64, default 128)")
    return p.parse_args(argv)


def size(args: argparse.Namespace, name: str) -> Any:
    given = getattr(args, name, None)
    if given is not None:
        return given.split(",") if name == "probe_datasets" else given
    return SIZES[name][0 if args.quick else 1]


def load_contexts(dirs: list[Path], seed: int) -> dict[str, EvalContext]:
    shared: dict[Any, Any] = {}
    ctxs: dict[str, EvalContext] = {}
    model = None
    for d in dirs:
        ctx = EvalContext.from_run(d, seed=seed, progress=False, shared=shared, model=model)
        if ctxs:
            first = next(iter(ctxs.values()))
            if (ctx.model_name, ctx.layer) != (first.model_name, first.layer):
                raise SystemExit(
                    f"{d}: model/layer {ctx.model_name}/{ctx.layer} differs from the first SAE's"
                )
        model = model or load_model(ctx.model_name)
        ctx._model = model
        name = d.name if d.name not in ctxs else f"{d.parent.name}/{d.name}"
        ctxs[name] = ctx
    return ctxs


def jsonable(obj: Any) -> Any:
    if isinstance(obj, common.Row):
        return obj.as_dict()
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    return str(obj)


def print_checks(checks: dict[str, Any], indent: str = "  ") -> None:
    for k, v in checks.items():
        if isinstance(v, float):
            v = f"{v:.3g}"
        elif isinstance(v, dict):
            v = ", ".join(f"{a}={b:.3g}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items())
        print(f"{indent}{k}: {v}")


def print_letters(ours_theirs: dict[str, Any]) -> None:
    print("  per letter (ours / SAEBench): mean absorption fraction | full-absorption rate | split features")
    for c, v in ours_theirs.items():
        o, t = v["ours"] or {}, v["saebench"] or {}

        def pair(key: str, fmt: str, o: dict = o, t: dict = t) -> str:
            a = format(o[key], fmt) if key in o else "—"
            b = format(t[key], fmt) if key in t else "—"
            return f"{a:>6}/{b:<6}"

        same = "" if v["split_feats_ours"] == v["split_feats_saebench"] else "  split feats differ"
        print(
            f"    {c}: {pair('mean_absorption_fraction', '.3f')} | {pair('full_absorption_rate', '.3f')} | "
            f"{pair('num_split_features', 'd')}{same}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    evals = [e.strip() for e in args.evals.split(",") if e.strip()]
    for e in evals:
        if e not in EVALS:
            raise SystemExit(f"unknown eval {e!r}: choose from {', '.join(EVALS)}")
    dirs = args.saes
    if not dirs:
        dirs = sorted(p for p in DEFAULT_SAES.iterdir() if p.is_dir()) if DEFAULT_SAES.is_dir() else []
    if not dirs:
        raise SystemExit(f"no SAEs: pass --saes DIR [DIR ...] (nothing in {DEFAULT_SAES})")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="saebench_real_"))
    start = time.perf_counter()
    ctxs = load_contexts(dirs, args.seed)
    ctx0 = next(iter(ctxs.values()))
    out: dict[str, Any] = {
        "saes": {n: str(c.run_dir) for n, c in ctxs.items()},
        "model": ctx0.model_name,
        "layer": ctx0.layer,
        "seed": args.seed,
        "size": "quick" if args.quick else "default",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "loadavg_start": list(os.getloadavg()),
        },
        "seconds": {},
    }
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731

    if "absorption" in evals:
        from saebench_real_absorption import VARIANT_TITLE
        from saebench_real_absorption import run as run_absorption

        t = time.perf_counter()
        variants = [v for v in args.abs_variants.split(",") if v]
        res = run_absorption(
            ctxs,
            n_words=size(args, "abs_words"),
            max_k=size(args, "abs_max_k"),
            seed=args.seed,
            workdir=workdir,
            n_bootstrap=size(args, "n_bootstrap"),
            n_icl=size(args, "abs_icl"),
            min_letters=size(args, "abs_min_letters"),
            variants=variants,
            log=log,
        )
        out["seconds"]["absorption"] = round(time.perf_counter() - t, 1)
        out["absorption"] = res
        print("\n=== absorption (first letter) ===")
        print_checks(res["lm"])
        for name, r in res["saes"].items():
            if r["ours_reason"]:
                print(
                    f"  [{name}] our gate failed: {r['ours_reason']} "
                    "(means and our intervals below are over the letters that pass F1)"
                )
            for variant, v in r["variants"].items():
                print()
                print(common.format_table(f"[{name}] {VARIANT_TITLE[variant]}", v["rows"]))
                print_checks(v["checks"])
                print_letters(v["letters"])

    if "sparse_probing" in evals:
        from saebench_real_probing import run as run_probing

        t = time.perf_counter()
        cfg = SP.Config(
            dataset_names=size(args, "probe_datasets"),
            probe_train_set_size=size(args, "probe_train"),
            probe_test_set_size=size(args, "probe_test"),
            max_classes=size(args, "probe_max_classes"),
            k_values=size(args, "probe_k"),
            n_bootstrap=size(args, "n_bootstrap"),
        )
        res = run_probing(ctxs, cfg=cfg, workdir=workdir, log=log)
        out["seconds"]["sparse_probing"] = round(time.perf_counter() - t, 1)
        out["sparse_probing"] = {"config": asdict(cfg), **res}
        print("\n=== sparse probing (mean over datasets) ===")
        print_checks(res["common"])
        for name, r in res["saes"].items():
            print()
            print(common.format_table(f"[{name}]", r["rows"]))
            print_checks(r["checks"])

    if "unlearning" in evals:
        from saebench_real_unlearning import run as run_unlearning

        t = time.perf_counter()
        cfg_u = U.Config(
            n_questions=size(args, "unl_questions"),
            dataset_size=size(args, "unl_corpus_seqs"),
            seq_len=size(args, "unl_seq_len"),
            multipliers=size(args, "unl_multipliers"),
            n_bootstrap=size(args, "n_bootstrap"),
        )
        res = run_unlearning(ctxs, cfg=cfg_u, workdir=workdir, log=log)
        out["seconds"]["unlearning"] = round(time.perf_counter() - t, 1)
        out["unlearning"] = {"config": asdict(cfg_u), **res}
        print("\n=== unlearning (cloze protocol; SAEBench steps that run on real inputs) ===")
        print_checks(res["common"])
        for name, r in res["saes"].items():
            print()
            print(common.format_table(f"[{name}]", r["rows"]))
            print_checks(r["checks"])

    out["seconds"]["total"] = round(time.perf_counter() - start, 1)
    out["machine"]["loadavg_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, jsonable(out))
    print(f"\nwrote {args.out} ({out['seconds']['total']:.0f} s in all)")
    return out


if __name__ == "__main__":
    main()
