"""`perturbgen-hf embed`: time-resolved gene embeddings, gene programs, their activity over time, a screen list."""

import sys

from ._common import add_output_arguments


NAME = "embed"
FILES = {
    "embeddings": "gene_embeddings.h5ad",
    "programs": "gene_programs.csv",
    "summary": "program_summary.csv",
    "activity": "program_activity.csv",
    "enrichment": "gene_set_enrichment.csv",
    "screen": "screen_genes.txt",
    "report": "summary.json",
}


def add_parser(subparsers):
    """Register the `embed` subcommand."""
    parser = subparsers.add_parser(
        NAME,
        help="gene embeddings per time point, gene programs and their activity, a screen list",
        description=(
            "Read time-resolved gene embeddings from a trained model: each target gene's final decoder hidden state, "
            "averaged over the cells where the model generates it (or, with --targets, over observed target cells "
            "read out teacher-forced), per predicted time point and per --group-key group. Cluster the genes into "
            "programs (scanpy: PCA, kNN graph, Leiden), find each program's hub genes (highest connectivity within "
            "it) and its activity per time point (mean predicted log1p CP10k of its genes; observed too, where "
            "--time-key gives the data's time points), optionally score user gene sets (--gmt) per program, and "
            "write the hub genes of the most time-varying programs as a screen list for `perturb --screen-file`.\n\n"
            f"Writes to OUT: {FILES['embeddings']} (genes x hidden; one layer per time point and group), "
            f"{FILES['programs']}, {FILES['summary']}, {FILES['activity']}, {FILES['screen']}, "
            f"{FILES['enrichment']} (with --gmt), {FILES['report']} and plots/*.png."
        ),
    )
    parser.add_argument("--model", required=True, help="trained model folder or Hub id")
    parser.add_argument(
        "--adata",
        required=True,
        help="h5ad of raw counts: source-state cells, or a whole time course with --time-key",
    )
    add_output_arguments(parser)
    parser.add_argument(
        "--time-key",
        help="obs column of time points: the model's source time point gives the source cells, and every time "
        "point of the data gives observed program activity (default: every cell is a source cell)",
    )
    parser.add_argument("--time-points", nargs="+", help="time points to embed, by name or value (default: all)")
    parser.add_argument("--group-key", help="obs column (e.g. cell_type): embeddings per group as well")
    parser.add_argument(
        "--targets",
        nargs="+",
        metavar="TIME=H5AD",
        help="observed target cells per time point (one row per source cell) read out teacher-forced, instead of "
        "generated cells",
    )
    parser.add_argument("--gene-id-key", dest="gene_ids", help="var column with the gene identifiers")
    parser.add_argument("--layer", help="layer of raw counts to use instead of X")
    parser.add_argument("--num-samples", type=int, default=1, help="generations per source cell")
    parser.add_argument("--iterations", type=int, default=16, help="MaskGIT iterations")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--batch-size", type=int, default=32, help="source cells per model call")
    parser.add_argument("--seed", type=int, default=0, help="random seed (generation, PCA, Leiden, UMAP)")
    parser.add_argument("--resolution", type=float, default=1.0, help="Leiden resolution (higher: more programs)")
    parser.add_argument("--n-neighbors", type=int, default=15, help="neighbours per gene in the kNN graph")
    parser.add_argument("--n-pcs", type=int, default=30, help="principal components of the kNN graph")
    parser.add_argument(
        "--min-cells",
        type=int,
        default=5,
        help="cluster a gene only if it was predicted in at least this many cells at every time point",
    )
    parser.add_argument("--num-hubs", type=int, default=3, help="hub genes per program")
    parser.add_argument(
        "--use-groups", action="store_true", help="cluster on the per-group embeddings (needs --group-key)"
    )
    parser.add_argument("--gmt", help="GMT file of gene sets scored for overlap with every program (offline)")
    parser.add_argument(
        "--screen-programs",
        type=int,
        default=3,
        help="hub genes of this many most time-varying programs go to the screen list",
    )
    parser.add_argument("--label-genes", nargs="+", default=(), help="genes to label on the UMAP besides the hubs")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.set_defaults(run=run)


