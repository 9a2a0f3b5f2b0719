"""`perturbgen-hf convert-original`: an original PerturbGen checkpoint -> a folder AutoModel and the pipeline load."""

import sys
from pathlib import Path

from ._common import HelpFormatter, add_output_arguments


NAME = "convert-original"


def add_parser(subparsers):
    """Register the `convert-original` subcommand."""
    parser = subparsers.add_parser(
        NAME,
        help="convert an original PerturbGen checkpoint (.ckpt) into a folder AutoModel and the pipeline load",
        description=(
            "Convert a checkpoint of the original PerturbGen (Lotfollahi-lab/Perturbgen: stage 1 'masking' or stage 2 "
            "'count' Lightning .ckpt) and its vocabulary pickles into a folder that AutoModel.from_pretrained, "
            "AutoTokenizer.from_pretrained and pipeline('perturbation') load. The configuration selects the original "
            "architecture, so the converted model computes what the original computed. Checkpoints are read without "
            "executing anything in them (AnnData objects in their hyper-parameters become inert placeholders); "
            "every unexpected or missing key and every shape mismatch is reported by name."
        ),
        formatter_class=HelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def add_arguments(parser) -> None:
    """The options of `convert-original` (shared with `scripts/convert_original_checkpoint.py`)."""
    parser.add_argument("--checkpoint", required=True, help="original stage-1 (masking) or stage-2 (count) .ckpt")
    parser.add_argument("--encoder-checkpoint", help="the original's standalone encoder .ckpt (supplies or checks it)")
    parser.add_argument("--token-dict", required=True, help="encoder vocabulary pickle {Ensembl ID: token id}")
    parser.add_argument("--tokenid-to-rowid", required=True, help="pickle {source token id: decoder row id}")
    parser.add_argument("--rowid-to-gene", required=True, help="pickle {decoder row id: gene} (mapping_dict_path)")
    parser.add_argument("--gene-median-dict", help="pickle {Ensembl ID: median}, to rank new cells as the original")
    parser.add_argument(
        "--time-points",
        nargs="+",
        required=True,
        help="names of the original's time points 1, 2, ... in order (e.g. 90min 6h 10h)",
    )
    parser.add_argument("--time-values", nargs="+", type=float, help="their numeric values (default 1, 2, ...)")
    add_output_arguments(parser)


def run(args) -> int:
    """Convert an original checkpoint into a model folder."""
    from ..convert_original import convert_original_checkpoint

    report = convert_original_checkpoint(
        args.checkpoint,
        args.token_dict,
        args.tokenid_to_rowid,
        args.rowid_to_gene,
        args.time_points,
        args.out,
        encoder_checkpoint=args.encoder_checkpoint,
        time_values=args.time_values,
        gene_median_dict=args.gene_median_dict,
        overwrite=args.overwrite,
        force_overwrite=args.force_overwrite,
    )
    sys.stdout.write(
        f"Converted a stage-{report['stage']} PerturbGen checkpoint into {args.out} (load it with "
        f"AutoModel.from_pretrained); dropped {len(report['dropped_keys'])} keys, ignored "
        f"{report['ignored_duplicate_keys']} duplicates. Report: {Path(args.out) / 'conversion_report.json'}\n"
    )
    for warning in report["warnings"]:
        sys.stdout.write(f"warning: {warning}\n")
    return 0
