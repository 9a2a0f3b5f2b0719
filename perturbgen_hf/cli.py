"""
The `perturbgen-hf` command.

Each subcommand lives in a `_add_<name>_parser` function that registers its arguments and the function that runs it.
Errors in the user's input end the command with one line on stderr and exit code 1; usage errors exit with 2.
"""

import argparse
import logging
import sys
from pathlib import Path

from . import __version__


logger = logging.getLogger("perturbgen_hf")

# Exceptions that describe bad input or a missing file: reported as one line, without a traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def _add_tokenize_parser(subparsers):
    from .data.tokenize_dataset import add_tokenize_arguments, run_tokenize_command

    parser = subparsers.add_parser(
        "tokenize",
        help="AnnData (.h5ad) -> tokenized source/target dataset on disk",
        description=(
            "Rank-value encode the cells of an AnnData file of raw counts, pair source cells with target cells at "
            "later time points, and write a datasets.Dataset, the tokenizer and a description to OUT."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_tokenize_arguments(parser)
    parser.set_defaults(run=run_tokenize_command)


def _add_train_parser(subparsers):
    # Options belong to HfArgumentParser (model, data and every TrainingArguments flag): they are passed through.
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a model on a tokenized dataset (Trainer; `perturbgen-hf train --help` for options)",
        add_help=False,
    )
    parser.set_defaults(run=_run_train)


def _run_train(args):
    from .training import main as train_main

    return train_main(args.passthrough)


# YAML keys of the original PerturbGen's perturbation config that mean the same here.
ORIGINAL_PERTURB_KEYS = {
    "genes_to_perturb": "genes",
    "perturbation_mode": "mode",
    "perturbation_sequence": "site",
    "pred_tps": "time_points",
    "pert_tps": "perturb_time_points",
}
PERTURB_KEYS = ("genes", "screen", "mode", "site", "perturb_time_points", "method", "targets", "time_points",
                "num_samples", "iterations", "temperature", "seed", "batch_size", "variants_per_batch", "group_key",
                "gene_ids", "layer", "null_perturbations", "fdr", "min_abs_log2fc", "bootstrap")  # fmt: skip


def _add_perturb_parser(subparsers):
    parser = subparsers.add_parser(
        "perturb",
        help="in silico perturbation of source cells with a trained model",
        description=(
            "Perturb genes in source cells (an h5ad of raw counts), predict the later time points for control and "
            "perturbed cells, and write the predictions, differential expression, a summary, the run's config and "
            "PNG plots to OUT. Options may come from --config YAML (keys as below, or the original PerturbGen's "
            "genes_to_perturb, perturbation_mode, perturbation_sequence, pred_tps, pert_tps); the command line wins. "
            "Large screens run data-parallel: `torchrun --nproc_per_node N -m perturbgen_hf.cli perturb ...` (or "
            "`accelerate launch`) shares the cell x gene grid between processes and writes one result."
        ),
    )
    parser.add_argument("--model", required=True, help="trained model folder or Hub id")
    parser.add_argument("--adata", required=True, help="h5ad of source-state cells (raw counts)")
    parser.add_argument("--out", required=True, help="output folder (refused if not empty, unless --overwrite)")
    genes = parser.add_mutually_exclusive_group()
    genes.add_argument("--genes", nargs="+", help="genes perturbed together (symbols or Ensembl IDs)")
    genes.add_argument("--screen", nargs="+", help="genes perturbed one at a time")
    parser.add_argument(
        "--mode", choices=["mask", "pad", "delete", "overexpress"], help="perturbation (default: mask)"
    )
    parser.add_argument(
        "--site", choices=["src", "tgt"], help="edit the source cell or predicted target cells (default: src)"
    )
    parser.add_argument(
        "--perturb-time-points", nargs="+", help="with --site tgt: the time points whose cells are edited"
    )
    parser.add_argument(
        "--method",
        choices=["generate", "teacher_forced"],
        help="generate the future states (default), or read out observed target cells given by --targets",
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        metavar="TIME=H5AD",
        help="with --method teacher_forced: observed target cells per time point, one row per source cell",
    )
    parser.add_argument("--time-points", nargs="+", help="time points to predict, by name or value (default: all)")
    parser.add_argument("--num-samples", type=int, help="generations averaged per cell (default: 1)")
    parser.add_argument("--iterations", type=int, help="MaskGIT iterations (default: 16)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default: 1.0)")
    parser.add_argument("--seed", type=int, help="random seed (default: 0)")
    parser.add_argument("--batch-size", type=int, help="cells per batch and rows per model call (default: 32)")
    parser.add_argument(
        "--variants-per-batch", type=int, help="perturbations of a screen per unit of parallel work (default: 8)"
    )
    parser.add_argument("--group-key", help="obs column for per-group statistics (e.g. cell_type)")
    parser.add_argument(
        "--gene-id-key", dest="gene_ids", help="var column with the gene identifiers (default: var_names)"
    )
    parser.add_argument("--layer", help="layer of raw counts to use instead of X")
    parser.add_argument("--config", help="YAML file of the options above")
    parser.add_argument(
        "--null-perturbations",
        type=int,
        help="sham perturbations per perturbation (the same edit of genes the cells express as often and as highly), "
        "the null every effect's p-value is computed against; 0 = no null, nothing called significant (default: 10)",
    )
    parser.add_argument(
        "--fdr",
        type=float,
        help="BH-adjusted p-value (against the null) below which a gene may be significant (default: 0.05)",
    )
    parser.add_argument(
        "--min-abs-log2fc",
        type=float,
        help="smallest |log2 fold change| called significant, together with --fdr (default: 0.1)",
    )
    parser.add_argument(
        "--bootstrap", type=int, help="bootstrap resamples of the cells for each effect's 95%% interval (default: 200)"
    )
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.set_defaults(run=_run_perturb)


def _perturb_options(args) -> dict:
    options = {}
    if args.config:
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"Perturbation config not found: {str(path)!r}")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a mapping of option names to values.")
        for key, value in values.items():
            name = ORIGINAL_PERTURB_KEYS.get(key, key)
            if name not in PERTURB_KEYS:
                raise ValueError(
                    f"Unknown key {key!r} in {path}; known: {sorted(PERTURB_KEYS + tuple(ORIGINAL_PERTURB_KEYS))}."
                )
            options[name] = value
    for name in PERTURB_KEYS:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    site = options.get("site")
    if isinstance(site, (list, tuple)):  # the original writes perturbation_sequence: [src]
        if len(site) != 1:
            raise ValueError(f"Perturb one site per run (src or tgt), got {site}.")
        options["site"] = site[0]
    if isinstance(options.get("targets"), (list, tuple)):
        options["targets"] = _parse_targets(options["targets"])
    if isinstance(options.get("genes"), str):
        options["genes"] = [options["genes"]]
    if "genes" in options and "screen" in options and args.config:
        # A command-line choice replaces the config's.
        options.pop("screen" if args.genes else "genes")
    return options