def _check_arguments(args):
    for name in (
        "num_samples",
        "iterations",
        "batch_size",
        "n_neighbors",
        "n_pcs",
        "min_cells",
        "num_hubs",
        "screen_programs",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if not args.resolution > 0:
        raise ValueError(f"--resolution must be > 0, got {args.resolution}.")
    if args.use_groups and not args.group_key:
        raise ValueError("--use-groups needs --group-key.")
    if args.targets and args.time_points:
        raise ValueError("With --targets the embedded time points are those of --targets; leave --time-points out.")


def _source_cells(adata, time_key, config):
    """The source-state cells: those at the model's source time point when the data is a time course."""
    if time_key is None:
        return adata
    if time_key not in adata.obs.columns:
        raise KeyError(f"--time-key {time_key!r} is not an obs column; available: {list(adata.obs.columns)}.")
    source = config.source_time_point
    labels = adata.obs[time_key].astype(str)
    if source is None:
        raise ValueError("This model does not record its source time point; give --adata of source cells only.")
    if not (labels == str(source)).any():
        raise ValueError(
            f"No cell of obs[{time_key!r}] is at the model's source time point {source!r}; present: "
            f"{sorted(labels.unique())}."
        )
    return adata[(labels == str(source)).to_numpy()].copy()


def run(args):
    """Embed the genes, find the programs and write them, with plots and a screen list, to `--out`."""
    from ..analysis import read_gmt
    from ..io_utils import check_h5ad_file, check_model_location, load_model_folder, read_anndata
    from ..output_folder import check_output_folder
    from .perturb import _parse_targets

    # Everything that can be checked is checked before the model is loaded and any cell is predicted.
    _check_arguments(args)
    out = check_output_folder(args.out, args.overwrite, args.force_overwrite)
    check_h5ad_file(args.adata, "input")
    check_model_location(args.model)
    targets = _parse_targets(args.targets) if args.targets else None
    gene_sets = read_gmt(args.gmt) if args.gmt else None
    model, tokenizer = load_model_folder(args.model)
    adata = read_anndata(args.adata, "input")
    source = _source_cells(adata, args.time_key, model.config)
    embeddings = _embed(args, model, tokenizer, source, targets)
    programs = _programs(args, embeddings, adata, tokenizer)
    screen = programs.screen_list(args.screen_programs)
    _write(args, out, embeddings, programs, gene_sets, screen)
    sys.stdout.write(_summary_line(embeddings, programs, source, screen, out))
    return 0


def _embed(args, model, tokenizer, source, targets):
    from ..pipelines.gene_embeddings import embed_genes

    options = {
        name: getattr(args, name)
        for name in (
            "time_points",
            "group_key",
            "gene_ids",
            "layer",
            "num_samples",
            "iterations",
            "temperature",
            "batch_size",
            "seed",
        )
    }
    return embed_genes(model, tokenizer, source, targets=targets, **options)


def _programs(args, embeddings, adata, tokenizer):
    from ..analysis import find_gene_programs, observed_expression
    from ..data.tokenize_dataset import resolve_time_points

    observed, observed_values = None, None
    if args.time_key is not None:
        observed = observed_expression(adata, args.time_key, tokenizer, args.gene_ids, args.layer)
        observed_values = dict(zip(*resolve_time_points(adata.obs, args.time_key)))
    options = {
        name: getattr(args, name)
        for name in ("resolution", "n_neighbors", "n_pcs", "min_cells", "num_hubs", "use_groups", "seed")
    }
    return find_gene_programs(embeddings, observed=observed, observed_time_values=observed_values, **options)


def _write(args, out, embeddings, programs, gene_sets, screen):
    """Every output file, built beside `out` and swapped in once complete."""
    import json

    from ..analysis import gene_set_enrichment, plot_gene_programs
    from ..output_folder import staged_output_folder

    with staged_output_folder(out, NAME, args.overwrite, args.force_overwrite) as work:
        embeddings.write_h5ad(work / FILES["embeddings"])
        programs.membership.to_csv(work / FILES["programs"], index=False)
        programs.summary.to_csv(work / FILES["summary"], index=False)
        programs.activity.to_csv(work / FILES["activity"], index=False)
        if gene_sets is not None:
            gene_set_enrichment(programs, gene_sets).to_csv(work / FILES["enrichment"], index=False)
        chosen = ", ".join(programs.top_changing(args.screen_programs))
        header = f"# hub genes of the {args.screen_programs} most time-varying gene programs ({chosen}); "
        (work / FILES["screen"]).write_text(
            header + "for perturbgen-hf perturb --screen-file\n" + "".join(f"{gene}\n" for gene in screen)
        )
        if not args.no_plots:
            plot_gene_programs(programs, work / "plots", label_genes=args.label_genes)
        report = {
            "embedding": dict(embeddings.uns["perturbgen_embedding"]),
            "programs": programs.settings,
            "program_summary": programs.summary.drop(columns="genes").to_dict("records"),
            "excluded_genes": programs.excluded,
            "screen_genes": screen,
        }
        (work / FILES["report"]).write_text(json.dumps(report, indent=2, default=str))


def _summary_line(embeddings, programs, source, screen, out) -> str:
    top = programs.top_changing(1)[0]
    row = programs.summary.set_index("program").loc[top]
    times = ", ".join(embeddings.uns["perturbgen_embedding"]["time_points"])
    return (
        f"embedded {embeddings.n_obs} genes from {source.n_obs} source cells at {times}; {len(programs.summary)} "
        f"programs over {programs.settings['genes_clustered']} genes ({programs.settings['genes_excluded']} with too "
        f"few cells); most time-varying: {top} ({row['size']} genes, {row['trend']} by {row['change']:.2f}, hubs "
        f"{row['hubs']}); screen list of {len(screen)} genes; wrote {out}\n"
    )
