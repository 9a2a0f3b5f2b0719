"""
Pair source cells with target cells at later time points.

Cells at different time points are different cells, so training pairs are sampled (PerturbGen's pseudo-pairing).
Within a group (all cells for "random"; one value of an obs column for "stratified"), every time point is drawn
`n` times, where `n` is the largest number of cells any time point has in that group, by concatenating seeded
permutations: every cell is used, and no cell is used more than once more than another of its time point.

Random pairs within a group carry no information about which target a source becomes, so a model trained on them
can only learn group-level futures. `"transport"` pairing couples each source with its likely descendants instead, as
Waddington-OT does for time courses: between consecutive time points, an entropic optimal-transport plan (POT's
Sinkhorn, uniform marginals) on squared distances in a PCA space of log1p CP10k shared by the two time points
(within each group when a key is given); each source cell's path is then sampled step by step from the plan's
rows. The cost is divided by its median, so `epsilon` is relative to a typical squared distance.
"""

import logging

import numpy as np
import pandas as pd

from ..settings import PAIRING_MODES


logger = logging.getLogger(__name__)


# Entropic regularisation of "transport" pairing, relative to the median squared distance, and PCA components.
TRANSPORT_EPSILON = 0.05
TRANSPORT_COMPONENTS = 10


def _tile_permutations(indices: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` draws from `indices`: whole seeded permutations, then part of one more."""
    repeats = -(-count // len(indices))
    return np.concatenate([rng.permutation(indices) for _ in range(repeats)])[:count]


def pair_cells(
    obs: pd.DataFrame,
    time_key: str,
    time_points: list[str],
    mode: str = "random",
    group_key: str | None = None,
    mapping: pd.DataFrame | None = None,
    seed: int = 0,
    counts=None,
    epsilon: float = TRANSPORT_EPSILON,
    num_components: int = TRANSPORT_COMPONENTS,
) -> tuple[np.ndarray, dict]:
    """
    Sample aligned cells across time points.

    Args:
        obs (`pd.DataFrame`): cell metadata (one row per cell, in matrix order).
        time_key (`str`): obs column with the time point of each cell.
        time_points (`list[str]`): the time points to pair, source first.
        mode (`str`, *optional*, defaults to `"random"`): `"random"`, `"stratified"` (within values of
            `group_key`, which must occur at every time point) or `"mapping"` (the source cell's `group_key` value
            picks the allowed target groups from `mapping`).
        group_key (`str`, *optional*): obs column for "stratified" and "mapping".
        mapping (`pd.DataFrame`, *optional*): for "mapping": one column per time point, rows are allowed paths of
            `group_key` values (e.g. a lineage: stem, progenitor, mature).
        seed (`int`, *optional*, defaults to 0): seed of the sampling.
        counts (`scipy.sparse` matrix or `np.ndarray` of shape `(len(obs), genes)`, *optional*): raw counts, for
            "transport" (which also stratifies by `group_key` when given).
        epsilon (`float`, *optional*): "transport": entropic regularisation relative to the median squared distance.
        num_components (`int`, *optional*): "transport": PCA components of the shared space.

    Returns:
        `(pairs, report)`: `pairs` is an int64 array `(num_pairs, num_time_points)` of row positions in `obs`;
        `report` counts cells and pairs per time point and group and how many cells are used more than once.
    """
    if mode not in PAIRING_MODES:
        raise ValueError(f"Unknown pairing {mode!r}; choose one of {list(PAIRING_MODES)}.")
    if mode in ("stratified", "mapping") or (mode == "transport" and group_key is not None):
        if group_key is None:
            raise ValueError(f"Pairing {mode!r} needs a pairing key (an obs column).")
        if group_key not in obs.columns:
            raise KeyError(f"Pairing key {group_key!r} is not an obs column; available: {list(obs.columns)}.")
    rng = np.random.default_rng(seed)
    times = obs[time_key].astype(str).to_numpy()
    if mode == "mapping":
        pairs = _pair_by_mapping(obs, times, time_points, group_key, mapping, rng)
    elif mode == "transport":
        if counts is None:
            raise ValueError("Pairing 'transport' needs the cells' counts.")
        if not epsilon > 0:
            raise ValueError(f"Transport pairing needs epsilon > 0, got {epsilon!r}.")
        groups = obs[group_key].astype(str).to_numpy() if group_key else np.zeros(len(obs), dtype=str)
        pairs = _pair_by_transport(counts, times, groups, time_points, rng, epsilon, num_components, group_key)
    else:
        groups = obs[group_key].astype(str).to_numpy() if mode == "stratified" else np.zeros(len(obs), dtype=str)
        pairs = _pair_within_groups(times, groups, time_points, rng, group_key)
    report = _report(pairs, times, time_points, obs, group_key)
    if mode == "transport":
        report["transport"] = {
            "epsilon": float(epsilon),
            "num_components": int(num_components),
            "cost": "squared Euclidean in PCA of log1p CP10k, divided by its median",
        }
    return pairs, report


def _group_members(times, groups, time_points, group_key):
    """Per group: the row positions of its cells at each time point (every group must have cells at each)."""
    for group in sorted(set(groups[np.isin(times, time_points)])):
        members = [np.flatnonzero((times == t) & (groups == group)) for t in time_points]
        missing = [t for t, m in zip(time_points, members) if len(m) == 0]
        if missing:
            raise ValueError(
                f"Group {group!r} of pairing key {group_key!r} has no cells at time point(s) {missing}; pairing "
                "within groups needs every group at every time point (drop the group or use random pairing)."
            )
        yield members


def _pair_within_groups(times, groups, time_points, rng, group_key):
    blocks = []
    for members in _group_members(times, groups, time_points, group_key):
        count = max(len(m) for m in members)
        blocks.append(np.stack([_tile_permutations(m, count, rng) for m in members], axis=1))
    return np.concatenate(blocks, axis=0)


def _log_cp10k_rows(counts, rows):
    import scipy.sparse as sp

    block = sp.csr_matrix(counts[np.sort(rows)], dtype=np.float64)[np.argsort(np.argsort(rows))]
    totals = np.asarray(block.sum(axis=1)).ravel()
    block = sp.diags(1e4 / np.where(totals > 0, totals, 1.0)) @ block
    return block.log1p().toarray()


def transport_plan(source_profiles, target_profiles, epsilon, num_components, exact=False):
    """
    OT plan between two sets of cells (rows: log1p CP10k), in a PCA space shared by both: entropic (Sinkhorn, with
    `epsilon` relative to the median squared distance) or, with `exact`, the exact earth mover's plan.

    Returns:
        `np.ndarray` of shape `(num_sources, num_targets)`, rows summing to 1 (each source's descendant distribution).
    """
    import ot

    both = np.vstack([source_profiles, target_profiles])
    both = both - both.mean(axis=0)
    components = max(1, min(num_components, min(both.shape) - 1))
    _, _, vt = np.linalg.svd(both, full_matrices=False)
    embedded = both @ vt[:components].T
    source, target = embedded[: len(source_profiles)], embedded[len(source_profiles) :]
    cost = ot.dist(source, target)  # squared Euclidean
    cost = cost / max(float(np.median(cost)), 1e-12)
    if exact:
        plan = ot.emd(ot.unif(len(source)), ot.unif(len(target)), cost, numItermax=10_000_000)
    else:
        # POT's default tolerance (1e-9 on the marginals) is below what float64 log-domain iterations reach: on 800 x
        # 800 simulated cells it ran all 20,000 iterations (357 s) where 1e-6 stops after 20 (0.4 s), with rows of
        # the plan within 3e-4 (L1) of the unconverged run's.
        plan = ot.sinkhorn(
            ot.unif(len(source)),
            ot.unif(len(target)),
            cost,
            epsilon,
            method="sinkhorn_log",
            numItermax=20_000,
            stopThr=1e-6,
        )
    plan = np.nan_to_num(np.asarray(plan), nan=0.0)
    totals = plan.sum(axis=1, keepdims=True)
    return np.where(totals > 0, plan / np.where(totals > 0, totals, 1.0), 1.0 / len(target))


def draw_descendants(plan, rows, rng) -> np.ndarray:
    """One column per entry of `rows`, drawn from that row of `plan` (a row's weights need not sum to 1)."""
    cumulative = plan[rows].cumsum(axis=1)
    draws = rng.random(len(rows))[:, None] * cumulative[:, -1:]
    return np.minimum((cumulative < draws).sum(axis=1), plan.shape[1] - 1)


def _pair_by_transport(counts, times, groups, time_points, rng, epsilon, num_components, group_key):
    blocks = []
    for members in _group_members(times, groups, time_points, group_key):
        profiles = [_log_cp10k_rows(counts, m) for m in members]
        count = max(len(m) for m in members)
        # Positions within each time point's members: sources tile as in random pairing, then each step follows
        # the plan from the cell drawn at the step before.
        current = _tile_permutations(np.arange(len(members[0])), count, rng)
        path = [members[0][current]]
        for step in range(1, len(time_points)):
            plan = transport_plan(profiles[step - 1], profiles[step], epsilon, num_components)
            current = draw_descendants(plan, current, rng)
            path.append(members[step][current])
        blocks.append(np.stack(path, axis=1))
    return np.concatenate(blocks, axis=0)


def _pair_by_mapping(obs, times, time_points, group_key, mapping, rng):
    if mapping is None:
        raise ValueError("Pairing 'mapping' needs a pairing file (CSV with one column per time point).")
    absent = [t for t in time_points if t not in mapping.columns]
    if absent:
        raise ValueError(
            f"The pairing file has no column for time point(s) {absent}; columns: {list(mapping.columns)}."
        )
    groups = obs[group_key].astype(str).to_numpy()
    source = time_points[0]
    rows = []
    for cell in np.flatnonzero(times == source):
        paths = mapping[mapping[source].astype(str) == groups[cell]]
        if paths.empty:
            raise ValueError(f"Source group {groups[cell]!r} does not appear in the pairing file's column {source!r}.")
        row = [cell]
        for t in time_points[1:]:
            allowed = set(paths[t].astype(str))
            candidates = np.flatnonzero((times == t) & np.isin(groups, list(allowed)))
            if len(candidates) == 0:
                raise ValueError(
                    f"No cells at time point {t!r} in the groups {sorted(allowed)} that the pairing file allows."
                )
            row.append(int(rng.choice(candidates)))
        rows.append(row)
    return np.asarray(rows, dtype=np.int64)


def _report(pairs, times, time_points, obs, group_key):
    report = {"num_pairs": len(pairs), "time_points": {}}
    for column, t in enumerate(time_points):
        used, uses = np.unique(pairs[:, column], return_counts=True)
        available = int((times == t).sum())
        report["time_points"][t] = {
            "cells": available,
            "cells_used": len(used),
            "cells_used_more_than_once": int((uses > 1).sum()),
            "max_uses_of_a_cell": int(uses.max()) if len(uses) else 0,
        }
    if group_key is not None:
        source_groups = obs[group_key].astype(str).to_numpy()[pairs[:, 0]]
        report["pairs_per_group"] = {str(k): int(v) for k, v in zip(*np.unique(source_groups, return_counts=True))}
    return report
