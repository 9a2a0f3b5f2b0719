"""
The perturbation pipeline's inputs, shared with `embed_genes`: reading AnnData, its counts and gene identifiers,
time points by name or value, and observed target cells for a teacher-forced readout.
"""

import logging

import numpy as np
import pandas as pd

from ..io_utils import read_anndata
from ..tokenization import warn_duplicate_gene_ids
from .prediction import target_capacity


logger = logging.getLogger(__name__)


def read_cells(data, what):
    """An AnnData from an AnnData or an h5ad path, with a clear error when it has no cells."""
    adata = read_anndata(data, what)
    if adata.n_obs == 0:
        raise ValueError(f"The {what} AnnData has no cells.")
    return adata


def check_choice(name, value, choices):
    """A `ValueError` naming `name` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {list(choices)}.")


def as_list(value):
    """`value` as a list: [] for None, [value] for one name or number."""
    if value is None:
        return []
    return [value] if isinstance(value, (str, int, float)) else list(value)


def counts_and_gene_ids(adata, gene_ids, layer):
    """The counts (`X` or `layers[layer]`) and the gene identifiers (`var[gene_ids]`, a list, or var_names)."""
    if isinstance(gene_ids, str):
        if gene_ids not in adata.var.columns:
            raise KeyError(f"gene_ids {gene_ids!r} is not a var column; available: {list(adata.var.columns)}.")
        identifiers = ["" if pd.isna(g) else str(g) for g in adata.var[gene_ids]]
    else:
        identifiers = list(gene_ids) if gene_ids is not None else list(adata.var_names)
    warn_duplicate_gene_ids(identifiers, f"var[{gene_ids!r}]" if isinstance(gene_ids, str) else "the source genes")
    if layer is not None:
        if layer not in adata.layers:
            raise KeyError(f"No layer {layer!r}; available: {list(adata.layers.keys())}.")
        return adata.layers[layer], identifiers
    return adata.X, identifiers


def as_time_point(value, config, warn=True):
    """A name of the model's time points, or a number (also given as text, e.g. from a command line)."""
    if isinstance(value, str) and value in config.time_points:
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"Unknown time point {value!r}; this model knows {config.time_points} (or give a number)."
        ) from None
    trained = [float(v) for v in config.time_values]
    # Time values are hours (or positions 1, 2, ... with the source first) after the source state, which is never
    # negative: a negative time would be before the source the prediction starts from.
    if not np.isfinite(number) or number < 0 or (min(trained) > 0 and number == 0):
        raise ValueError(
            f"Time point {value!r} is not a time after the source state; this model's time points are "
            f"{dict(zip(config.time_points, trained))}."
        )
    if warn and not min(trained) <= number <= max(trained):
        logger.warning(
            "Time point %s lies outside the trained range %s-%s: an extrapolation.", value, min(trained), max(trained)
        )
    return number


def time_point_name(config, value):
    """The model's name of a time value, or the value written as text for an unseen one."""
    for name, known in zip(config.time_points, config.time_values):
        if abs(known - value) < 1e-9:
            return name
    return f"{value:g}"


def rank_observed_targets(config, tokenizer, targets, num_cells, gene_ids=None, layer=None) -> dict:
    """
    Rank observed target cells for a teacher-forced readout: one AnnData (or h5ad path) per time point, paired row
    by row with the `num_cells` source cells.

    Returns:
        `dict` with `time_points` (the names, in the given order), `tokens` (per time point, one decoder-token array
        per cell) and `library_size` (`np.ndarray` of shape `(num_cells, num_time_points)`).
    """
    if not isinstance(targets, dict) or not targets:
        raise ValueError(
            "method='teacher_forced' needs `targets`: a dict {time point: AnnData or h5ad path} of observed "
            "target cells, one row per source cell in the source's order."
        )
    capacity = target_capacity(config)
    if config.condition_tokens:
        raise ValueError("method='teacher_forced' does not handle condition tokens yet; this model has some.")
    names, tokens, library = [], [], []
    for name, data in targets.items():
        config.time_value(name)  # names an unknown time point
        adata = read_cells(data, f"targets[{name!r}]")
        if adata.n_obs != num_cells:
            raise ValueError(
                f"targets[{name!r}] has {adata.n_obs} cells for {num_cells} source cells; pair them row by row."
            )
        counts, identifiers = counts_and_gene_ids(adata, gene_ids, layer)
        ranked = tokenizer.rank_targets(counts, identifiers, capacity)
        names.append(str(name))
        tokens.append([ranked.cell(i) for i in range(num_cells)])
        library.append(np.asarray(tokenizer.target_counts(counts, identifiers).sum(axis=1)).ravel())
    return {"time_points": names, "tokens": tokens, "library_size": np.stack(library, axis=1)}
