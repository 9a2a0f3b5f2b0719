"""
Pair source cells with target cells at later time points.

Cells at different time points are different cells, so training pairs are sampled (PerturbGen's pseudo-pairing).
Within a group (all cells for "random"; one value of an obs column for "stratified"), every time point is drawn
`n` times, where `n` is the largest number of cells any time point has in that group, by concatenating seeded
permutations: every cell is used, and no cell is used more than once more than another of its time point.
"""

import logging

import numpy as np
import pandas as pd


logger = logging.getLogger(__name__)

PAIRING_MODES = ("random", "stratified", "mapping")


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

    Returns:
        `(pairs, report)`: `pairs` is an int64 array `(num_pairs, num_time_points)` of row positions in `obs`;
        `report` counts cells and pairs per time point and group and how many cells are used more than once.
    """
    if mode not in PAIRING_MODES:
        raise ValueError(f"Unknown pairing {mode!r}; choose one of {list(PAIRING_MODES)}.")
    if mode in ("stratified", "mapping"):
        if group_key is None:
            raise ValueError(f"Pairing {mode!r} needs a pairing key (an obs column).")
        if group_key not in obs.columns:
            raise KeyError(f"Pairing key {group_key!r} is not an obs column; available: {list(obs.columns)}.")
    rng = np.random.default_rng(seed)
    times = obs[time_key].astype(str).to_numpy()
    if mode == "mapping":
        pairs = _pair_by_mapping(obs, times, time_points, group_key, mapping, rng)
    else:
        groups = obs[group_key].astype(str).to_numpy() if mode == "stratified" else np.zeros(len(obs), dtype=str)
        pairs = _pair_within_groups(times, groups, time_points, rng, group_key)
    return pairs, _report(pairs, times, time_points, obs, group_key)


def _pair_within_groups(times, groups, time_points, rng, group_key):
    blocks = []
    for group in sorted(set(groups[np.isin(times, time_points)])):
        members = [np.flatnonzero((times == t) & (groups == group)) for t in time_points]
        missing = [t for t, m in zip(time_points, members) if len(m) == 0]
        if missing:
            raise ValueError(
                f"Group {group!r} of pairing key {group_key!r} has no cells at time point(s) {missing}; stratified "
                "pairing needs every group at every time point (drop the group or use random pairing)."
            )
        count = max(len(m) for m in members)
        blocks.append(np.stack([_tile_permutations(m, count, rng) for m in members], axis=1))
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
