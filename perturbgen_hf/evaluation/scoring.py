"""
Scoring predicted cells beside baselines: for every evaluated (time point, group), the model's cells and each
baseline's against the observed cells, as a tidy table of (metric, time point, group, method, value).

Everything is scored on the model's target genes, as log1p CP10k of the counts of those genes (for observed cells,
predictions and baselines alike). The reference state of every delta is the observed source cells of the evaluated
group (so `mse_delta` equals `mse` and `mae_delta` equals `mae`; they are reported for completeness). Distribution
metrics (E-distance, MMD) are computed on principal components fitted on the observed source and target cells of
the evaluated group (the MMD is unbiased, with the original's six kernel widths divided by the observed cells'
median squared distance); the per-gene Wasserstein distance on the expression itself.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..settings import EvaluationSettings
from . import baselines, metrics
from .splits import trained_targets


MODEL = "PerturbGen (this model)"


def _baseline_rows(split, times, value_of, source, trained, protocol, time_point, group) -> dict:
    """The real cells that the cell-carrying baselines predict, as row numbers (`trained`: trained targets)."""
    rows = {"no change": np.flatnonzero(split.source[group])}
    if protocol == "heldout-group":
        rows["training mean"] = np.flatnonzero(split.train & (times == time_point))  # the other groups' state mean
    else:
        rows["training mean"] = np.flatnonzero(split.train & np.isin(times, trained))  # mean over trained times
    if protocol == "heldout-time":
        known = {value_of[t]: t for t in [source, *trained]}
        nearest = known[baselines.nearest_time_value(list(known), value_of[time_point])]
        rows["nearest time point"] = np.flatnonzero(split.train & (times == nearest))
    return rows


def _baselines(split, expression, times, groups, order, value_of, source, protocol, time_point, group, settings):
    """Each baseline's predicted cells (log1p CP10k) for one evaluated (time point, group)."""
    x = expression["expression"]
    trained = trained_targets(split, times, order, source)
    rows = _baseline_rows(split, times, value_of, source, trained, protocol, time_point, group)
    result = {
        "no change": baselines.no_change(x[rows["no change"]]),
        "training mean": baselines.training_mean([x[rows["training mean"]]]),
    }
    if "nearest time point" in rows:
        result["nearest time point"] = x[rows["nearest time point"]]
        result.update(
            _time_interpolations(split, x, times, groups, value_of, source, trained, time_point, group, rows, settings)
        )
    conditions, features, source_features, target_features = _linear_design(
        protocol, split.train, times, groups, value_of, source, time_point, trained
    )
    result["linear (PCA + ridge)"] = baselines.linear_model(
        [x[c] for c in conditions],
        features,
        x[rows["no change"]],
        source_features,
        target_features,
        settings.linear_components,
        settings.linear_ridge,
    )
    return result, rows


def _time_interpolations(split, x, times, groups, value_of, source, trained, time_point, group, rows, settings):
    """The neighbour and optimal-transport interpolations of a held-out time point, within its group."""
    known = {value_of[t]: t for t in [source, *trained]}
    t0, t1 = baselines.neighbour_time_values(list(known), value_of[time_point])

    def cells_at(t):
        if known[t] == source:
            return x[rows["no change"]]
        return x[split.train & (times == known[t]) & (groups == group)]

    before, after = cells_at(t0), cells_at(t1)
    target = value_of[time_point]
    return {
        "neighbour interpolation": baselines.neighbour_interpolation(
            before, after, t0, t1, target, seed=settings.seed
        ),
        "OT interpolation": baselines.transport_interpolation(
            before,
            after,
            t0,
            t1,
            target,
            num_components=settings.n_pcs,
            exact_max_pairs=settings.ot_exact_max_pairs,
            epsilon=settings.ot_epsilon,
            seed=settings.seed,
        ),
    }


