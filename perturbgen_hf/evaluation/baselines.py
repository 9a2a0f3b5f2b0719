"""
Baselines that predict what the model predicts, from the same training data, so that every score has something to
stand beside (Ahlmann-Eltze, Huber & Anders 2025: deep models often fail to beat them).

Each baseline returns predicted cells as a `(cells, genes)` matrix of log1p CP10k profiles on the model's target
genes (the scale every metric of [`perturbgen_hf.evaluation.metrics`] reads); its pseudobulk is the mean over
those cells. The model's predicted counts are put on the same scale before scoring.
"""

import numpy as np


def _cells(values, name) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (cells, genes) matrix, got shape {array.shape}.")
    return array


def no_change(source_cells) -> np.ndarray:
    """The source cells carried forward unchanged: the prediction "nothing happens after the source state"."""
    return _cells(source_cells, "source_cells").copy()


def training_mean(training_cells) -> np.ndarray:
    """
    The pooled target cells of the training conditions (time points or groups): their mean is the training mean,
    the baseline that predicts the average response whatever the condition.

    Args:
        training_cells (`Sequence[np.ndarray]`): one `(cells, genes)` matrix per training condition.
    """
    parts = [_cells(c, f"training_cells[{i}]") for i, c in enumerate(training_cells)]
    if not parts:
        raise ValueError("training_mean needs at least one training condition.")
    return np.vstack(parts)


def nearest_time_point(cells_by_time: dict, time_value: float) -> np.ndarray:
    """
    The observed cells of the training time point nearest in time to `time_value` (the earlier one on a tie): for a
    held-out time point, "it looks like its neighbour".

    Args:
        cells_by_time (`dict[float, np.ndarray]`): time value -> `(cells, genes)` training cells.
        time_value (`float`): the held-out time point's value.
    """
    nearest = nearest_time_value(list(cells_by_time), time_value)
    return _cells(cells_by_time[nearest], f"cells_by_time[{nearest}]").copy()


def nearest_time_value(values, time_value: float) -> float:
    """The value among `values` nearest to `time_value` (the earlier one on a tie)."""
    if len(values) == 0:
        raise ValueError("nearest_time_point needs at least one training time point.")
    return min(values, key=lambda t: (abs(float(t) - float(time_value)), float(t)))


def neighbour_time_values(values, time_value: float) -> tuple[float, float]:
    """
    The two observed time values a held-out `time_value` is interpolated between (the nearest before and after),
    or, beyond the last (first) one, the last (first) two it is extrapolated from.
    """
    known = sorted({float(v) for v in values})
    if len(known) < 2:
        raise ValueError(f"Interpolating in time needs at least two observed time points, got {known}.")
    t = float(time_value)
    before = [v for v in known if v < t]
    after = [v for v in known if v > t]
    if before and after:
        return before[-1], after[0]
    return tuple(known[-2:]) if before else tuple(known[:2])


def _fraction(time_before, time_after, time_value) -> float:
    if time_after == time_before:
        raise ValueError(f"The two neighbouring time points have the same value {time_before}.")
    return (float(time_value) - time_before) / (time_after - time_before)


def _draw(count, size, rng):
    return rng.choice(count, size=size, replace=size > count)


def neighbour_interpolation(
    cells_before, cells_after, time_before, time_after, time_value, num_cells=None, seed=0
) -> np.ndarray:
    """
    Linear interpolation in time of the two neighbouring observed time points, gene by gene in log1p CP10k, at the
    cell level. Between them (fraction `f = (t - t0) / (t1 - t0)` in [0, 1]) it is a mixture of real cells, a share
    `f` of them from `t1` and the rest from `t0`, whose pseudobulk is `(1 - f)·x̄0 + f·x̄1`. Beyond them (`f > 1`
    or `f < 0`) the cells of the nearer one are moved by the linear trend, `cells + (f - 1)·(x̄1 - x̄0)` (resp.
    `f·(x̄1 - x̄0)` from `t0`), clipped at 0.

    Args:
        cells_before, cells_after (`np.ndarray` of shape `(cells, genes)`): observed cells at `time_before` and
            `time_after` (`time_before < time_after`).
        time_value (`float`): the held-out time point.
        num_cells (`int`, *optional*): cells to return (default: interpolated between the two cell numbers).
        seed (`int`): which cells are drawn.
    """
    before, after = _cells(cells_before, "cells_before"), _cells(cells_after, "cells_after")
    f = _fraction(time_before, time_after, time_value)
    trend = after.mean(0) - before.mean(0)
    if f > 1.0:
        return np.clip(after + (f - 1.0) * trend, 0.0, None)
    if f < 0.0:
        return np.clip(before + f * trend, 0.0, None)
    rng = np.random.default_rng(seed)
    total = num_cells or max(1, round((1.0 - f) * len(before) + f * len(after)))
    from_after = round(f * total)
    return np.vstack([before[_draw(len(before), total - from_after, rng)], after[_draw(len(after), from_after, rng)]])


