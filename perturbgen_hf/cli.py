"""
The `perturbgen-hf` command: dispatch only. Each subcommand's parser and work live in `perturbgen_hf.commands`.

Errors in the user's input end the command with one line on stderr and exit code 1; usage errors exit with 2; a
SIGTERM ends it with 143 after the clean-up of what it was writing.
"""

import argparse
import logging
import sys

from . import __version__
from .commands import SUBCOMMANDS


logger = logging.getLogger("perturbgen_hf")

# Exceptions that describe bad input or a missing file: reported as one line, without a traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)
# Subcommands whose options are parsed by the subcommand itself (HfArgumentParser).
PASSTHROUGH = {"train"}
HELP_REQUESTS = {"-h", "--help", "--help-training"}


def build_parser() -> argparse.ArgumentParser:
    """The `perturbgen-hf` parser, with every subcommand's."""
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
    for command in SUBCOMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    """Run `perturbgen-hf` with `argv` (default: `sys.argv[1:]`); returns the exit code."""
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
    from .output_folder import terminate_as_exception

    if not HELP_REQUESTS & set(passthrough):
        import perturbgen_hf

        perturbgen_hf.register()  # deferred by the console script until a subcommand is about to work
    try:
        with terminate_as_exception():
            return args.run(args) or 0
    except USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        sys.stderr.write(f"perturbgen-hf {args.command}: error: {message}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
