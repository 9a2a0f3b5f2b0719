"""`perturbgen-hf tokenize`: AnnData of raw counts -> a tokenized, paired dataset on disk."""

import argparse
import json
import logging
import sys
from pathlib import Path

from ..settings import PAIRING_MODES
from ._common import HelpFormatter, add_output_arguments


logger = logging.getLogger(__name__)
NAME = "tokenize"


def add_parser(subparsers):
    """Register the `tokenize` subcommand."""
    parser = subparsers.add_parser(
        NAME,
        help="AnnData (.h5ad) -> tokenized source/target dataset on disk",
        description=(
            "Rank-value encode the cells of an AnnData file of raw counts, pair source cells with target cells at "
            "later time points, and write a datasets.Dataset, the tokenizer and a description to OUT."
        ),
        formatter_class=HelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tokenize`."""
    parser.add_argument("adata", help="input .h5ad with raw integer counts in X")
    add_output_arguments(parser)
    parser.add_argument("--time-key", required=True, help="obs column with the time point of each cell")
    parser.add_argument(
        "--time-order",
        nargs="+",
        help="time points in temporal order (default: ordered categories, or by the number in each name)",
    )
    parser.add_argument("--time-value-key", help="obs column with the numeric time (e.g. hours) of each cell")
    parser.add_argument("--source", required=True, help="source time point (the encoder's input)")
    parser.add_argument("--targets", nargs="+", help="target time points (default: every later time point)")
    parser.add_argument("--gene-id-key", help="var column with Ensembl IDs or symbols (default: var_names)")
    vocabulary = parser.add_mutually_exclusive_group()
    vocabulary.add_argument(
        "--tokenizer",
        help="a saved model (or tokenizer) folder: use its vocabulary and keep its target genes (to fine-tune it)",
    )
    vocabulary.add_argument(
        "--dictionaries",
        nargs="+",
        metavar="PKL",
        help="TOKEN_PKL MEDIAN_PKL [MAPPING_PKL] (Geneformer / PerturbGen dictionaries)",
    )
    vocabulary.add_argument(
        "--fit-vocabulary",
        action="store_true",
        help="fit the vocabulary and medians on the data (the default without --dictionaries)",
    )
    parser.add_argument(
        "--n-hvg", type=int, default=2000, help="number of highly variable genes in the decoder's vocabulary"
    )
    parser.add_argument("--include-genes", nargs="+", default=[], help="genes forced into the decoder's vocabulary")
    parser.add_argument(
        "--pairing", choices=PAIRING_MODES, default="random", help="how source cells are paired with target cells"
    )
    parser.add_argument("--pairing-key", help="obs column for stratified or mapping pairing (e.g. cell_type)")
    parser.add_argument(
        "--pairing-file", help="CSV of allowed lineage paths (one column per time point) for mapping pairing"
    )
    parser.add_argument("--condition-keys", nargs="+", default=[], help="obs columns that become condition tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pairing")
    parser.add_argument(
        "--max-length", type=int, default=4096, help="longest source sequence, <cls> and <eos> included"
    )
    parser.add_argument("--chunk-size", type=int, default=2048, help="cells read and ranked at a time")
    parser.add_argument("--num-proc", type=int, default=1, help="processes that rank cells in parallel")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args) -> int:
    """Tokenize an h5ad into a folder of Arrow files with its pairing report."""
    from ..data.tokenize_dataset import tokenize_anndata

    if args.n_hvg < 1:
        raise ValueError(f"--n-hvg must be positive, got {args.n_hvg}.")
    if args.pairing == "mapping" and not args.pairing_file:
        raise ValueError("--pairing mapping needs --pairing-file.")
    if args.pairing_file and not Path(args.pairing_file).is_file():
        raise FileNotFoundError(f"The pairing file {args.pairing_file!r} does not exist.")
    description = tokenize_anndata(
        args.adata,
        args.out,
        args.time_key,
        args.source,
        targets=args.targets,
        time_order=args.time_order,
        time_value_key=args.time_value_key,
        gene_id_key=args.gene_id_key,
        dictionaries=args.dictionaries,
        tokenizer=args.tokenizer,
        n_hvg=args.n_hvg,
        include_genes=args.include_genes,
        pairing=args.pairing,
        pairing_key=args.pairing_key,
        pairing_file=args.pairing_file,
        condition_keys=args.condition_keys,
        seed=args.seed,
        max_length=args.max_length,
        chunk_size=args.chunk_size,
        num_proc=args.num_proc,
        overwrite=args.overwrite,
        force_overwrite=args.force_overwrite,
        progress=not args.no_progress,
    )
    report = description["pairing"]
    logger.info("pairing report: %s", json.dumps(report))
    summary = ", ".join(f"{t}: {r['cells']} cells" for t, r in report["time_points"].items())
    # The command's result line (commands report on stdout; the library itself only logs).
    sys.stdout.write(
        f"wrote {report['num_pairs']} pairs ({summary}; {description['num_target_genes']} target genes) to {args.out}\n"
    )
    return 0
