"""
The metrics that carry cell-eval's names score the same predictions as cell-eval does.

cell-eval is an optional test dependency (in the `test` extra, so CI has it). The prediction is a time point and the
reference the source cells; cell-eval calls them a perturbation and its control.

Agree exactly: `pearson_delta`, `mse`, `mae`, `mse_delta`, `mae_delta` (pseudobulk metrics), and, given the same
differential-expression tables, `overlap_at_N`, `overlap_at_50`, `de_direction_match`, `de_spearman_lfc_sig`.

Differ by definition, in the DE tables themselves (cell-eval computes them with pdex):
- the log2 fold change: ours is `log2((mean CP10k + 1) / (mean reference CP10k + 1))`, pdex's is the log2 ratio of
  geometric means (the mean of log1p, back-transformed) with a 1e-9 pseudocount. Ours damps genes near zero in both
  groups, pdex's does not; the two agree in sign for the clearly changed genes, not in size.
- the p-value: both are Wilcoxon rank-sum tests with the normal approximation and tie correction (ours through
  scanpy); pdex's differ from scanpy's by under 3% here, from the continuity correction.
Because the DE-based metrics rank genes by these fold changes and select them by these p-values, cell-eval's own
`de_direction_match` and `de_spearman_lfc_sig` need not equal ours when each side computes its own DE.
"""

import numpy as np
import pandas as pd
import pytest

from perturbgen_hf.evaluation import metrics


cell_eval = pytest.importorskip(
    "cell_eval", reason="cell-eval is not installed (pip install -e '.[test]' installs it): nothing to compare with"
)
pl = pytest.importorskip("polars", reason="polars comes with cell-eval")
ad = pytest.importorskip("anndata")

GENES = [f"g{i}" for i in range(60)]


def _log_normalize(counts):
    return np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)


@pytest.fixture(scope="module")
def cells():
    """Source cells, observed 6h cells (15 of 60 genes changed) and predicted 6h cells (the effects plus noise)."""
    rng = np.random.default_rng(0)
    base = rng.gamma(2.0, 2.0, len(GENES))
    true_shift = np.zeros(len(GENES))
    true_shift[:15] = rng.normal(0, 1.2, 15)
    predicted_shift = true_shift + rng.normal(0, 0.3, len(GENES))

    def draw(n, shift):
        return _log_normalize(rng.poisson(base * np.exp(shift), size=(n, len(GENES))).astype(float))

    return draw(80, 0.0), draw(70, true_shift), draw(60, predicted_shift)


def _adata(control, state):
    adata = ad.AnnData(np.vstack([control, state]), var=pd.DataFrame(index=GENES))
    adata.obs["target"] = pd.Categorical(["control"] * len(control) + ["6h"] * len(state))
    return adata


def _polars(de):
    return pl.DataFrame(
        {
            "target": ["6h"] * len(de),
            "feature": list(de["gene"]),
            "log2_fold_change": de["log2_fold_change"].to_numpy(),
            "p_value": de["p_value"].to_numpy(),
            "fdr": de["p_adjusted"].to_numpy(),
        }
    )


def _cell_eval(cells, tmp_path, de_tables=None):
    control, observed, predicted = cells
    kwargs = {} if de_tables is None else {"de_real": _polars(de_tables[0]), "de_pred": _polars(de_tables[1])}
    evaluator = cell_eval.MetricsEvaluator(
        _adata(control, predicted),
        _adata(control, observed),
        control_pert="control",
        pert_col="target",
        num_threads=1,
        outdir=str(tmp_path / "cell-eval"),
        **kwargs,
    )
    results, _ = evaluator.compute(profile="full" if de_tables is None else "de", write_csv=False)
    return results.to_pandas().set_index("perturbation").loc["6h"], evaluator


def test_pseudobulk_metrics_agree_with_cell_eval(cells, tmp_path):
    theirs, _ = _cell_eval(cells, tmp_path)
    control, observed, predicted = cells
    x_hat, x, r = predicted.mean(0), observed.mean(0), control.mean(0)
    ours = {
        "pearson_delta": metrics.pearson_delta(x_hat, x, r),
        "mse": metrics.mse(x_hat, x),
        "mae": metrics.mae(x_hat, x),
        "mse_delta": metrics.mse_delta(x_hat, x, r),
        "mae_delta": metrics.mae_delta(x_hat, x, r),
    }
    for name, value in ours.items():
        assert value == pytest.approx(theirs[name], rel=1e-5), name
    assert 0.5 < ours["pearson_delta"] < 0.99  # a prediction that is neither perfect nor unrelated


def test_de_metrics_agree_with_cell_eval_given_the_same_de_tables(cells, tmp_path):
    control, observed, predicted = cells
    observed_de = metrics.differential_expression(observed, control, GENES)
    predicted_de = metrics.differential_expression(predicted, control, GENES)
    theirs, _ = _cell_eval(cells, tmp_path, (observed_de, predicted_de))
    ours = {
        "overlap_at_N": metrics.overlap_at_k(observed_de, predicted_de, None),
        "overlap_at_50": metrics.overlap_at_k(observed_de, predicted_de, 50),
        "de_direction_match": metrics.direction_match(observed_de, predicted_de),
        "de_spearman_lfc_sig": metrics.spearman_lfc_sig(observed_de, predicted_de),
    }
    for name, value in ours.items():
        assert value == pytest.approx(theirs[name], rel=1e-6), name
    assert 0 < ours["overlap_at_N"] < 1 and 0 < ours["de_direction_match"] < 1  # not a trivial agreement


def test_de_tables_differ_from_pdex_only_as_documented(cells, tmp_path):
    control, observed, _ = cells
    _, evaluator = _cell_eval(cells, tmp_path)
    theirs = evaluator.de_comparison.real.data.to_pandas().set_index("feature").loc[GENES]
    ours = metrics.differential_expression(observed, control, GENES)
    p_theirs, p_ours = theirs["p_value"].to_numpy(np.float64), ours["p_value"].to_numpy()
    np.testing.assert_allclose(p_theirs, p_ours, rtol=0.03)
    assert (p_theirs >= p_ours * (1 - 1e-6)).mean() > 0.9  # the continuity correction makes pdex's larger
    changed = (ours["p_adjusted"] < 0.01).to_numpy()
    assert changed.sum() >= 10
    lfc_theirs, lfc_ours = theirs["log2_fold_change"].to_numpy(np.float64), ours["log2_fold_change"].to_numpy()
    assert (np.sign(lfc_theirs[changed]) == np.sign(lfc_ours[changed])).all()
    geometric = np.log2((np.expm1(observed.mean(0)) + 1e-9) / (np.expm1(control.mean(0)) + 1e-9))
    np.testing.assert_allclose(lfc_theirs, geometric, rtol=1e-4, atol=1e-5)  # pdex's definition, as stated