def _linear_design(protocol, train, times, groups, value_of, source, time_point, trained_targets):
    """Training conditions (cell masks) and their features for the linear baseline (see `linear_model`)."""
    course = [source, *trained_targets]
    if protocol == "heldout-time":
        # A linear trend in (standardised) time per component: inter- or extrapolates to the held-out value.
        known = np.array([value_of[t] for t in course])
        centre, scale = known.mean(), known.std() or 1.0

        def feature(t):
            return np.array([1.0, (value_of[t] - centre) / scale])

        return (
            [train & (times == t) for t in course],
            np.stack([feature(t) for t in course]),
            feature(source),
            feature(time_point),
        )
    states = {t: i for i, t in enumerate(course if time_point in course else [*course, time_point])}
    if protocol == "heldout-cells":
        conditions = [train & (times == t) for t in course]
        names = list(course)
        group_of = [None] * len(course)
    else:
        # An additive model of group and state, fitted on the other groups; the held-out group's shift is the
        # state effect alone.
        other = sorted(set(groups[train]))
        pairs = [(g, t) for g in other for t in course if (train & (groups == g) & (times == t)).any()]
        conditions = [train & (groups == g) & (times == t) for g, t in pairs]
        names = [t for _, t in pairs]
        group_of = [other.index(g) for g, _ in pairs]
    num_groups = max([g + 1 for g in group_of if g is not None], default=0)

    def feature(t, g=None):
        vector = np.zeros(num_groups + len(states))
        if g is not None:
            vector[g] = 1.0
        vector[num_groups + states[t]] = 1.0
        return vector

    features = np.stack([feature(t, g) for t, g in zip(names, group_of)])
    return conditions, features, feature(source), feature(time_point)


def score_predictions(
    split, expression, generated, tokenizer, times, groups, order, value_of, source, protocol, settings
) -> tuple[list, dict]:
    """
    Score the model's generated cells and every baseline against the observed cells of each evaluated (time point,
    group) of `split`.

    Returns:
        `(rows, details)`: rows `(metric, time point, group, method, value)`, and per (time point, group) the
        methods' cells, the observed and reference cells and the observed DE table (for plots).
    """
    rows, details = [], {}
    genes = list(tokenizer.target_genes)
    symbols = [tokenizer.gene_symbols.get(g, g) for g in genes]
    deltas = {}
    for (time_point, group), mask in split.observed.items():
        observed = expression["expression"][mask]
        reference = expression["expression"][split.source[group]]
        model_cells = metrics.log_normalize(generated[(time_point, group)]["counts"])
        baseline_cells, baseline_rows = _baselines(
            split, expression, times, groups, order, value_of, source, protocol, time_point, group, settings
        )
        methods = {MODEL: model_cells, **baseline_cells}
        observed_de = metrics.differential_expression(observed, reference, symbols)
        context = ScoringContext(observed, reference, observed_de, settings)
        tokens = _token_lists(
            generated[(time_point, group)]["tokens"],
            expression["counts"],
            np.flatnonzero(mask),
            baseline_rows,
            tokenizer,
            settings.seed,
        )
        for method, cells in methods.items():
            values = score_cells(cells, context, symbols, tokens.get(method))
            rows += [(name, time_point, group, method, value) for name, value in values.items()]
            deltas.setdefault(method, {})[(time_point, group)] = cells.mean(0) - reference.mean(0)
        deltas.setdefault("observed", {})[(time_point, group)] = observed.mean(0) - reference.mean(0)
        details[(time_point, group)] = {
            "methods": methods,
            "observed": observed,
            "reference": reference,
            "observed_de": observed_de,
            "symbols": symbols,
        }
    rows += discrimination_rows(deltas)
    return rows, details


@dataclass
class ScoringContext:
    """What every method of one evaluated (time point, group) is compared with."""

    observed: np.ndarray
    reference: np.ndarray
    observed_de: pd.DataFrame
    settings: EvaluationSettings

    def __post_init__(self):
        s = self.settings
        self.top_de = metrics.top_de_genes(self.observed_de, min(s.top_de, len(self.observed_de)))
        self.top_r2 = metrics.top_de_genes(self.observed_de, min(s.top_r2, len(self.observed_de)))
        both = np.vstack([self.observed, self.reference])
        self.centre = both.mean(0)
        components = max(1, min(s.n_pcs, both.shape[0] - 1, both.shape[1]))
        self.axes = np.linalg.svd(both - self.centre, full_matrices=False)[2][:components].T
        # The original's kernel widths, relative to the observed cells' median squared distance.
        self.gammas = metrics.median_scaled_gammas(self.project(self.observed)) if len(self.observed) > 1 else None

    def project(self, cells):
        """Project cells `(n, genes)` onto the principal components of the observed and reference cells."""
        return (cells - self.centre) @ self.axes