def _parse_targets(items) -> dict:
    targets = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--targets takes TIME=H5AD pairs, got {item!r}.")
        if not Path(path).is_file():
            raise FileNotFoundError(f"Target h5ad for {name} not found: {path!r}")
        targets[name] = path
    return targets


def _run_perturb(args):
    from transformers import pipeline

    import perturbgen_hf  # noqa: F401  (registers the task)

    from .io_utils import check_h5ad_file, check_model_location, load_model_folder

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"Output folder {str(out)!r} is not empty; pass --overwrite to replace it.")
    check_h5ad_file(args.adata, "source")
    check_model_location(args.model)
    options = _perturb_options(args)
    from .pipelines.pipeline_perturbation import process_state

    state = process_state()  # under torchrun / accelerate launch: this process's device and rank
    device = state.device if state.num_processes > 1 else None
    # Loaded here rather than by `pipeline(model=path)`, which wraps every loading error in a multi-line report.
    model, tokenizer = load_model_folder(args.model)
    pipe = pipeline("perturbation", model=model, tokenizer=tokenizer, device=device)
    result = pipe(args.adata, **options)
    if not state.is_main_process:  # every process holds the gathered result; one writes it
        return 0
    result.save(out, overwrite=args.overwrite)
    if not args.no_plots:
        result.plot(out / "plots")
    summary = result.summary
    unaffected = ", ".join(f"{k}: {v}" for k, v in summary["cells_unaffected"].items())
    hits = int(result.de[result.de["group"] == "all"]["significant"].sum())
    if summary["null_perturbations"]:
        verdict = (f"{hits} gene x time point results significant against {summary['null_perturbations']} sham "
                   f"perturbations (BH-adjusted p < {summary['fdr']} and |log2 fold change| >= "
                   f"{summary['min_abs_log2fc']})")  # fmt: skip
    else:
        verdict = "no null (--null-perturbations 0): nothing is called significant"
    sys.stdout.write(
        f"perturbed {', '.join(summary['perturbations'])} in {summary['cells']} cells (unaffected: {unaffected}); "
        f"{verdict}; wrote {out}\n"
    )
    return 0


