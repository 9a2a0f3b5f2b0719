import json
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from perturbgen_hf.cli import main
from perturbgen_hf.evaluation import baselines, metrics

from .conftest import SHARED_DATA


SHALEK = SHARED_DATA / "expression" / "shalek2014_bmdc_lps_timecourse.h5ad"
KANG = SHARED_DATA / "expression" / "kang2018_pbmc_ifnb_muscat_subset.h5ad"


# -- metrics against hand-computed values -------------------------------------------------------------------------------


def test_pseudobulk_metrics_by_hand():
    predicted, observed, reference = np.array([1.0, 2, 3]), np.array([2.0, 4, 7]), np.array([1.0, 1, 1])
    # deltas [0, 1, 2] and [1, 3, 6]: centred [-1, 0, 1] and [-7/3, -1/3, 8/3], covariance sum 5
    assert metrics.pearson_delta(predicted, observed, reference) == pytest.approx(15 / math.sqrt(228))
    assert metrics.mse(predicted, observed) == pytest.approx(7.0)  # (1 + 4 + 16) / 3
    assert metrics.mae(predicted, observed) == pytest.approx(7 / 3)
    # with a different predicted reference [0, 0, 0]: deltas [1, 2, 3] and [1, 3, 6]
    assert metrics.mse_delta(predicted, observed, reference, np.zeros(3)) == pytest.approx(10 / 3)
    assert metrics.mae_delta(predicted, observed, reference, np.zeros(3)) == pytest.approx(4 / 3)
    assert metrics.mse_delta(predicted, observed, reference) == pytest.approx(7.0)  # same reference: same as mse
    assert metrics.r2_means(predicted, observed) == pytest.approx(225 / 228)
    assert metrics.r2_means(predicted, observed, genes=[0, 2]) == pytest.approx(1.0)  # two points lie on a line
    assert metrics.pearson(predicted, observed) == pytest.approx(15 / math.sqrt(228))
    top = metrics.pearson_delta_top_de(np.array([1.0, 9, 3, 0]), np.array([2.0, 0, 7, 5]), np.ones(4), [0, 2])
    assert top == pytest.approx(1.0)
    assert math.isnan(metrics.pearson_delta(reference, observed, reference))  # no change: undefined, not 0


def test_distribution_metrics_by_hand():
    x, y = np.array([[0.0], [1.0]]), np.array([[3.0], [4.0]])
    # squared: between 9, 16, 4, 9 (mean 9.5), within 1 and 1 -> 19 - 2
    assert metrics.e_distance(x, y, squared=True) == pytest.approx(17.0)
    # plain: between 3, 4, 2, 3 (mean 3), within 1 and 1 -> 6 - 2
    assert metrics.e_distance(x, y, squared=False) == pytest.approx(4.0)
    assert metrics.e_distance(x, x) == pytest.approx(-1.0)  # 2 * 0.5 - 1 - 1: the within-set terms are unbiased
    a, b = np.array([[0.0]]), np.array([[1.0]])
    # biased (the diagonal kept): 1 + 1 - 2 exp(-gamma)
    assert metrics.mmd_rbf(a, b, gammas=[1.0], unbiased=False) == pytest.approx(2 - 2 * math.exp(-1))
    assert metrics.mmd_rbf(a, b, [1.0, 2.0], unbiased=False) == pytest.approx(2 - math.exp(-1) - math.exp(-2))
    # unbiased: within-set pairs of distinct cells only (x: 0 and 1; y: 3 and 4), between: 9, 16, 4, 9
    between = (2 * math.exp(-9) + math.exp(-16) + math.exp(-4)) / 4
    assert metrics.mmd_rbf(x, y, gammas=[1.0]) == pytest.approx(2 * math.exp(-1) - 2 * between)
    assert metrics.mmd_rbf(x, x, unbiased=False) == pytest.approx(0.0)
    assert metrics.mmd_rbf(x, x) < 0  # the unbiased estimate of a zero discrepancy scatters around 0
    # squared distances 1, 9, 4 between the three cells: median 4
    assert metrics.median_scaled_gammas([[0.0], [1.0], [3.0]], [2.0, 0.5]) == pytest.approx([0.5, 0.125])
    # gene 0: {0, 1} vs {1, 2} -> 1; gene 1: {0, 0} vs {0, 2} -> half the mass moves 2 -> 1
    assert metrics.wasserstein_per_gene([[0, 0], [1, 0]], [[1, 0], [2, 2]]) == pytest.approx(1.0)


