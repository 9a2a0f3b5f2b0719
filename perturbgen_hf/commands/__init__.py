"""
One module per `perturbgen-hf` subcommand: its parser (`add_parser`) and what it runs (`run`).

A module's top level imports only the standard library and `..settings`, so that building every parser (what
`perturbgen-hf --help` does) costs no torch; each `run` imports the library it needs.
"""

from . import convert_original, demo, embed, evaluate, perturb, tokenize, train


# In the order `perturbgen-hf --help` lists them.
SUBCOMMANDS = (tokenize, train, perturb, embed, evaluate, convert_original, demo)

__all__ = ["SUBCOMMANDS"]
