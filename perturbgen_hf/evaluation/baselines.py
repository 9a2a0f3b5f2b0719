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


def linear_model(condition_cells, condition_features, source_cells, source_features, target_features,
                 n_components: int = 10, ridge: float = 0.1) -> np.ndarray:  # fmt: skip
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