def test_differential_expression_is_scanpys_wilcoxon_and_matches_scipy():
    # scanpy computes it; scipy's Mann-Whitney U (asymptotic, no continuity correction) is the independent check.
    rng = np.random.default_rng(0)
    cells = np.log1p(rng.poisson(3.0, size=(30, 6)).astype(float))
    reference = np.log1p(rng.poisson(3.0, size=(25, 6)).astype(float))
    cells[:, 0] += 2.0  # one clearly higher gene
    de = metrics.differential_expression(cells, reference, list("abcdef"))
    expected = stats.mannwhitneyu(cells, reference, axis=0, use_continuity=False, method="asymptotic").pvalue
    np.testing.assert_allclose(de["p_value"], expected, rtol=1e-10)
    np.testing.assert_allclose(de["p_adjusted"], stats.false_discovery_control(expected), rtol=1e-10)
    assert de.loc[0, "score"] > 4 and de.loc[0, "gene"] == "a"
    lfc = np.log2((np.expm1(cells).mean(0) + 1) / (np.expm1(reference).mean(0) + 1))
    np.testing.assert_allclose(de["log2_fold_change"], lfc)
    assert metrics.top_de_genes(de, 1).tolist() == [0]
    constant = metrics.differential_expression(np.ones((3, 2)), np.ones((4, 2)))
    assert (constant["p_value"] == 1).all() and (constant["score"] == 0).all()
    with pytest.raises(ValueError, match="at least 2 cells"):
        metrics.differential_expression(cells[:1], reference)
    repeated = metrics.differential_expression(cells, reference, list("aabbcc"))  # names need not be unique
    np.testing.assert_allclose(repeated["p_value"], expected, rtol=1e-10)


def _de(lfc, p_adjusted):
    return pd.DataFrame({"gene": list("abcd"), "log2_fold_change": lfc, "p_adjusted": p_adjusted})


def test_de_agreement_by_hand():
    observed = _de([3.0, -2.0, 1.0, 5.0], [0.01, 0.01, 0.01, 0.5])  # significant a, b, c (by |lfc|)
    predicted = _de([1.0, -1.0, 2.0, 3.0], [0.01, 0.5, 0.01, 0.01])  # significant d, c, a
    assert metrics.overlap_at_k(observed, predicted) == pytest.approx(2 / 3)  # {a, b, c} vs {d, c, a}
    assert metrics.overlap_at_k(observed, predicted, k=2) == 0.0  # {a, b} vs {d, c}
    assert metrics.overlap_at_k(observed, predicted, k=10) == pytest.approx(2 / 3)  # k capped at 3
    assert metrics.direction_match(observed, predicted) == 1.0
    flipped = _de([1.0, 0.5, 2.0, 3.0], [0.01, 0.5, 0.01, 0.01])
    assert metrics.direction_match(observed, flipped) == pytest.approx(2 / 3)
    # ranks of [3, -2, 1] and [1, -1, 2]: [3, 1, 2] and [2, 1, 3], d = [1, 0, -1] -> 1 - 6 * 2 / 24
    assert metrics.spearman_lfc_sig(observed, predicted) == pytest.approx(0.5)
    nothing = _de([1.0, 1, 1, 1], [0.9, 0.9, 0.9, 0.9])
    assert math.isnan(metrics.overlap_at_k(nothing, predicted)) and math.isnan(
        metrics.direction_match(nothing, predicted)
    )


