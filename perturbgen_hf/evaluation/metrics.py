"""
Metrics that compare predicted cells with observed cells.

Every function is pure (arrays in, numbers or tables out). Expression inputs are log1p CP10k profiles (see
[`log_normalize`]) unless a docstring says otherwise; "pseudobulk" is the mean profile over cells. Names and
definitions follow cell-eval (ArcInstitute/cell-eval) where it has the metric; where this package chooses a
convention that others do not share (the reference state of a delta, squared or plain E-distance), the argument is
explicit.

Notation: `x̂`, `x` are the predicted and observed pseudobulks of the evaluated state (a time point, a group),
`r` the observed pseudobulk of the reference state (the source cells) and `r̂` the reference used for the
prediction (by default also `r`); `Δ̂ = x̂ - r̂`, `Δ = x - r`.
"""

import re

import numpy as np
import pandas as pd
from scipy import stats

from ..tokenization import log_normalize  # noqa: F401  (the expression scale of every metric)


# Kernel widths of the original PerturbGen's RBF MMD (and CFGen's): exp(-gamma * squared distance).
DEFAULT_MMD_GAMMAS = (2.0, 1.0, 0.5, 0.1, 0.01, 0.005)


def _vector(values, name) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one profile (1-D), got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return array


def _same_length(**vectors) -> list[np.ndarray]:
    arrays = [_vector(v, k) for k, v in vectors.items()]
    lengths = {len(a) for a in arrays}
    if len(lengths) != 1:
        raise ValueError(f"Profiles have different numbers of genes: {dict(zip(vectors, map(len, arrays)))}.")
    if not lengths.pop():
        raise ValueError("Profiles are empty (no genes).")
    return arrays


