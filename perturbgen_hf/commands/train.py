"""
`perturbgen-hf train`: train or fine-tune a model on a tokenized dataset with `transformers.Trainer`.

The options belong to `HfArgumentParser` (this package's model and data arguments and every `TrainingArguments`
flag), so they are passed through unparsed. `--help` lists this package's own options from their dataclasses without
importing transformers; `--help-training` adds every `TrainingArguments` flag (which needs torch).
"""

import argparse
import dataclasses

from ..settings import DataArguments, ModelArguments
from ._common import HelpFormatter


NAME = "train"


def add_parser(subparsers):
    """Register the `train` subcommand (its options are parsed by `training.parse_arguments`)."""
    parser = subparsers.add_parser(
        NAME,
        help="train or fine-tune a model on a tokenized dataset (Trainer; `perturbgen-hf train --help` for options)",
        add_help=False,
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    """Train with `transformers.Trainer` on the passed-through options."""
    argv = list(args.passthrough)
    if "--help-training" in argv:
        from transformers import HfArgumentParser, TrainingArguments

        HfArgumentParser((ModelArguments, DataArguments, TrainingArguments), prog="perturbgen-hf train").print_help()
        return 0
    if "-h" in argv or "--help" in argv:
        help_parser().print_help()
        return 0
    from ..training import main

    return main(argv)


def help_parser() -> argparse.ArgumentParser:
    """The options of this package's argument dataclasses, for `--help` (parsing itself is HfArgumentParser's)."""
    parser = argparse.ArgumentParser(
        prog="perturbgen-hf train",
        description=(
            "Train a model from scratch (--preset, or --geneformer around a Geneformer encoder) or continue one "
            "(--model) on the output of `perturbgen-hf tokenize` (--data), with transformers.Trainer. Options may "
            "come from --config YAML; the command line wins. The same code runs under `torchrun` and "
            "`accelerate launch`."
        ),
        epilog=(
            "Every transformers TrainingArguments flag is accepted too (--max_steps, --num_train_epochs, "
            "--learning_rate, --per_device_train_batch_size, --save_steps, --resume_from_checkpoint, --seed, ...): "
            "`perturbgen-hf train --help-training` lists them all."
        ),
        formatter_class=HelpFormatter,
        add_help=False,
    )
    for dataclass in (ModelArguments, DataArguments):
        group = parser.add_argument_group(dataclass.__doc__.strip().rstrip("."))
        for field in dataclasses.fields(dataclass):
            default = None if field.default is dataclasses.MISSING else field.default
            group.add_argument(f"--{field.name}", default=default, help=field.metadata.get("help", ""))
    parser.add_argument("-h", "--help", action="help", help="show this message and exit")
    parser.add_argument("--help-training", action="store_true", help="also list every TrainingArguments flag")
    return parser