def transport_interpolation(
    cells_before,
    cells_after,
    time_before,
    time_after,
    time_value,
    num_cells=None,
    num_components=30,
    exact_max_pairs=4_000_000,
    epsilon=0.05,
    seed=0,
) -> np.ndarray:
    """
    Optimal-transport displacement (McCann) interpolation, as Waddington-OT and the TrajectoryNet/MIOFlow
    benchmarks interpolate held-out time points: the cells of the two neighbouring time points are coupled by an OT
    plan (squared Euclidean cost in a PCA space both share; exact EMD up to `exact_max_pairs` cell pairs, entropic
    Sinkhorn with `epsilon` beyond), coupled pairs `(a, b)` are drawn from the plan, and each interpolated cell is
    `(1 - f)·a + f·b` in gene space, `f = (t - t0) / (t1 - t0)` (beyond the two time points, `f` outside [0, 1]
    extrapolates along each pair, clipped at 0).

    Args:
        cells_before, cells_after (`np.ndarray` of shape `(cells, genes)`): log1p CP10k cells at `time_before` and
            `time_after`.
        time_value (`float`): the held-out time point.
        num_cells (`int`, *optional*): pairs to draw (default: interpolated between the two cell numbers).
        num_components (`int`): principal components of the cost.
        exact_max_pairs (`int`), epsilon (`float`): exact or entropic plan (epsilon relative to the median cost).
        seed (`int`): which pairs are drawn.
    """
    from ..data.pairing import draw_descendants, transport_plan

    before, after = _cells(cells_before, "cells_before"), _cells(cells_after, "cells_after")
    f = _fraction(time_before, time_after, time_value)
    exact = len(before) * len(after) <= exact_max_pairs
    plan = transport_plan(before, after, epsilon, num_components, exact=exact)  # rows: each cell's descendants
    rng = np.random.default_rng(seed)
    share = min(max(f, 0.0), 1.0)
    total = num_cells or max(1, round((1.0 - share) * len(before) + share * len(after)))
    # Every earlier cell in turn (in a random order, repeated as needed), then a partner drawn from its row of the
    # plan: the earlier time point's cells keep their proportions, which independent draws of pairs would not.
    order = np.concatenate([rng.permutation(len(before)) for _ in range(-(-total // len(before)))])[:total]
    a, b = before[order], after[draw_descendants(plan, order, rng)]
    return np.clip((1.0 - f) * a + f * b, 0.0, None)


def linear_model(
    condition_cells,
    condition_features,
    source_cells,
    source_features,
    target_features,
    n_components: int = 10,
    ridge: float = 0.1,
) -> np.ndarray:
    """
    The linear baseline of Ahlmann-Eltze et al. (2025): pseudobulks `Y` (genes x conditions, centred by the gene
    means `μ`) are modelled as `Y ≈ G·K·Pᵀ`, with `G` the top `n_components` principal axes of the training cells
    (genes x components), `P` the condition features (conditions x features) and
    `K = (GᵀG + λI)⁻¹ Gᵀ Y P (PᵀP + λI)⁻¹`, `λ = ridge`. A condition with features `p` is predicted as
    `ŷ(p) = μ + G·K·p`; each source cell is moved by the predicted change from the source condition,
    `source + ŷ(target) - ŷ(source)`, and clipped at 0 (log expression is non-negative).

    Features encode what the conditions share: time as `[1, t]` (a linear trend per component, for a held-out time
    point), or one-hot group and one-hot state (an additive model, for a held-out group).

    Args:
        condition_cells (`Sequence[np.ndarray]`): `(cells, genes)` training cells of each condition.
        condition_features (`np.ndarray` of shape `(conditions, features)`).
        source_cells (`np.ndarray` of shape `(cells, genes)`): the cells to move.
        source_features, target_features (`np.ndarray` of shape `(features,)`): the source and predicted condition.
        n_components (`int`, defaults to 10), ridge (`float`, defaults to 0.1): as in the reference.
    """
    cells = [_cells(c, f"condition_cells[{i}]") for i, c in enumerate(condition_cells)]
    features = np.asarray(condition_features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] != len(cells):
        raise ValueError(f"condition_features must be ({len(cells)}, features), got shape {features.shape}.")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}.")
    source = _cells(source_cells, "source_cells")
    pooled = np.vstack(cells)
    if source.shape[1] != pooled.shape[1]:
        raise ValueError(f"source_cells have {source.shape[1]} genes, the training cells {pooled.shape[1]}.")
    means = np.stack([c.mean(0) for c in cells], axis=1)  # genes x conditions
    centre = means.mean(axis=1, keepdims=True)
    y = means - centre
    components = min(int(n_components), *pooled.shape)
    _, _, axes = np.linalg.svd(pooled - pooled.mean(0), full_matrices=False)
    g = axes[:components].T  # genes x components
    k = np.linalg.solve(g.T @ g + ridge * np.eye(components), g.T @ y @ features)
    k = k @ np.linalg.inv(features.T @ features + ridge * np.eye(features.shape[1]))
    shift = g @ k @ (np.asarray(target_features, dtype=np.float64) - np.asarray(source_features, dtype=np.float64))
    return np.clip(source + shift[None, :], 0.0, None)


def additive(control_mean, single_means) -> np.ndarray:
    """
    The additive model for a combination of perturbations: `x̄_c + Σ_i (x̄_i - x̄_c)` over the single perturbations'
    observed pseudobulks `x̄_i` (Ahlmann-Eltze et al. 2025: no deep model beat it on double perturbations).

    Args:
        control_mean (`np.ndarray` of shape `(genes,)`).
        single_means (`Sequence[np.ndarray]`): one `(genes,)` pseudobulk per single perturbation of the combination.
    """
    control = np.asarray(control_mean, dtype=np.float64)
    singles = [np.asarray(m, dtype=np.float64) for m in single_means]
    if not singles:
        raise ValueError("additive needs the pseudobulk of at least one single perturbation.")
    for i, m in enumerate(singles):
        if m.shape != control.shape:
            raise ValueError(f"single_means[{i}] has shape {m.shape}, the control {control.shape}.")
    return control + sum(m - control for m in singles)