def _cells(values, name, minimum=1) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a (cells, features) matrix, got shape {array.shape}.")
    if array.shape[0] < minimum:
        raise ValueError(f"{name} needs at least {minimum} cells, got {array.shape[0]}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return array


def pseudobulk(cells) -> np.ndarray:
    """Mean profile over cells: `(cells, genes)` -> `(genes,)`."""
    return _cells(cells, "cells").mean(axis=0)


def _pearson(a, b) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")  # undefined for a constant vector (e.g. the no-change baseline's zero delta)
    return float(stats.pearsonr(a, b).statistic)


# -- pseudobulk metrics -----------------------------------------------------------------------------------------------


def pearson(predicted, observed) -> float:
    """Pearson r of `x̂` and `x` over genes (GEARS's `pearson`; inflated by the shared baseline expression)."""
    predicted, observed = _same_length(predicted=predicted, observed=observed)
    return _pearson(predicted, observed)


def pearson_delta(predicted, observed, reference, predicted_reference=None) -> float:
    """
    Pearson r over genes of `Δ̂ = x̂ - r̂` and `Δ = x - r` (cell-eval's `pearson_delta`).

    Args:
        predicted, observed (`np.ndarray` of shape `(genes,)`): pseudobulks.
        reference (`np.ndarray` of shape `(genes,)`): the observed reference state `r` (here: the source cells).
        predicted_reference (`np.ndarray` of shape `(genes,)`, *optional*): `r̂`; defaults to `reference`.
            (cell-eval uses the predicted control; with the observed source as `r̂` a no-change prediction gets NaN.)

    Returns:
        `float`: NaN when either delta is constant.
    """
    predicted_reference = reference if predicted_reference is None else predicted_reference
    x_hat, x, r, r_hat = _same_length(
        predicted=predicted, observed=observed, reference=reference, predicted_reference=predicted_reference
    )
    return _pearson(x_hat - r_hat, x - r)


def mse(predicted, observed) -> float:
    """Mean over genes of `(x̂ - x)²`."""
    predicted, observed = _same_length(predicted=predicted, observed=observed)
    return float(np.mean((predicted - observed) ** 2))


def mae(predicted, observed) -> float:
    """Mean over genes of `|x̂ - x|`."""
    predicted, observed = _same_length(predicted=predicted, observed=observed)
    return float(np.mean(np.abs(predicted - observed)))


def mse_delta(predicted, observed, reference, predicted_reference=None) -> float:
    """Mean over genes of `(Δ̂ - Δ)²` (arguments as [`pearson_delta`])."""
    predicted_reference = reference if predicted_reference is None else predicted_reference
    return mse(np.asarray(predicted) - predicted_reference, np.asarray(observed) - np.asarray(reference))


def mae_delta(predicted, observed, reference, predicted_reference=None) -> float:
    """Mean over genes of `|Δ̂ - Δ|` (arguments as [`pearson_delta`])."""
    predicted_reference = reference if predicted_reference is None else predicted_reference
    return mae(np.asarray(predicted) - predicted_reference, np.asarray(observed) - np.asarray(reference))


def r2_means(predicted, observed, genes=None) -> float:
    """
    ScGen's R² of means: the squared correlation of a least-squares line of `x̂` on `x` over genes
    (`scipy.stats.linregress(x, x̂).rvalue ** 2`), on all genes or on the columns `genes` (e.g. the top DE genes).
    NaN when either is constant.
    """
    predicted, observed = _same_length(predicted=predicted, observed=observed)
    if genes is not None:
        predicted, observed = predicted[np.asarray(genes)], observed[np.asarray(genes)]
    value = _pearson(predicted, observed)
    return value * value


def pearson_delta_top_de(predicted, observed, reference, top_genes, predicted_reference=None) -> float:
    """[`pearson_delta`] on the columns `top_genes` only (GEARS's `pearson_de_delta`, with the top-20 DE genes)."""
    predicted_reference = reference if predicted_reference is None else predicted_reference
    columns = np.asarray(top_genes)
    if columns.size == 0:
        raise ValueError("top_genes is empty.")
    pick = [np.asarray(v, dtype=np.float64)[columns] for v in (predicted, observed, reference, predicted_reference)]
    return pearson_delta(*pick)


# -- distribution metrics ---------------------------------------------------------------------------------------------


def _pairwise(a, b, squared) -> np.ndarray:
    distances = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    distances = np.maximum(distances, 0.0)  # rounding can push an exact zero below it
    return distances if squared else np.sqrt(distances)


def e_distance(x, y, squared: bool = True) -> float:
    """
    Energy distance of two sets of cells: `E = 2·between - within_x - within_y`, with `between` the mean distance over all
    pairs `(x_i, y_j)` and `within` the mean distance over pairs of distinct cells of one set (divided by `n·(n-1)`).

    Args:
        x, y (`np.ndarray` of shape `(cells, features)`): typically principal components; at least 2 cells each.
        squared (`bool`, defaults to `True`): squared Euclidean distances (scPerturb's and the original PerturbGen's
            convention) or plain Euclidean (cell-eval's, the energy-distance literature's). The values are not
            comparable across the two.
    """
    x, y = _cells(x, "x", 2), _cells(y, "y", 2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y have different numbers of features: {x.shape[1]} and {y.shape[1]}.")
    between = _pairwise(x, y, squared).mean()
    within_x = _pairwise(x, x, squared).sum() / (len(x) * (len(x) - 1))
    within_y = _pairwise(y, y, squared).sum() / (len(y) * (len(y) - 1))
    return float(2.0 * between - within_x - within_y)


def mmd_rbf(x, y, gammas=DEFAULT_MMD_GAMMAS, unbiased: bool = True) -> float:
    """
    Maximum mean discrepancy with RBF kernels `k(a, b) = exp(-gamma·‖a - b‖²)`, averaged over `gammas` (the
    original PerturbGen's six widths by default): `mean k(x, x') + mean k(y, y') - 2·mean k(x, y)`.

    Args:
        x, y (`np.ndarray` of shape `(cells, features)`).
        gammas (`Sequence[float]`): kernel widths (positive). They must suit the scale of the data: where
            `gamma·‖a - b‖²` is large for most pairs the kernel sees nothing (see `median_scaled_gammas`).
        unbiased (`bool`, defaults to `True`): leave the pairs of a cell with itself out of the within-set means
            (the U-statistic; needs 2 cells per set; it may fall slightly below 0). The biased estimate keeps them, which adds about
            `1/len(x) + 1/len(y)` wherever the kernel is narrow, so it rewards sets with more cells.
    """
    x, y = _cells(x, "x", 2 if unbiased else 1), _cells(y, "y", 2 if unbiased else 1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y have different numbers of features: {x.shape[1]} and {y.shape[1]}.")
    gammas = [float(g) for g in gammas]
    if not gammas or min(gammas) <= 0:
        raise ValueError(f"gammas must be positive, got {gammas}.")
    xx, yy, xy = _pairwise(x, x, True), _pairwise(y, y, True), _pairwise(x, y, True)

    def within(kernel):
        if not unbiased:
            return kernel.mean()
        n = len(kernel)
        return (kernel.sum() - np.trace(kernel)) / (n * (n - 1))

    values = [within(np.exp(-g * xx)) + within(np.exp(-g * yy)) - 2.0 * np.exp(-g * xy).mean() for g in gammas]
    return float(np.mean(values))


def median_scaled_gammas(cells, gammas=DEFAULT_MMD_GAMMAS) -> list:
    """
    `gammas` divided by the median squared distance between distinct cells of `cells`, so that a width of 1 means
    "the typical distance" whatever the scale of the features (the median heuristic).
    """
    cells = _cells(cells, "cells", 2)
    distances = _pairwise(cells, cells, True)[np.triu_indices(len(cells), 1)]
    median = float(np.median(distances))
    if median <= 0:
        raise ValueError("The cells are (nearly) identical: no scale to set the kernel widths by.")
    return [float(g) / median for g in gammas]


def wasserstein_per_gene(x, y) -> float:
    """Mean over genes of the 1-D Wasserstein (earth mover's) distance between the two cells' values of the gene."""
    x, y = _cells(x, "x"), _cells(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y have different numbers of genes: {x.shape[1]} and {y.shape[1]}.")
    return float(np.mean([stats.wasserstein_distance(x[:, g], y[:, g]) for g in range(x.shape[1])]))


# -- differential expression agreement --------------------------------------------------------------------------------


def differential_expression(cells, reference_cells, genes=None) -> pd.DataFrame:
    """
    Each gene of `cells` against `reference_cells` by scanpy's `rank_genes_groups(method="wilcoxon",
    tie_correct=True)`: a Wilcoxon rank-sum test (normal approximation, tie-corrected, no continuity correction),
    Benjamini-Hochberg adjusted.

    Args:
        cells, reference_cells (`np.ndarray` of shape `(cells, genes)`): log1p CP10k profiles, at least 2 cells each
            (scanpy cannot rank a group of one).
        genes (`Sequence[str]`, *optional*): gene names (default: column numbers).

    Returns:
        `pd.DataFrame` with one row per gene, in the input's order: `gene`, `score` (the z statistic; positive =
        higher in `cells`), `log2_fold_change` (`log2((mean CP10k of cells + 1) / (mean CP10k of reference + 1))`,
        not scanpy's `logfoldchanges`, which adds 1e-9 instead of 1 and so explodes for genes near zero in one
        group), `p_value`, `p_adjusted`.
    """
    x, y = _cells(cells, "cells", 2), _cells(reference_cells, "reference_cells", 2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"cells and reference_cells have different numbers of genes: {x.shape[1]}, {y.shape[1]}.")
    names = list(genes) if genes is not None else [str(i) for i in range(x.shape[1])]
    if len(names) != x.shape[1]:
        raise ValueError(f"{len(names)} gene names for {x.shape[1]} genes.")
    table = _rank_genes_groups(x, y)
    lfc = np.log2((np.expm1(x).mean(0) + 1.0) / (np.expm1(y).mean(0) + 1.0))
    return pd.DataFrame(
        {
            "gene": names,
            "score": table["scores"].to_numpy(np.float64),
            "log2_fold_change": lfc,
            "p_value": table["pvals"].to_numpy(np.float64),
            "p_adjusted": table["pvals_adj"].to_numpy(np.float64),
        }
    )


def _rank_genes_groups(x, y) -> pd.DataFrame:
    """Scanpy's Wilcoxon table of group `x` against reference `y`, one row per column of `x` in column order."""
    import anndata as ad
    import scanpy as sc

    # Column numbers as gene names: the caller's names may repeat, and scanpy needs unique ones.
    adata = ad.AnnData(np.vstack([x, y]), var=pd.DataFrame(index=[str(i) for i in range(x.shape[1])]))
    adata.obs["group"] = pd.Categorical(["cells"] * len(x) + ["reference"] * len(y))
    adata.uns["log1p"] = {"base": None}  # the profiles are log1p CP10k: stops scanpy's "raw count data" warning
    # A gene constant in both groups has zero variance: scanpy divides by it, then sets the score to 0 and p to 1.
    with np.errstate(divide="ignore", invalid="ignore"):
        sc.tl.rank_genes_groups(
            adata,
            "group",
            groups=["cells"],
            reference="reference",
            method="wilcoxon",
            tie_correct=True,
            corr_method="benjamini-hochberg",
            n_genes=x.shape[1],
        )
    table = sc.get.rank_genes_groups_df(adata, group="cells")
    return table.set_index("names").loc[adata.var_names]


def top_de_genes(de: pd.DataFrame, k: int) -> np.ndarray:
    """Row positions of the `k` genes with the largest |score| in a [`differential_expression`] table."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    order = np.argsort(-np.abs(de["score"].to_numpy()), kind="stable")
    return order[:k]


def _significant(de, fdr):
    table = de[de["p_adjusted"] < fdr]
    order = np.argsort(-np.abs(table["log2_fold_change"].to_numpy()), kind="stable")
    return table.iloc[order]


def overlap_at_k(
    observed_de: pd.DataFrame, predicted_de: pd.DataFrame, k: int | None = None, fdr: float = 0.05
) -> float:
    """
    cell-eval's `overlap_at_k` (`overlap_at_N` with `k=None`): the genes significant at `fdr` in each table, ranked
    by |log2 fold change|; with `k' = min(k, number observed)` (all observed for `k=None`), the share of the observed
    top `k'` that is among the predicted top `k'`. NaN when no observed gene is significant.
    """
    observed, predicted = _significant(observed_de, fdr), _significant(predicted_de, fdr)
    if observed.empty:
        return float("nan")
    size = len(observed) if k is None else min(int(k), len(observed))
    top_observed, top_predicted = set(observed["gene"][:size]), set(predicted["gene"][:size])
    return len(top_observed & top_predicted) / size


def direction_match(observed_de: pd.DataFrame, predicted_de: pd.DataFrame, fdr: float = 0.05) -> float:
    """
    cell-eval's `de_direction_match`: among the observed genes significant at `fdr`, the share whose predicted log2
    fold change has the same sign (a predicted change of exactly 0 matches nothing). NaN without significant genes.
    """
    observed = _significant(observed_de, fdr)
    if observed.empty:
        return float("nan")
    predicted = predicted_de.set_index("gene")["log2_fold_change"].reindex(observed["gene"]).fillna(0.0)
    return float(np.mean(np.sign(predicted.to_numpy()) == np.sign(observed["log2_fold_change"].to_numpy())))


def spearman_lfc_sig(observed_de: pd.DataFrame, predicted_de: pd.DataFrame, fdr: float = 0.05) -> float:
    """
    cell-eval's `de_spearman_lfc_sig`: Spearman correlation of observed and predicted log2 fold changes over the
    observed genes significant at `fdr` (a gene missing from the prediction counts as 0). NaN with fewer than 2
    such genes or a constant side.
    """
    observed = _significant(observed_de, fdr)
    if len(observed) < 2:
        return float("nan")
    predicted = predicted_de.set_index("gene")["log2_fold_change"].reindex(observed["gene"]).fillna(0.0).to_numpy()
    truth = observed["log2_fold_change"].to_numpy()
    if np.ptp(predicted) == 0 or np.ptp(truth) == 0:
        return float("nan")
    return float(stats.spearmanr(predicted, truth).statistic)


def discrimination_score(predicted_deltas, observed_deltas, metric: str = "l1") -> np.ndarray:
    """
    cell-eval's `discrimination_score_{metric}`, per predicted condition: the distances from its predicted delta to
    every observed delta; `rank` = how many observed deltas are strictly closer than its own; score
    `1 - rank / N` (1: its own observed effect is the closest of the `N`).

    Args:
        predicted_deltas, observed_deltas (`np.ndarray` of shape `(N, genes)`): row `i` of both is condition `i`.
        metric (`str`): `"l1"`, `"l2"` or `"cosine"` (1 - cosine similarity).

    Returns:
        `np.ndarray` of shape `(N,)`.
    """
    predicted, observed = (
        _cells(predicted_deltas, "predicted_deltas", 2),
        _cells(observed_deltas, "observed_deltas", 2),
    )
    if predicted.shape != observed.shape:
        raise ValueError(f"predicted_deltas {predicted.shape} and observed_deltas {observed.shape} differ in shape.")
    difference = predicted[:, None, :] - observed[None, :, :]
    if metric == "l1":
        distances = np.abs(difference).sum(-1)
    elif metric == "l2":
        distances = np.sqrt((difference**2).sum(-1))
    elif metric == "cosine":
        norms = np.linalg.norm(predicted, axis=1)[:, None] * np.linalg.norm(observed, axis=1)[None, :]
        distances = 1.0 - (predicted @ observed.T) / np.where(norms > 0, norms, 1.0)
    else:
        raise ValueError(f"Unknown metric {metric!r}; choose l1, l2 or cosine.")
    own = np.diag(distances)
    ranks = (distances < own[:, None]).sum(axis=1)
    return 1.0 - ranks / len(observed)


# -- token level ------------------------------------------------------------------------------------------------------


def token_topk_overlap(generated, observed, k: int) -> float:
    """
    Mean over pairs of cells of `|top_d(generated) ∩ top_d(observed)| / d` with `d = min(k, len(generated), len(observed))`, where
    `top_d` is the first `d` genes of a rank-ordered list (the token sequence). Pairs with an empty list are skipped;
    NaN when none is left.

    Args:
        generated, observed (`Sequence[Sequence[int]]`): paired rank lists (same number of cells).
        k (`int`): list depth.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if len(generated) != len(observed):
        raise ValueError(f"{len(generated)} generated and {len(observed)} observed lists: pair them one to one.")
    values = []
    for g, o in zip(generated, observed):
        depth = min(k, len(g), len(o))
        if depth:
            values.append(len(set(list(g)[:depth]) & set(list(o)[:depth])) / depth)
    return float(np.mean(values)) if values else float("nan")


# -- directions -------------------------------------------------------------------------------------------------------

# Whether a larger value of each metric `evaluate` reports is better. Names with a depth (`top{k}`, `at_{k}`) are
# written with `{k}`; every other name must match exactly, so a new metric without an entry fails loudly instead of
# being ranked by a guess.
METRIC_DIRECTIONS = {
    "pearson": "higher",
    "pearson_delta": "higher",
    "pearson_delta_top{k}_de": "higher",
    "mse": "lower",
    "mae": "lower",
    "mse_delta": "lower",
    "mae_delta": "lower",
    "r2_means": "higher",
    "r2_means_top{k}_de": "higher",
    "e_distance_squared": "lower",
    "e_distance": "lower",
    "mmd_rbf": "lower",
    "wasserstein_per_gene": "lower",
    "overlap_at_N": "higher",
    "overlap_at_{k}": "higher",
    "de_direction_match": "higher",
    "de_spearman_lfc_sig": "higher",
    "discrimination_score_l1": "higher",
    "discrimination_score_l2": "higher",
    "discrimination_score_cosine": "higher",
    "token_top{k}_overlap": "higher",
}


def higher_is_better(metric: str) -> bool:
    """
    Whether a larger value of `metric` is better, from [`METRIC_DIRECTIONS`] (a depth such as `top20` or `at_50`
    matches the `{k}` of its entry).

    Raises:
        `ValueError`: for a metric without an entry.
    """
    if metric in METRIC_DIRECTIONS:
        return METRIC_DIRECTIONS[metric] == "higher"
    for template, direction in METRIC_DIRECTIONS.items():
        prefix, templated, suffix = template.partition("{k}")
        if templated and re.fullmatch(re.escape(prefix) + r"\d+" + re.escape(suffix), metric):
            return direction == "higher"
    raise ValueError(f"No ranking direction is known for metric {metric!r}; add it to METRIC_DIRECTIONS.")
