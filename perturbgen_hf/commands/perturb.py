"""`perturbgen-hf perturb`: in silico perturbation of source cells with a trained model."""

import sys
from pathlib import Path

from ..settings import PERTURBATION_ARGUMENTS
from ._common import add_output_arguments


NAME = "perturb"

# YAML keys of the original PerturbGen's perturbation config that mean the same here.
ORIGINAL_PERTURB_KEYS = {
    "genes_to_perturb": "genes",
    "perturbation_mode": "mode",
    "perturbation_sequence": "site",
    "pred_tps": "time_points",
    "pert_tps": "perturb_time_points",
}
# Every call argument of the pipeline but `progress` (the command shows progress on the main process).
PERTURB_KEYS = tuple(dict.fromkeys(k for step in PERTURBATION_ARGUMENTS.values() for k in step if k != "progress"))


def add_parser(subparsers):
    """Register the `perturb` subcommand."""
    parser = subparsers.add_parser(
        NAME,
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
    add_output_arguments(parser)
    genes = parser.add_mutually_exclusive_group()
    genes.add_argument("--genes", nargs="+", help="genes perturbed together (symbols or Ensembl IDs)")
    genes.add_argument("--screen", nargs="+", help="genes perturbed one at a time")
    genes.add_argument(
        "--screen-file",
        help="text file of genes perturbed one at a time: one per line, # starts a comment (what `embed` writes)",
    )
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
    parser.set_defaults(run=run)


def _perturb_options(args) -> dict:
    options = {}
    if args.config:
        from ..io_utils import read_yaml_options

        path = Path(args.config)
        values = read_yaml_options(path, "perturbation config")
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
    if getattr(args, "screen_file", None):
        options.pop("genes", None)
        options["screen"] = read_screen_file(args.screen_file)
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


def read_screen_file(path) -> list[str]:
    """Genes of a screen file: one per line; blank lines and text after `#` are ignored; a repeat is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Screen file not found: {str(path)!r}")
    genes = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        gene = line.split("#", 1)[0].strip()
        if not gene:
            continue
        if len(gene.split()) > 1:
            raise ValueError(f"{path}:{number}: one gene per line, got {gene!r}.")
        if gene in genes:
            raise ValueError(f"{path}:{number}: {gene!r} is listed twice.")
        genes.append(gene)
    if not genes:
        raise ValueError(f"Screen file {path} lists no gene.")
    return genes


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


def run(args):
    """Run the perturbation pipeline on the source cells and write its result to `--out`."""
    from transformers import pipeline

    from ..io_utils import check_h5ad_file, check_model_location, load_model_folder
    from ..output_folder import check_output_folder
    from ..pipelines.perturbation_result import check_significance_settings
    from ..pipelines.pipeline_perturbation import process_state

    # Everything that can be checked is checked before the model is loaded and any cell is predicted.
    out = check_output_folder(args.out, args.overwrite, args.force_overwrite)
    check_h5ad_file(args.adata, "source")
    check_model_location(args.model)
    options = _perturb_options(args)
    check_significance_settings(**{k: options[k] for k in ("fdr", "min_abs_log2fc", "bootstrap") if k in options})
    for name in ("num_samples", "iterations", "batch_size", "variants_per_batch"):
        if name in options and int(options[name]) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {options[name]}.")
    if "null_perturbations" in options and int(options["null_perturbations"]) < 0:
        raise ValueError(f"--null-perturbations must be >= 0, got {options['null_perturbations']}.")
    state = process_state()  # under torchrun / accelerate launch: this process's device and rank
    device = state.device if state.num_processes > 1 else None
    # Loaded here rather than by `pipeline(model=path)`, which wraps every loading error in a multi-line report.
    model, tokenizer = load_model_folder(args.model)
    pipe = pipeline("perturbation", model=model, tokenizer=tokenizer, device=device)
    result = pipe(args.adata, **options)
    if not state.is_main_process:  # every process holds the gathered result; one writes it
        return 0
    result.save(out, overwrite=args.overwrite, plots=not args.no_plots, force_overwrite=args.force_overwrite)
    summary = result.summary
    unaffected = ", ".join(f"{k}: {v}" for k, v in summary["cells_unaffected"].items())
    hits = int(result.de[result.de["group"] == "all"]["significant"].sum())
    if summary["null_perturbations"]:
        verdict = (
            f"{hits} gene x time point results significant against {summary['null_perturbations']} sham "
            f"perturbations (BH-adjusted p < {summary['fdr']} and |log2 fold change| >= "
            f"{summary['min_abs_log2fc']})"
        )
    else:
        verdict = "no null (--null-perturbations 0): nothing is called significant"
    sys.stdout.write(
        f"perturbed {', '.join(summary['perturbations'])} in {summary['cells']} cells (unaffected: {unaffected}); "
        f"{verdict}; wrote {out}\n"
    )
    return 0
