"""
Predicted perturbation effects scored against known true effects (the simulator's), and the linear baseline the
demo shows beside the model: arrays in, numbers out.
"""

import numpy as np
from scipy import stats

from ..tokenization import log_normalize


def effect_scores(
    predicted: np.ndarray, truth: np.ndarray, responder_threshold: float = 0.5, unaffected_threshold: float = 0.1
) -> dict:
    """
    How well predicted log fold changes match the true ones, gene by gene.

    - `pearson`: Pearson correlation of predicted and true log2 fold changes over all genes (NaN if either is
      constant);
    - `sign_agreement`: share of true responders (|true| >= `responder_threshold`) whose predicted change has the
      true sign (a prediction of exactly 0 has no sign and counts as wrong);
    - `auroc`: probability that a true responder has a larger |predicted change| than a gene with
      |true| < `unaffected_threshold` (ties count one half); NaN without both kinds of gene.

    Args:
        predicted, truth (`np.ndarray` of shape `(num_genes,)`).
    """
    predicted, truth = np.asarray(predicted, dtype=float), np.asarray(truth, dtype=float)
    responders = np.abs(truth) >= responder_threshold
    unaffected = np.abs(truth) < unaffected_threshold
    constant = np.ptp(predicted) == 0 or np.ptp(truth) == 0
    pearson = float("nan") if constant else float(stats.pearsonr(predicted, truth).statistic)
    sign = float(np.mean(np.sign(predicted[responders]) == np.sign(truth[responders]))) if responders.any() else np.nan
    auroc = float("nan")
    if responders.any() and unaffected.any():
        u = stats.mannwhitneyu(np.abs(predicted[responders]), np.abs(predicted[unaffected])).statistic
        auroc = float(u / (responders.sum() * unaffected.sum()))
    return {
        "pearson": pearson,
        "sign_agreement": sign,
        "auroc": auroc,
        "responders": int(responders.sum()),
        "unaffected": int(unaffected.sum()),
    }


def significance_calls(
    called: np.ndarray, truth: np.ndarray, responder_threshold: float = 0.5, unaffected_threshold: float = 0.1
) -> dict:
    """
    The pipeline's significance calls (against its sham null, with the effect floor) scored against the truth:
    `precision` (share of called genes that are true responders, |true| >= `responder_threshold`; NaN without
    calls), `recall` (share of true responders called; NaN without responders) and `precision_any_effect` (share of
    called genes with a true effect at all, |true| >= `unaffected_threshold`: a call of a gene the knockout moves by
    less than a responder's change is not a false discovery).
    """
    called = np.asarray(called, dtype=bool)
    truth = np.abs(np.asarray(truth, dtype=float))
    responders = truth >= responder_threshold
    hits = int((called & responders).sum())
    affected = int((called & (truth >= unaffected_threshold)).sum())
    return {
        "called": int(called.sum()),
        "responders": int(responders.sum()),
        "true_calls": hits,
        "precision": hits / called.sum() if called.any() else float("nan"),
        "recall": hits / responders.sum() if responders.any() else float("nan"),
        "affected_calls": affected,
        "precision_any_effect": affected / called.sum() if called.any() else float("nan"),
    }


def _lfc_from_log(control_log, perturbed_log):
    """The pipeline's log2 fold change of mean CP10k, from predicted log1p CP10k."""
    control, perturbed = np.clip(np.expm1(control_log), 0, None), np.clip(np.expm1(perturbed_log), 0, None)
    return np.log2((perturbed.mean(0) + 1.0) / (control.mean(0) + 1.0))


def ridge_knockout_effects(
    train_profiles: np.ndarray,
    train_times: np.ndarray,
    train_clones: np.ndarray,
    source_profiles: np.ndarray,
    gene_column: int,
    source_time: str,
    time_points,
    ridge: float,
) -> dict:
    """
    A ridge regression from a clone's mean source profile to its mean profile at each later time point (log1p
    CP10k, centred), fitted on the training clones; the knockout sets the gene to 0 in each held-out source cell.

    Args:
        train_profiles (`np.ndarray` of shape `(cells, genes)`): log1p CP10k of the training cells, with their
            `train_times` and `train_clones` (`np.ndarray` of shape `(cells,)`).
        source_profiles (`np.ndarray` of shape `(source cells, genes)`): log1p CP10k of the held-out source cells.
        gene_column (`int`): the knocked-out gene's column. ridge (`float`): the ridge penalty.

    Returns:
        `{time point: np.ndarray of predicted log2 fold changes per gene}`.
    """
    names = sorted(set(train_clones))

    def clone_means(time_point):
        at = train_times == time_point
        return np.stack([train_profiles[at & (train_clones == c)].mean(0) for c in names])

    x = clone_means(source_time)
    x_mean = x.mean(0)
    x_centred = x - x_mean
    gram = x_centred.T @ x_centred + ridge * np.eye(x.shape[1])
    knocked = source_profiles.copy()
    knocked[:, gene_column] = 0.0
    effects = {}
    for time_point in time_points:
        y = clone_means(time_point)
        offset = y.mean(0)
        weights = np.linalg.solve(gram, x_centred.T @ (y - offset))
        control = (source_profiles - x_mean) @ weights + offset
        perturbed = (knocked - x_mean) @ weights + offset
        effects[time_point] = _lfc_from_log(control, perturbed)
    return effects


def profiles(counts) -> np.ndarray:
    """log1p CP10k of a (sparse or dense) count matrix, dense float64."""
    dense = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts)
    return log_normalize(dense.astype(np.float64))
