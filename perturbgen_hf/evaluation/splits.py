"""
Which cells train a model and which are evaluated, per protocol (see `perturbgen_hf.settings.PROTOCOLS`):

- `heldout-time`: a whole time point is left out of training; it is predicted from every source cell.
- `heldout-group`: every cell of one group (e.g. a cell type) is left out; its later states are predicted from its
  source cells.
- `heldout-cells`: a random fraction of the cells of every time point is left out; their later states are
  predicted from the held-out source cells.
"""

from dataclasses import dataclass

import numpy as np


@dataclass
class Split:
    """Which cells train the model and which are evaluated."""

    train: np.ndarray  # bool per cell
    source: dict  # group -> bool per cell: the source cells predictions start from
    observed: dict  # (time point, group) -> bool per cell: the observed cells to compare with


def cell_groups(adata, group_key, protocol):
    """The group of every cell (`obs[group_key]` as text), or "all" without a group key."""
    if group_key is None:
        if protocol == "heldout-group":
            raise ValueError("--protocol heldout-group needs --group-key (the obs column of the groups).")
        return np.full(adata.n_obs, "all", dtype=object)
    if group_key not in adata.obs.columns:
        raise KeyError(f"group_key {group_key!r} is not an obs column; available: {list(adata.obs.columns)}.")
    return adata.obs[group_key].astype(str).to_numpy()


def split_cells(protocol, times, groups, order, source, heldout, settings) -> Split:
    """
    The training and evaluated cells of a protocol (`settings`: its `heldout_fraction` and `seed` for
    `heldout-cells`), with a `ValueError` naming what makes the split impossible.
    """
    targets = order[order.index(source) + 1 :]
    if not targets:
        raise ValueError(f"No time point after the source {source!r} to predict.")
    in_course = np.isin(times, [source, *targets])
    if protocol == "heldout-time":
        if heldout not in targets:
            raise ValueError(f"--heldout {heldout!r} must be a time point after the source {source!r}: {targets}.")
        if len(targets) < 2:
            raise ValueError("Holding out the only target time point leaves nothing to train on.")
        return Split(
            train=in_course & (times != heldout),
            source={"all": times == source},
            observed={(heldout, "all"): times == heldout},
        )
    if protocol == "heldout-group":
        if heldout not in set(groups):
            raise ValueError(f"--heldout {heldout!r} is not a group; groups: {sorted(set(groups))}.")
        held = groups == heldout
        if not (held & (times == source)).any():
            raise ValueError(f"Group {heldout!r} has no cells at the source time point {source!r} to predict from.")
        observed = {(t, heldout): held & (times == t) for t in targets if (held & (times == t)).any()}
        if not observed:
            raise ValueError(f"Group {heldout!r} has no cells after the source time point: nothing to compare with.")
        return Split(train=in_course & ~held, source={heldout: held & (times == source)}, observed=observed)
    if not 0 < settings.heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {settings.heldout_fraction}.")
    rng = np.random.default_rng(settings.seed)
    held = np.zeros(len(times), dtype=bool)
    for t in [source, *targets]:
        cells = np.flatnonzero(times == t)
        count = round(settings.heldout_fraction * len(cells))
        if count < 2 or count > len(cells) - 2:
            raise ValueError(f"Time point {t!r} has {len(cells)} cells: too few to hold out a fraction of them.")
        held[rng.choice(cells, count, replace=False)] = True
    names = sorted(set(groups))
    return Split(
        train=in_course & ~held,
        source={g: held & (times == source) & (groups == g) for g in names},
        observed={
            (t, g): held & (times == t) & (groups == g)
            for t in targets
            for g in names
            if (held & (times == t) & (groups == g)).sum() >= 2
        },
    )


def trained_targets(split, times, order, source):
    """The target time points after `source` that have training cells in `split`."""
    return [t for t in order[order.index(source) + 1 :] if (split.train & (times == t)).any()]
