"""Options every command that writes a folder shares."""

import argparse


def add_output_arguments(parser, what: str = "output folder") -> None:
    """`--out` and the two ways of replacing an existing folder (see `perturbgen_hf.output_folder`)."""
    parser.add_argument("--out", required=True, help=f"{what} (refused if not empty, unless --overwrite)")
    add_overwrite_arguments(parser)


def add_overwrite_arguments(parser) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier result of perturbgen-hf in the output folder (only once the new one is complete)",
    )
    parser.add_argument(
        "--force-overwrite",
        action="store_true",
        help="replace the output folder even if perturbgen-hf did not write it (its files are deleted)",
    )


class HelpFormatter(argparse.HelpFormatter):
    """
    Shows an option's default once, and only when there is one to show: not for flags (`store_true`), not for
    `None` (an option that is off unless given), and not when the help text already says its default. Descriptions
    are wrapped paragraph by paragraph; indented lines (commands, examples) are kept as written.
    """

    def _fill_text(self, text, width, indent):
        paragraphs = []
        for paragraph in text.strip("\n").split("\n\n"):
            lines = paragraph.splitlines()
            if any(line.startswith((" ", "\t")) for line in lines):
                paragraphs.append("\n".join(indent + line for line in lines))
            else:
                paragraphs.append(super()._fill_text(" ".join(lines), width, indent))
        return "\n\n".join(paragraphs)

    def _get_help_string(self, action):
        text = action.help or ""
        # Identity, not equality: a default of 0 (a seed) is shown, though 0 == False.
        hidden = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        shown = not hidden and not isinstance(
            action, (argparse._StoreTrueAction, argparse._HelpAction, argparse._VersionAction)
        )
        if shown and "default" not in text and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text
