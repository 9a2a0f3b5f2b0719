"""Options every command that writes a folder shares."""


def add_output_arguments(parser, what: str = "output folder") -> None:
    """`--out` and the two ways of replacing an existing folder (see `perturbgen_hf.output_folder`)."""
    parser.add_argument("--out", required=True, help=f"{what} (refused if not empty, unless --overwrite)")
    add_overwrite_arguments(parser)


def add_overwrite_arguments(parser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an earlier result of perturbgen-hf in the output folder (only once the new one is complete)",
    )  # fmt: skip
    parser.add_argument(
        "--force-overwrite", action="store_true",
        help="replace the output folder even if perturbgen-hf did not write it (its files are deleted)",
    )  # fmt: skip