def _add_demo_parser(subparsers):
    parser = subparsers.add_parser(
        "demo",
        help="the whole job on simulated data with a known answer (2-4 minutes on a 2-core CPU)",
        description=(
            "Simulate a time course driven by a known regulatory cascade, tokenize it, train a small model, knock "
            "out a regulator in held-out source cells, and score the predicted effect at each later time point "
            "against the truth (the same cells simulated with the knockout), beside baselines (no change, a linear "
            "model, a random ranking). Writes OUT/report.md, plots, scores and the trained model. With --adata, the "
            "same steps run on your data (raw counts), without a truth to score."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
        "--null-perturbations", type=int, default=argparse.SUPPRESS,
        help="sham knockouts the significance calls are judged against (default: 10, each about as costly "
        "as the knockout itself; 0 skips them and calls nothing significant; with --fast: 3)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--fast", action="store_true", help="tiny sizes (seconds; the scores mean nothing)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.set_defaults(run=_run_demo)


def _run_demo(args):
    from dataclasses import replace

    from .demo import FAST, DemoSettings, run_demo

    settings = replace(FAST if args.fast else DemoSettings(), seed=args.seed)
    if getattr(args, "max_steps", None) is not None:
        settings = replace(settings, max_steps=args.max_steps)
    if getattr(args, "null_perturbations", None) is not None:
        settings = replace(settings, null_perturbations=args.null_perturbations)
    summary = run_demo(args.out, settings, adata=args.adata, time_key=args.time_key, source=args.source,
                       gene=args.gene, overwrite=args.overwrite, progress=True)  # fmt: skip
    lines = [f"perturbgen-hf demo finished in {summary['seconds']:.0f} s."]
    if "auroc" in summary:
        target = summary["target"]
        lines.append(f"{summary['regulator']} knockout, AUROC / Pearson against the truth per time point (target "
                     f">= {target['auroc']} / >= {target['pearson']}):")  # fmt: skip
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


def _add_evaluate_parser(subparsers):
    from .evaluation.protocols import MODEL_COUNTS, PROTOCOLS, EvaluationSettings

    defaults = EvaluationSettings()
    parser = subparsers.add_parser(
        "evaluate",
        help="hold out a time point, a group or cells; predict them and score the model beside baselines",
        description=(
            "Evaluate a model on data it never saw: --protocol heldout-time leaves a whole time point out "
            "(interpolation or extrapolation), heldout-group leaves a group out (e.g. a cell type: learn ctrl -> stim "
            "on the others, predict it from its ctrl cells), heldout-cells leaves a random fraction of the cells of "
            "every time point out. Without --model a model is trained on the rest (OUT/model). Predictions are "
            "generated from the source cells and scored on the model's target genes (log1p CP10k) beside baselines "
            "computed the same way (no change, training mean, nearest time point, linear PCA + ridge). Writes "
            "OUT/metrics.json, a tidy OUT/metrics.csv (metric, time_point, group, method, value) and OUT/plots/."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("adata", nargs="?", help="h5ad of raw counts with every time point (or give --data)")
    parser.add_argument("--data", help="a `perturbgen-hf tokenize` output folder: its input h5ad and options are used")
    parser.add_argument("--out", required=True, help="output folder (refused if not empty, unless --overwrite)")
    parser.add_argument("--protocol", required=True, choices=PROTOCOLS, help="what is held out")
    parser.add_argument("--heldout", help="the held-out time point (heldout-time) or group (heldout-group)")
    parser.add_argument("--time-key", help="obs column of time points (or states, e.g. ctrl/stim)")
    parser.add_argument("--source", help="the source time point that predictions start from")
    parser.add_argument("--time-order", nargs="+", help="time points in temporal order (default: as tokenize)")
    parser.add_argument("--time-value-key", help="obs column with the numeric time of each cell")
    parser.add_argument("--group-key", help="obs column of groups (needed by heldout-group; else per-group scores)")
    parser.add_argument("--gene-id-key", help="var column of gene identifiers (default: var_names)")
    parser.add_argument("--pairing-key", help="stratify training pairs by this obs column (default: --group-key)")
    parser.add_argument("--pairing", choices=("stratified", "transport"), default=defaults.pairing,
                        help="training pairs: stratified (random within --pairing-key groups) or transport (each "
                        "source with its likely descendants, within groups)")  # fmt: skip
    parser.add_argument("--model", help="a model trained without the held-out part (default: train one)")
    parser.add_argument("--preset", default=defaults.preset, help="size of the model trained (tiny, compact, small)")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps, help="training steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="training batch size")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="training learning rate")
    parser.add_argument("--n-hvg", type=int, default=defaults.n_hvg, help="target genes of a trained model")
    parser.add_argument("--max-source-length", type=int, default=defaults.max_source_length,
                        help="top-ranked source genes read")  # fmt: skip
    parser.add_argument("--max-target-length", type=int, default=defaults.max_target_length,
                        help="top-ranked target genes trained on")  # fmt: skip
    parser.add_argument("--iterations", type=int, default=defaults.iterations, help="MaskGIT steps per time point")
    parser.add_argument("--heldout-fraction", type=float, default=defaults.heldout_fraction,
                        help="share of each time point's cells held out (heldout-cells)")  # fmt: skip
    parser.add_argument("--model-counts", choices=MODEL_COUNTS, default=defaults.model_counts,
                        help="the model's predicted cells: Poisson draws around its expected counts, draws from its "
                        "own (ZI)NB (whose dispersion counts the generated cells' variation twice), or the expected "
                        "counts")  # fmt: skip
    parser.add_argument("--top-de", type=int, default=defaults.top_de, help="DE genes of pearson_delta_top*_de")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of splits, training and generation")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(run=_run_evaluate)


def _run_evaluate(args):
    from .evaluation.protocols import EvaluationSettings, options_from_tokenized, run_evaluation

    options = {"adata": args.adata, "time_key": args.time_key, "source": args.source,
               "gene_id_key": args.gene_id_key, "pairing_key": args.pairing_key}  # fmt: skip
    if args.data:
        recorded = options_from_tokenized(args.data)
        options = {k: v if v is not None else recorded.get(k) for k, v in options.items()}
    missing = [f"--{k.replace('_', '-')}" for k in ("adata", "time_key", "source") if options[k] is None]
    if missing:
        raise ValueError(f"evaluate needs {', '.join(missing)} (or --data, a tokenized folder that records them).")
    settings = EvaluationSettings(
        preset=args.preset, max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        n_hvg=args.n_hvg, max_source_length=args.max_source_length, max_target_length=args.max_target_length,
        iterations=args.iterations, heldout_fraction=args.heldout_fraction, top_de=args.top_de, seed=args.seed,
        model_counts=args.model_counts, pairing=args.pairing,
    )  # fmt: skip
    result = run_evaluation(
        options.pop("adata"), args.out, args.protocol, heldout=args.heldout, group_key=args.group_key,
        time_order=args.time_order, time_value_key=args.time_value_key, model=args.model, settings=settings,
        overwrite=args.overwrite, progress=not args.no_progress, **options,
    )  # fmt: skip
    sys.stdout.write(_evaluation_lines(result))
    return 0


def _evaluation_lines(result) -> str:
    lines = [
        f"perturbgen-hf evaluate ({result['protocol']}, held out: {result['heldout']}) in {result['seconds']:.0f} s"
    ]
    for state, best in result["best_method"].items():
        won = sorted(m for m, method in best.items() if method.startswith("PerturbGen"))
        lines.append(f"  {state}: the model is best on {len(won)} of {len(best)} metrics{': ' if won else ''}"
                     f"{', '.join(won)}")  # fmt: skip
    lines.append(f"Metrics: {result['files']['metrics_csv']}")
    return "\n".join(lines) + "\n"


def _add_convert_original_parser(subparsers):
    from .convert_original import add_convert_arguments, run_convert_command

    parser = subparsers.add_parser(
        "convert-original",
        help="convert an original PerturbGen checkpoint (.ckpt) into a folder AutoModel and the pipeline load",
        description=(
            "Convert a checkpoint of the original PerturbGen (Lotfollahi-lab/Perturbgen: stage 1 'masking' or stage 2 "
            "'count' Lightning .ckpt) and its vocabulary pickles into a folder that AutoModel.from_pretrained, "
            "AutoTokenizer.from_pretrained and pipeline('perturbation') load. The configuration selects the original "
            "architecture, so the converted model computes what the original computed. Checkpoints are read without "
            "executing anything in them (AnnData objects in their hyper-parameters become inert placeholders); "
            "every unexpected or missing key and every shape mismatch is reported by name."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_convert_arguments(parser)
    parser.set_defaults(run=run_convert_command)


SUBCOMMANDS = [
    _add_tokenize_parser,
    _add_train_parser,
    _add_perturb_parser,
    _add_evaluate_parser,
    _add_convert_original_parser,
    _add_demo_parser,
]
PASSTHROUGH = {"train"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perturbgen-hf",
        description=(
            "PerturbGen on Hugging Face transformers: tokenize single-cell data, train, and predict how a gene "
            "perturbation at one cell state reshapes later states."
        ),
    )
    parser.add_argument("--version", action="version", version=f"perturbgen-hf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser in SUBCOMMANDS:
        add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, passthrough = parser.parse_known_args(argv)
    if passthrough and args.command not in PASSTHROUGH:
        parser.error(f"unrecognized arguments: {' '.join(passthrough)}")
    args.passthrough = passthrough
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        sys.stderr.write(f"perturbgen-hf {args.command}: error: {message}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