def test_discrimination_and_token_overlap_by_hand():
    predicted = np.array([[0.0, 0], [1, 1], [5, 5]])
    observed = np.array([[0.0, 0], [4, 4], [1, 1]])
    # l1 rows: [0, 8, 2] own 0 -> rank 0; [2, 6, 0] own 6 -> rank 2; [10, 2, 8] own 8 -> rank 1
    np.testing.assert_allclose(metrics.discrimination_score(predicted, observed, "l1"), [1.0, 1 / 3, 2 / 3])
    assert metrics.discrimination_score(observed, observed, "l2").tolist() == [1.0, 1.0, 1.0]
    generated, real = [[5, 6, 7], [8, 9]], [[6, 5, 10], [1, 2, 3]]
    assert metrics.token_topk_overlap(generated, real, 2) == pytest.approx(0.5)  # 2/2 and 0/2
    assert metrics.token_topk_overlap(generated, real, 3) == pytest.approx(1 / 3)  # 2/3 and 0/2
    with pytest.raises(ValueError, match="pair them"):
        metrics.token_topk_overlap(generated, real[:1], 2)


def test_every_metric_is_ranked_in_the_right_direction():
    # A prediction close to the observed cells must rank above "no change" (the source cells) on every metric the
    # evaluation reports, by the direction table; a wrong direction or a metric without an entry fails here.
    from perturbgen_hf.evaluation.scoring import ScoringContext as _Context
    from perturbgen_hf.evaluation.scoring import discrimination_rows as _discrimination
    from perturbgen_hf.evaluation.scoring import score_cells as _score
    from perturbgen_hf.settings import EvaluationSettings

    rng = np.random.default_rng(0)
    genes, cells = 60, 40
    reference = rng.gamma(2.0, 0.5, size=(cells, genes))
    shift = np.zeros(genes)
    shift[:20] = np.linspace(-1.5, 2.0, 20)
    observed = np.clip(reference + shift + rng.normal(0, 0.1, size=(cells, genes)), 0, None)
    close = np.clip(observed + rng.normal(0, 0.05, size=observed.shape), 0, None)
    symbols = [f"G{i}" for i in range(genes)]
    settings = EvaluationSettings(top_de=10, top_r2=30, overlap_k=15, token_k=5, n_pcs=10)
    context = _Context(observed, reference, metrics.differential_expression(observed, reference, symbols), settings)
    ranked = [list(np.argsort(-row)) for row in observed]
    tokens = {
        "close": ([list(np.argsort(-row)) for row in close], ranked),
        "no change": ([r[::-1] for r in ranked], ranked),
    }
    scores = {
        name: _score(values, context, symbols, tokens[name])
        for name, values in {"close": close, "no change": reference}.items()
    }
    # Discrimination needs two evaluated states: the second is the first with the shift reversed.
    deltas = {
        "observed": {("t", "a"): shift, ("t", "b"): -shift},
        "close": {("t", "a"): shift, ("t", "b"): -shift},
        "no change": {("t", "a"): np.zeros(genes), ("t", "b"): 0.5 * shift},
    }
    for name, _, group, method, value in _discrimination(deltas):
        if group == "b":
            scores[method][name] = value
    assert set(scores["close"]) >= {
        "pearson_delta_top10_de",
        "r2_means_top30_de",
        "overlap_at_15",
        "mmd_rbf",
        "token_top5_overlap",
        "discrimination_score_l1",
        "de_direction_match",
    }
    for name, good in scores["close"].items():
        bad = scores["no change"][name]
        if math.isnan(bad):  # e.g. a correlation with a constant prediction: nothing to rank
            continue
        better = good > bad if metrics.higher_is_better(name) else good < bad
        assert better, (name, good, bad)
    with pytest.raises(ValueError, match="no_such_metric"):
        metrics.higher_is_better("no_such_metric")
    with pytest.raises(ValueError, match="overlap_at_x"):
        metrics.higher_is_better("overlap_at_x")  # a depth is digits


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="different numbers of genes"):
        metrics.mse([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        metrics.mae([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least 2 cells"):
        metrics.e_distance([[1.0]], [[2.0], [3.0]])
    with pytest.raises(ValueError, match="Unknown metric"):
        metrics.discrimination_score(np.zeros((2, 2)), np.zeros((2, 2)), "l3")


# -- baselines on tiny examples -----------------------------------------------------------------------------------------


def test_simple_baselines():
    source = np.array([[1.0, 2.0], [3.0, 4.0]])
    carried = baselines.no_change(source)
    assert np.array_equal(carried, source) and carried is not source
    pooled = baselines.training_mean([np.array([[0.0, 0.0]]), np.array([[2.0, 4.0], [4.0, 8.0]])])
    np.testing.assert_allclose(pooled.mean(0), [2.0, 4.0])
    by_time = {1.0: np.zeros((1, 2)), 2.0: np.ones((1, 2)), 6.0: np.full((1, 2), 6.0)}
    assert baselines.nearest_time_point(by_time, 4.0)[0, 0] == 1.0  # 2h and 6h tie: the earlier one
    assert baselines.nearest_time_point(by_time, 5.0)[0, 0] == 6.0
    np.testing.assert_allclose(baselines.additive([1.0, 1.0], [[2.0, 1.0], [1.0, 3.0]]), [2.0, 3.0])


def test_linear_baseline_recovers_a_linear_trend():
    a, b = np.array([1.0, 5.0, 3.0]), np.array([0.5, -0.25, 1.0])
    # two cells per time point, symmetric around the mean a + b t
    noise = np.array([[0.1, -0.2, 0.05], [-0.1, 0.2, -0.05]])
    cells = [a + b * t + noise for t in (0.0, 1.0, 2.0)]
    features = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    predicted = baselines.linear_model(
        cells, features, cells[0], features[0], np.array([1.0, 3.0]), n_components=3, ridge=1e-9
    )
    np.testing.assert_allclose(predicted.mean(0), a + 3 * b, atol=1e-6)
    np.testing.assert_allclose(predicted - predicted.mean(0), noise, atol=1e-6)  # each source cell moves
    # with the reference's ridge (0.1) the fit is shrunk
    shrunk = baselines.linear_model(cells, features, cells[0], features[0], np.array([1.0, 3.0]), n_components=3)
    assert np.abs(shrunk.mean(0) - (a + 3 * b)).max() > 1e-4  # ridge 0.1 shrinks the fit
    with pytest.raises(ValueError, match="condition_features"):
        baselines.linear_model(cells, features[:2], cells[0], features[0], features[1])


def test_neighbour_interpolation_by_hand():
    before, after = np.zeros((10, 3)), np.ones((30, 3))
    assert baselines.neighbour_time_values([1.0, 2.0, 6.0], 4.0) == (2.0, 6.0)
    assert baselines.neighbour_time_values([1.0, 2.0, 6.0], 10.0) == (2.0, 6.0)  # beyond the last: the last two
    assert baselines.neighbour_time_values([2.0, 4.0, 6.0], 1.0) == (2.0, 4.0)
    with pytest.raises(ValueError, match="at least two"):
        baselines.neighbour_time_values([2.0], 4.0)
    # a quarter of the way from 2h to 6h: 25 cells (between 10 and 30), a quarter of them (6) from 6h
    mixed = baselines.neighbour_interpolation(before, after, 2.0, 6.0, 3.0, seed=0)
    assert mixed.shape == (15, 3) and (mixed[:, 0] == 1).sum() == 4  # round(0.25 * 15)
    np.testing.assert_allclose(mixed.mean(0), 4 / 15)
    exact = baselines.neighbour_interpolation(before, after, 2.0, 6.0, 4.0, num_cells=100, seed=0)
    np.testing.assert_allclose(exact.mean(0), 0.5)  # the pseudobulk is the linear interpolation of the means
    # beyond 6h: the 6h cells moved along the trend, clipped at 0
    later = baselines.neighbour_interpolation(before, after, 2.0, 6.0, 10.0)
    np.testing.assert_allclose(later, 2.0)
    falling = baselines.neighbour_interpolation(after, before, 2.0, 6.0, 14.0)
    np.testing.assert_allclose(falling, 0.0)  # 0 - 2, clipped


def test_transport_interpolation_moves_each_cell_to_its_partner():
    # Two clusters at 0h move apart by 6h, each to its own place: OT couples a cell with its own cluster's future,
    # so the midpoint keeps two clusters, where mixing the time points would give four.
    rng = np.random.default_rng(0)
    before = np.vstack([rng.normal([1, 1, 1, 1], 0.05, (20, 4)), rng.normal([8, 8, 1, 1], 0.05, (20, 4))])
    after = np.vstack([rng.normal([3, 1, 1, 1], 0.05, (20, 4)), rng.normal([8, 10, 1, 1], 0.05, (20, 4))])
    for exact_max_pairs in (4_000_000, 0):  # exact EMD, then Sinkhorn
        middle = baselines.transport_interpolation(
            before, after, 0.0, 6.0, 3.0, num_components=2, exact_max_pairs=exact_max_pairs, epsilon=0.01, seed=0
        )
        assert middle.shape == (40, 4)
        distance = np.minimum(np.abs(middle - [2, 1, 1, 1]).max(1), np.abs(middle - [8, 9, 1, 1]).max(1))
        assert (distance < 0.5).all(), exact_max_pairs
        np.testing.assert_allclose(middle.mean(0), (before.mean(0) + after.mean(0)) / 2, atol=0.5)
    same = baselines.transport_interpolation(before, after, 0.0, 6.0, 3.0, num_components=2, seed=0)
    np.testing.assert_array_equal(
        same, baselines.transport_interpolation(before, after, 0.0, 6.0, 3.0, num_components=2, seed=0)
    )
    start = baselines.transport_interpolation(before, after, 0.0, 6.0, 0.0, num_components=2)
    assert {tuple(np.round(row, 6)) for row in start} <= {tuple(np.round(row, 6)) for row in before}


# -- the evaluate command, end to end on real data ------------------------------------------------------------------------


TINY = [
    "--preset",
    "tiny",
    "--max-steps",
    "6",
    "--iterations",
    "2",
    "--n-hvg",
    "120",
    "--max-source-length",
    "96",
    "--max-target-length",
    "48",
    "--no-progress",
]


@pytest.fixture(scope="module")
def heldout_time_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate") / "shalek_4h"
    code = main(
        [
            "evaluate",
            str(SHALEK),
            "--out",
            str(out),
            "--protocol",
            "heldout-time",
            "--heldout",
            "4h",
            "--time-key",
            "time",
            "--source",
            "1h",
            *TINY,
        ]
    )
    assert code == 0
    return out


def test_evaluate_heldout_time_on_shalek(heldout_time_run):
    out = heldout_time_run
    table = pd.read_csv(out / "metrics.csv")
    assert list(table.columns) == ["metric", "time_point", "group", "method", "value"]
    assert set(table["method"]) == {
        "PerturbGen (this model)",
        "no change",
        "training mean",
        "nearest time point",
        "neighbour interpolation",
        "OT interpolation",
        "linear (PCA + ridge)",
    }
    assert set(table["time_point"]) == {"4h"}
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["cells"]["observed"] == {"4h / all": 162} and summary["cells"]["source"] == {"all": 82}
    assert summary["cells"]["train"] == 82 + 72 + 74  # every cell but the 4h ones
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["time_points"] == ["2h", "6h"]  # the model never saw 4h
    assert all((out / "plots" / name).is_file() for name in ("metrics_4h_all.png", "means_4h_all.png"))

    # the baselines' scores recomputed independently from the data: the nearest time point of 4h is 2h (a tie with
    # 6h goes to the earlier one), scored on the model's target genes as log1p CP10k of those genes' counts
    from perturbgen_hf.tokenization import PerturbGenTokenizer

    adata = ad.read_h5ad(SHALEK)
    tokenizer = PerturbGenTokenizer.from_pretrained(out / "model")
    counts = tokenizer.target_counts(adata.X, list(adata.var_names)).toarray()
    expression = metrics.log_normalize(counts)
    times = adata.obs["time"].astype(str).to_numpy()
    x4, x2, x1 = (expression[times == t].mean(0) for t in ("4h", "2h", "1h"))
    value = table.set_index(["metric", "method"])["value"]
    assert value[("mse", "nearest time point")] == pytest.approx(np.mean((x2 - x4) ** 2))
    assert value[("pearson_delta", "nearest time point")] == pytest.approx(stats.pearsonr(x2 - x1, x4 - x1)[0])
    assert value[("mae", "no change")] == pytest.approx(np.mean(np.abs(x1 - x4)))
    assert math.isnan(value[("pearson_delta", "no change")])
    pooled = expression[np.isin(times, ["2h", "6h"])].mean(0)
    assert value[("mse", "training mean")] == pytest.approx(np.mean((pooled - x4) ** 2))
    model_rows = table[table["method"] == "PerturbGen (this model)"].set_index("metric")["value"]
    assert model_rows[["mse", "mae", "e_distance_squared", "mmd_rbf", "token_top25_overlap"]].notna().all()


def test_evaluate_reuses_a_model_and_a_tokenized_folder(heldout_time_run, tmp_path):
    model = heldout_time_run / "model"
    code = main(
        [
            "evaluate",
            "--data",
            str(heldout_time_run / "tokens"),
            "--out",
            str(tmp_path / "no"),
            "--protocol",
            "heldout-time",
            "--heldout",
            "4h",
            "--model",
            str(model),
            *TINY,
        ]
    )
    assert code == 1  # that folder was tokenized from an in-memory AnnData: it records no h5ad
    tokens = tmp_path / "tokens"
    assert (
        main(
            [
                "tokenize",
                str(SHALEK),
                "--out",
                str(tokens),
                "--time-key",
                "time",
                "--source",
                "1h",
                "--n-hvg",
                "50",
                "--no-progress",
            ]
        )
        == 0
    )
    out = tmp_path / "again"
    code = main(
        [
            "evaluate",
            "--data",
            str(tokens),
            "--out",
            str(out),
            "--protocol",
            "heldout-time",
            "--heldout",
            "4h",
            "--model",
            str(model),
            *TINY,
        ]
    )
    assert code == 0 and not (out / "model").exists()  # the h5ad, time key and source come from the folder
    first = pd.read_csv(heldout_time_run / "metrics.csv")
    again = pd.read_csv(out / "metrics.csv")
    pd.testing.assert_frame_equal(first, again)  # same model, same seed: the same scores


def test_model_counts_change_only_the_model_rows(heldout_time_run, tmp_path):
    from perturbgen_hf.commands.evaluate_workflow import run_evaluation
    from perturbgen_hf.settings import EvaluationSettings

    assert EvaluationSettings().model_counts == "poisson"
    tables = {}
    for mode in ("poisson", "sample", "mean"):
        code = main(
            [
                "evaluate",
                str(SHALEK),
                "--out",
                str(tmp_path / mode),
                "--protocol",
                "heldout-time",
                "--heldout",
                "4h",
                "--time-key",
                "time",
                "--source",
                "1h",
                "--model",
                str(heldout_time_run / "model"),
                "--model-counts",
                mode,
                *TINY,
            ]
        )
        assert code == 0
        tables[mode] = pd.read_csv(tmp_path / mode / "metrics.csv").set_index(["metric", "method"])["value"]
    pd.testing.assert_series_equal(
        tables["poisson"], pd.read_csv(heldout_time_run / "metrics.csv").set_index(["metric", "method"])["value"]
    )  # the default
    model, baseline = "PerturbGen (this model)", "training mean"
    for mode in ("sample", "mean"):
        assert tables[mode][("mse", model)] != tables["poisson"][("mse", model)]
        assert tables[mode][("mse", baseline)] == tables["poisson"][("mse", baseline)]
    with pytest.raises(ValueError, match=r"Unknown model_counts 'draws'"):
        run_evaluation(
            SHALEK,
            tmp_path / "bad",
            "heldout-time",
            "time",
            "1h",
            heldout="4h",
            model=heldout_time_run / "model",
            settings=EvaluationSettings(model_counts="draws"),
        )


def test_evaluate_refuses_a_model_that_saw_the_heldout_time_point(heldout_time_run, tmp_path, capsys):
    code = main(
        [
            "evaluate",
            str(SHALEK),
            "--out",
            str(tmp_path / "x"),
            "--protocol",
            "heldout-time",
            "--heldout",
            "2h",
            "--time-key",
            "time",
            "--source",
            "1h",
            "--model",
            str(heldout_time_run / "model"),
            *TINY,
        ]
    )
    assert code == 1 and "trained on the held-out time point '2h'" in capsys.readouterr().err
    code = main(
        [
            "evaluate",
            str(SHALEK),
            "--out",
            str(tmp_path / "y"),
            "--protocol",
            "heldout-time",
            "--heldout",
            "1h",
            "--time-key",
            "time",
            "--source",
            "1h",
            *TINY,
        ]
    )
    assert code == 1 and "after the source" in capsys.readouterr().err
    code = main(
        [
            "evaluate",
            str(SHALEK),
            "--out",
            str(tmp_path / "z"),
            "--protocol",
            "heldout-group",
            "--heldout",
            "x",
            "--time-key",
            "time",
            "--source",
            "1h",
            *TINY,
        ]
    )
    assert code == 1 and "--group-key" in capsys.readouterr().err


@pytest.mark.parametrize("pairing", ["stratified", "transport"])
def test_evaluate_heldout_group_on_kang(tmp_path, pairing):
    out = tmp_path / "kang"
    code = main(
        [
            "evaluate",
            str(KANG),
            "--out",
            str(out),
            "--protocol",
            "heldout-group",
            "--group-key",
            "cell_type",
            "--heldout",
            "CD14+ Monocytes",
            "--time-key",
            "condition",
            "--time-order",
            "ctrl",
            "stim",
            "--source",
            "ctrl",
            "--pairing",
            pairing,
            *TINY,
        ]
    )
    assert code == 0
    recorded = json.loads((out / "tokens" / "perturbgen_data.json").read_text())["pairing"]
    assert recorded["mode"] == pairing and recorded["key"] == "cell_type"
    assert ("transport" in recorded) == (pairing == "transport")
    table = pd.read_csv(out / "metrics.csv")
    assert set(table["group"]) == {"CD14+ Monocytes"} and set(table["time_point"]) == {"stim"}
    assert "nearest time point" not in set(table["method"])  # only for a held-out time point
    summary = json.loads((out / "metrics.json").read_text())
    adata = ad.read_h5ad(KANG)
    mono = (adata.obs["cell_type"] == "CD14+ Monocytes").to_numpy()
    assert summary["cells"]["train"] == int((~mono).sum())
    assert summary["cells"]["source"] == {"CD14+ Monocytes": int((mono & (adata.obs["condition"] == "ctrl")).sum())}
    value = table.set_index(["metric", "method"])["value"]
    # the stimulation response of monocytes is strong: its observed DE genes are found, and the linear model (the
    # ctrl -> stim shift learned on the other cell types) gets the direction of most of them right
    assert value[("de_direction_match", "linear (PCA + ridge)")] > 0.7


def test_evaluate_heldout_cells_scores_discrimination(tmp_path):
    from perturbgen_hf.data import simulate_trajectory

    adata = simulate_trajectory(num_clones=30, cells_per_clone=2, seed=1)
    out = tmp_path / "cells"
    code = main(
        [
            "evaluate",
            _write(adata, tmp_path),
            "--out",
            str(out),
            "--protocol",
            "heldout-cells",
            "--time-key",
            "time",
            "--source",
            "0h",
            "--heldout-fraction",
            "0.25",
            *TINY,
        ]
    )
    assert code == 0
    table = pd.read_csv(out / "metrics.csv")
    assert set(table["time_point"]) == {"2h", "6h", "12h"}
    discrimination = table[table["metric"] == "discrimination_score_l1"]
    assert len(discrimination) == 3 * 4  # per time point, for the model and three baselines
    assert discrimination["value"].between(1 / 3, 1).all()


def _write(adata, folder):
    path = folder / "data.h5ad"
    adata.write_h5ad(path)
    return str(path)
