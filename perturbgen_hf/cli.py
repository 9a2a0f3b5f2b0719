"""
The `perturbgen-hf` command.

Each subcommand lives in a `_add_<name>_parser` function that registers its arguments and the function that runs it.
Errors in the user's input end the command with one line on stderr and exit code 1; usage errors exit with 2.
"""

import argparse
import logging
import sys

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


SUBCOMMANDS = [_add_tokenize_parser, _add_train_parser]
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
