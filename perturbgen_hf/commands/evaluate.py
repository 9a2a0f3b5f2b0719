"""`perturbgen-hf evaluate`: hold out a time point, a group or cells; predict them; score beside baselines."""

import sys

from ..settings import MODEL_COUNTS, PRESETS, PROTOCOLS, TIME_SCALES, EvaluationSettings
from ._common import HelpFormatter, add_output_arguments


NAME = "evaluate"


def add_parser(subparsers):
    """Register the `evaluate` subcommand."""
    defaults = EvaluationSettings()
    parser = subparsers.add_parser(
        NAME,
        help="hold out a time point, a group or cells; predict them and score the model beside baselines",
        description=(
            "Evaluate a model on data it never saw: --protocol heldout-time leaves a whole time point out "
            "(interpolation or extrapolation), heldout-group leaves a group out (e.g. a cell type: learn ctrl -> stim "
            "on the others, predict it from its ctrl cells), heldout-cells leaves a random fraction of the cells of "
            "every time point out. Without --model a model is trained on the rest (OUT/model). Predictions are "
            "generated from the source cells and scored on the model's target genes (log1p CP10k) beside baselines "
            "computed the same way (no change, training mean, linear PCA + ridge; for a held-out time point also the "
            "nearest time point, the linear interpolation of its neighbours and their optimal-transport "
            "interpolation). Writes "
            "OUT/metrics.json, a tidy OUT/metrics.csv (metric, time_point, group, method, value) and OUT/plots/."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("adata", nargs="?", help="h5ad of raw counts with every time point (or give --data)")
    parser.add_argument("--data", help="a `perturbgen-hf tokenize` output folder: its input h5ad and options are used")
    add_output_arguments(parser)
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS, help="what is held out")
    parser.add_argument("--heldout", help="the held-out time point (heldout-time) or group (heldout-group)")
    parser.add_argument("--time-key", help="obs column of time points (or states, e.g. ctrl/stim)")
    parser.add_argument("--source", help="the source time point that predictions start from")
    parser.add_argument("--time-order", nargs="+", help="time points in temporal order (default: as tokenize)")
    parser.add_argument("--time-value-key", help="obs column with the numeric time of each cell")
    parser.add_argument("--group-key", help="obs column of groups (needed by heldout-group; else per-group scores)")
    parser.add_argument("--gene-id-key", help="var column of gene identifiers (default: var_names)")
    parser.add_argument("--pairing-key", help="stratify training pairs by this obs column (default: --group-key)")
    parser.add_argument(
        "--pairing",
        choices=("stratified", "transport"),
        default=defaults.pairing,
        help="training pairs: stratified (random within --pairing-key groups) or transport (each "
        "source with its likely descendants, within groups)",
    )
    parser.add_argument("--model", help="a model trained without the held-out part (default: train one)")
    parser.add_argument("--preset", default=defaults.preset, help=f"size of the model trained: {', '.join(PRESETS)}")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps, help="training steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training batch size")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="training learning rate")
    parser.add_argument("--n-hvg", type=int, default=defaults.n_hvg, help="target genes of a trained model")
    parser.add_argument(
        "--max-source-length", type=int, default=defaults.max_source_length, help="top-ranked source genes read"
    )
    parser.add_argument(
        "--max-target-length", type=int, default=defaults.max_target_length, help="top-ranked target genes trained on"
    )
    parser.add_argument(
        "--time-scale",
        choices=TIME_SCALES,
        default=defaults.time_scale,
        help="time values' scale in the trained model's time embedding (see train --time_scale)",
    )
    parser.add_argument("--iterations", type=int, default=defaults.iterations, help="MaskGIT steps per time point")
    parser.add_argument(
        "--heldout-fraction",
        type=float,
        default=defaults.heldout_fraction,
        help="share of each time point's cells held out (heldout-cells)",
    )
    parser.add_argument(
        "--model-counts",
        choices=MODEL_COUNTS,
        default=defaults.model_counts,
        help="the model's predicted cells: Poisson draws around its expected counts, draws from its "
        "own (ZI)NB (whose dispersion counts the generated cells' variation twice), or the expected "
        "counts",
    )
    parser.add_argument("--top-de", type=int, default=defaults.top_de, help="DE genes of pearson_delta_top*_de")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of splits, training and generation")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=run)


def run(args):
    """Run an evaluation protocol and print which methods win."""
    from .evaluate_workflow import options_from_tokenized, run_evaluation

    options = {
        "adata": args.adata,
        "time_key": args.time_key,
        "source": args.source,
        "gene_id_key": args.gene_id_key,
        "pairing_key": args.pairing_key,
    }
    if args.data:
        recorded = options_from_tokenized(args.data)
        options = {k: v if v is not None else recorded.get(k) for k, v in options.items()}
    missing = [f"--{k.replace('_', '-')}" for k in ("adata", "time_key", "source") if options[k] is None]
    if missing:
        raise ValueError(f"evaluate needs {', '.join(missing)} (or --data, a tokenized folder that records them).")
    settings = EvaluationSettings(
        preset=args.preset,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        n_hvg=args.n_hvg,
        max_source_length=args.max_source_length,
        max_target_length=args.max_target_length,
        iterations=args.iterations,
        heldout_fraction=args.heldout_fraction,
        top_de=args.top_de,
        seed=args.seed,
        model_counts=args.model_counts,
        pairing=args.pairing,
        time_scale=args.time_scale,
    )
    result = run_evaluation(
        options.pop("adata"),
        args.out,
        args.protocol,
        heldout=args.heldout,
        group_key=args.group_key,
        time_order=args.time_order,
        time_value_key=args.time_value_key,
        model=args.model,
        settings=settings,
        overwrite=args.overwrite,
        force_overwrite=args.force_overwrite,
        progress=not args.no_progress,
        **options,
    )
    sys.stdout.write(_evaluation_lines(result))
    return 0


def _evaluation_lines(result) -> str:
    lines = [
        f"perturbgen-hf evaluate ({result['protocol']}, held out: {result['heldout']}) in {result['seconds']:.0f} s"
    ]
    for state, best in result["best_method"].items():
        won = sorted(m for m, method in best.items() if method.startswith("PerturbGen"))
        lines.append(
            f"  {state}: the model is best on {len(won)} of {len(best)} metrics{': ' if won else ''}{', '.join(won)}"
        )
    lines.append(f"Metrics: {result['files']['metrics_csv']}")
    return "\n".join(lines) + "\n"
