"""`perturbgen-hf demo`: the whole job on simulated data with a known answer (or on the user's data)."""

import argparse
import sys

from ._common import HelpFormatter, add_overwrite_arguments


NAME = "demo"


def add_parser(subparsers):
    """Register the `demo` subcommand."""
    parser = subparsers.add_parser(
        NAME,
        help="the whole job on simulated data with a known answer (2-4 minutes on a 2-core CPU)",
        description=(
            "Simulate a time course driven by a known regulatory cascade, tokenize it, train a small model, knock "
            "out a regulator in held-out source cells, and score the predicted effect at each later time point "
            "against the truth (the same cells simulated with the knockout), beside baselines (no change, a linear "
            "model, a random ranking). Writes OUT/report.md, plots, scores and the trained model. With --adata, the "
            "same steps run on your data (raw counts), without a truth to score."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", default="perturbgen_demo", help="output folder (refused if not empty)")
    parser.add_argument("--adata", help="your own h5ad of raw counts instead of the simulation")
    parser.add_argument("--time-key", help="with --adata: obs column of time points")
    parser.add_argument("--source", help="with --adata: the source time point")
    parser.add_argument("--gene", help="with --adata: the gene to knock out (symbol or Ensembl ID)")
    parser.add_argument(
        "--max-steps", type=int, help="training steps (default: 1600; with --fast: 8)", default=argparse.SUPPRESS
    )
    parser.add_argument(
        "--null-perturbations",
        type=int,
        default=argparse.SUPPRESS,
        help="sham knockouts the significance calls are judged against (default: 10, each about as costly "
        "as the knockout itself; 0 skips them and calls nothing significant; with --fast: 3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--fast", action="store_true", help="tiny sizes (seconds; the scores mean nothing)")
    add_overwrite_arguments(parser)
    parser.set_defaults(run=run)


def run(args):
    """Run the demo and print where its report is."""
    from dataclasses import replace

    from ..settings import FAST, DemoSettings
    from .demo_workflow import run_demo

    settings = replace(FAST if args.fast else DemoSettings(), seed=args.seed)
    if getattr(args, "max_steps", None) is not None:
        settings = replace(settings, max_steps=args.max_steps)
    if getattr(args, "null_perturbations", None) is not None:
        settings = replace(settings, null_perturbations=args.null_perturbations)
    summary = run_demo(
        args.out,
        settings,
        adata=args.adata,
        time_key=args.time_key,
        source=args.source,
        gene=args.gene,
        overwrite=args.overwrite,
        force_overwrite=args.force_overwrite,
        progress=True,
    )
    lines = [f"perturbgen-hf demo finished in {summary['seconds']:.0f} s."]
    if "auroc" in summary:
        target = summary["target"]
        lines.append(
            f"{summary['regulator']} knockout, AUROC / Pearson against the truth per time point (target "
            f">= {target['auroc']} / >= {target['pearson']}):"
        )
        for time_point, value in summary["auroc"].items():
            lines.append(
                f"  {time_point}: model {value:.3f} (best baseline {summary['best_baseline_auroc'][time_point]:.3f}), "
                f"Pearson {summary['pearson'][time_point]:.3f}, sign agreement "
                f"{summary['sign_agreement'][time_point]:.3f}"
            )
        lines.append("Target met." if summary["target_met"] else "Target NOT met: see the report.")
        for time_point, calls in summary.get("significance_calls", {}).items():
            lines.append(
                f"  {time_point}: {calls['called']} genes significant against the sham null, precision "
                f"{calls['precision']:.2f}, recall {calls['recall']:.2f} of the {calls['responders']} true responders"
            )
    lines.append(f"Report: {summary['files']['report']}; model: {summary['files']['model']}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