def score_cells(cells, context, symbols, token_pairs) -> dict:
    """Every metric of one method's cells against the context's observed cells, as `{metric: value}`."""
    s = context.settings
    x_hat, x, r = cells.mean(0), context.observed.mean(0), context.reference.mean(0)
    values = {
        "pearson": metrics.pearson(x_hat, x),
        "pearson_delta": metrics.pearson_delta(x_hat, x, r),
        f"pearson_delta_top{s.top_de}_de": metrics.pearson_delta_top_de(x_hat, x, r, context.top_de),
        "mse": metrics.mse(x_hat, x),
        "mae": metrics.mae(x_hat, x),
        "mse_delta": metrics.mse_delta(x_hat, x, r),
        "mae_delta": metrics.mae_delta(x_hat, x, r),
        "r2_means": metrics.r2_means(x_hat, x),
        f"r2_means_top{s.top_r2}_de": metrics.r2_means(x_hat, x, context.top_r2),
    }
    if len(cells) >= 2 and context.gammas is not None:
        projected, observed = context.project(cells), context.project(context.observed)
        values["e_distance_squared"] = metrics.e_distance(projected, observed, squared=True)
        values["e_distance"] = metrics.e_distance(projected, observed, squared=False)
        values["mmd_rbf"] = metrics.mmd_rbf(projected, observed, context.gammas)
    values["wasserstein_per_gene"] = metrics.wasserstein_per_gene(cells, context.observed)
    de_names = ("overlap_at_N", f"overlap_at_{s.overlap_k}", "de_direction_match", "de_spearman_lfc_sig")
    if len(cells) < 2:  # a single predicted profile has no spread to test: no DE scores
        values.update(dict.fromkeys(de_names, float("nan")))
    else:
        predicted_de = metrics.differential_expression(cells, context.reference, symbols)
        values[de_names[0]] = metrics.overlap_at_k(context.observed_de, predicted_de, None, s.fdr)
        values[de_names[1]] = metrics.overlap_at_k(context.observed_de, predicted_de, s.overlap_k, s.fdr)
        values[de_names[2]] = metrics.direction_match(context.observed_de, predicted_de, s.fdr)
        values[de_names[3]] = metrics.spearman_lfc_sig(context.observed_de, predicted_de, s.fdr)
    if token_pairs is not None:
        values[f"token_top{s.token_k}_overlap"] = metrics.token_topk_overlap(*token_pairs, s.token_k)
    return values


def _token_lists(model_tokens, counts, observed_rows, baseline_rows, tokenizer, seed):
    """
    Rank lists to compare at the token level: each predicted cell (generated, or a real cell a baseline carries
    over) paired with a random observed cell of the evaluated state (seeded). The linear baseline has no counts to
    rank, so it has no token score.
    """
    rng = np.random.default_rng(seed)

    def ranked(rows):
        lists = tokenizer.rank_targets(sp.csr_matrix(counts[rows]), list(tokenizer.target_genes))
        return [list(lists.cell(i)) for i in range(len(rows))]

    observed = ranked(observed_rows)

    def paired(predicted):
        return predicted, [observed[i] for i in rng.integers(0, len(observed), size=len(predicted))]

    return {MODEL: paired(model_tokens), **{name: paired(ranked(rows)) for name, rows in baseline_rows.items()}}


def discrimination_rows(deltas) -> list:
    """cell-eval's discrimination score (l1) per method, where two or more states were evaluated."""
    observed = deltas.pop("observed")
    keys = list(observed)
    if len(keys) < 2:
        return []
    truth = np.stack([observed[k] for k in keys])
    rows = []
    for method, by_key in deltas.items():
        scores = metrics.discrimination_score(np.stack([by_key[k] for k in keys]), truth, "l1")
        rows += [("discrimination_score_l1", t, g, method, float(s)) for (t, g), s in zip(keys, scores)]
    return rows
