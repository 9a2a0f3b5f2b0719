import json

import numpy as np
import pandas as pd
import pytest

from perturbgen_hf.commands.demo_workflow import run_demo
from perturbgen_hf.data import simulate_trajectory, true_effects
from perturbgen_hf.evaluation.effects import effect_scores, significance_calls
from perturbgen_hf.settings import FAST


@pytest.fixture(scope="module")
def simulated():
    control = simulate_trajectory(num_clones=150, seed=3)
    knocked = simulate_trajectory(num_clones=150, seed=3, knockout=["REG1"])
    return control, knocked, true_effects(control, knocked)


def test_counts_look_like_single_cell_data(simulated):
    control, _, _ = simulated
    counts = control.X.toarray()
    assert np.array_equal(counts, np.round(counts)) and counts.min() >= 0
    assert 0.3 < (counts == 0).mean() < 0.95  # sparse
    totals = counts.sum(1)
    assert totals.std() / totals.mean() > 0.2  # varying library sizes
    assert list(control.obs["time"].cat.categories) == ["0h", "2h", "6h", "12h"]
    assert control.obs["time_value"].is_monotonic_increasing
    assert set(control.obs["cell_type"]) == {"type_1", "type_2"}
    assert control.var_names[0].startswith("ENSSIMG") and control.var["gene_symbol"].iloc[0] == "REG1"
    edges = pd.DataFrame(control.uns["network"]["edges"])
    assert {"regulator", "target", "weight", "delay", "cell_type"} <= set(edges.columns)


def test_the_knockout_cascade_grows_along_the_trajectory(simulated):
    control, knocked, truth = simulated
    edges = pd.DataFrame(control.uns["network"]["edges"])
    direct = list(edges[edges["regulator"] == "REG1"]["target"])
    second = list(edges[edges["regulator"].isin(direct)]["target"])
    effect = truth.assign(size=truth["log2_fold_change"].abs()).pivot_table(
        index="gene_symbol", columns="time_point", values="size"
    )
    # the source state: only the regulator itself has changed
    assert effect.loc["REG1", "0h"] > 2 and effect.loc[direct + second, "0h"].max() < 0.15
    # direct targets respond one step later, second-tier targets one more step later
    assert effect.loc[direct, "2h"].mean() > 0.8 and effect.loc[second, "2h"].mean() < 0.15
    assert effect.loc[second, "6h"].mean() > 0.4
    # genes outside the network are (nearly) unaffected: only the small compositional shift
    unaffected = control.var.loc[control.var["role"] == "unaffected", "gene_symbol"]
    assert effect.loc[unaffected, "12h"].median() < 0.1
    # a regulator's other targets do not move
    reg2 = list(edges[edges["regulator"] == "REG2"]["target"])
    assert effect.loc[reg2, "6h"].mean() < 0.15
    # the knocked-out regulator has no counts, and the clone structure (source cells) is the same cells
    reg1 = knocked[:, knocked.var["gene_symbol"] == "REG1"].X
    assert reg1.sum() == 0 and np.array_equal(control.obs_names, knocked.obs_names)


def test_cell_type_specific_responses():
    control = simulate_trajectory(num_clones=200, seed=5, cell_type_specific_fraction=1.0, targets_per_regulator=4)
    knocked = simulate_trajectory(
        num_clones=200, seed=5, cell_type_specific_fraction=1.0, targets_per_regulator=4, knockout=["REG1"]
    )
    edges = pd.DataFrame(control.uns["network"]["edges"])
    edge = edges[(edges["regulator"] == "REG1")].iloc[0]
    responding = f"type_{edge['cell_type'] + 1}"
    other = next(t for t in ("type_1", "type_2") if t != responding)
    sizes = {}
    for cell_type in (responding, other):
        rows = (control.obs["cell_type"] == cell_type).to_numpy()
        effect = true_effects(control[rows], knocked[rows])
        at = effect[(effect["time_point"] == "2h") & (effect["gene_symbol"] == edge["target"])]
        sizes[cell_type] = abs(float(at["log2_fold_change"].iloc[0]))
    assert sizes[responding] > 0.4 and sizes[other] < 0.1


def test_deterministic_and_checked():
    a, b = simulate_trajectory(num_clones=20, seed=1), simulate_trajectory(num_clones=20, seed=1)
    assert (a.X != b.X).nnz == 0
    c = simulate_trajectory(num_clones=20, seed=2)
    assert (a.X != c.X).nnz > 0
    over = simulate_trajectory(num_clones=20, seed=1, overexpress=["REG2"])
    column = list(a.var["gene_symbol"]).index("REG2")
    assert over.X[:, column].sum() > a.X[:, column].sum()
    with pytest.raises(ValueError, match="'T1_1' is not one of"):
        simulate_trajectory(num_clones=5, knockout=["T1_1"])
    with pytest.raises(ValueError, match="increasing"):
        simulate_trajectory(num_clones=5, time_values=[2.0, 1.0])


def test_effect_scores_by_hand():
    truth = np.array([2.0, -1.0, 0.0, 0.05, 0.3])
    predicted = np.array([1.0, 0.5, 0.2, 0.0, 0.1])
    scores = effect_scores(predicted, truth, responder_threshold=0.5, unaffected_threshold=0.1)
    # responders 2.0 (predicted +1.0, right sign) and -1.0 (predicted +0.5, wrong sign); unaffected 0.0 and 0.05
    assert scores["sign_agreement"] == 0.5
    # |predicted| of responders (1.0, 0.5) vs unaffected (0.2, 0.0): all four comparisons won
    assert scores["auroc"] == 1.0
    np.testing.assert_allclose(scores["pearson"], np.corrcoef(predicted, truth)[0, 1])
    flat = effect_scores(np.zeros(5), truth)
    assert flat["auroc"] == 0.5 and np.isnan(flat["pearson"]) and flat["sign_agreement"] == 0.0


def test_significance_calls_by_hand():
    truth = np.array([2.0, -1.0, 0.0, 0.05, 0.3, 0.7])
    called = np.array([True, False, True, False, True, True])
    calls = significance_calls(called, truth, responder_threshold=0.5, unaffected_threshold=0.1)
    # responders: 2.0, -1.0, 0.7; called: 2.0, 0.0, 0.3, 0.7
    assert (calls["called"], calls["responders"], calls["true_calls"]) == (4, 3, 2)
    assert calls["precision"] == 0.5 and calls["recall"] == 2 / 3
    # 0.3 is a true (sub-responder) effect; 0.0 is a false discovery
    assert calls["affected_calls"] == 3 and calls["precision_any_effect"] == 0.75
    none = significance_calls(np.zeros(6, dtype=bool), truth)
    assert none["called"] == 0 and np.isnan(none["precision"]) and np.isnan(none["precision_any_effect"])


def test_fast_demo_end_to_end(tmp_path):
    from transformers import AutoModel

    import perturbgen_hf  # noqa: F401

    out = tmp_path / "demo"
    summary = run_demo(out, FAST, progress=False)
    for name in (
        "report.md",
        "scores.csv",
        "summary.json",
        "plots/predicted_vs_true.png",
        "plots/cascade.png",
        "plots/training_loss.png",
        "perturbation/de.csv",
    ):
        assert (out / name).is_file(), name
    scores = pd.read_csv(out / "scores.csv")
    assert set(scores["time_point"]) == {"2h", "6h", "12h"}
    assert {"PerturbGen (this model)", "linear model (ridge)", "no change", "random ranking"} == set(scores["method"])
    model_rows = scores[scores["method"] != "no change"]
    assert np.isfinite(model_rows[["auroc", "sign_agreement"]].to_numpy()).all()
    assert json.loads((out / "summary.json").read_text())["regulator"] == "REG1"
    assert "AUROC" in (out / "report.md").read_text() or "auroc" in (out / "report.md").read_text()
    # The pipeline's significance calls (against FAST's 3 shams) are scored against the truth at every time point.
    calls = summary["significance_calls"]
    assert set(calls) == {"2h", "6h", "12h"}
    de = pd.read_csv(out / "perturbation" / "de.csv")
    for time_point, call in calls.items():
        assert call["called"] == de[(de["time_point"] == time_point) & (de["group"] == "all")]["significant"].sum()
        assert call["true_calls"] <= min(call["called"], call["responders"]) and call["responders"] > 0
    assert "Significance calls" in (out / "report.md").read_text()
    assert AutoModel.from_pretrained(out / "model").config.model_type == "perturbgen"
    assert summary["seconds"] > 0
    with pytest.raises(FileExistsError, match="overwrite"):
        run_demo(out, FAST, progress=False)


def test_fast_demo_on_user_data(tmp_path):
    adata = simulate_trajectory(num_clones=40, seed=1)
    adata.var_names = adata.var["gene_symbol"].astype(str).to_numpy()
    path = tmp_path / "mine.h5ad"
    adata.write_h5ad(path)
    summary = run_demo(
        tmp_path / "out", FAST, adata=str(path), time_key="time", source="0h", gene="REG1", progress=False
    )
    report = (tmp_path / "out" / "report.md").read_text()
    assert "REG1 knocked out at 0h" in report and "no truth to score" in report
    assert (tmp_path / "out" / "plots" / "training_loss.png").is_file()
    assert summary["cells_perturbed"] == 80
    with pytest.raises(ValueError, match="--time-key, --source and --gene"):
        run_demo(tmp_path / "other", FAST, adata=str(path), progress=False)


def test_demo_refuses_a_gene_the_model_would_not_read_before_training(tmp_path, shared_data, monkeypatch):
    # IL1B has counts in 75 of the 82 Shalek 1h cells but ranks far below the --fast source length.
    def train_on_cpu(*args, **kwargs):
        raise AssertionError("the demo trained before checking the gene")

    monkeypatch.setattr("perturbgen_hf.commands.demo_workflow.train_on_cpu", train_on_cpu)
    path = shared_data / "expression" / "shalek2014_bmdc_lps_timecourse.h5ad"
    with pytest.raises(
        ValueError, match=r"IL1B is not among the top \d+ genes of any of the 82 source cells"
    ) as error:
        run_demo(tmp_path / "out", FAST, adata=str(path), time_key="time", source="1h", gene="IL1B", progress=False)
    assert "run without --fast" in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing is left behind


def test_demo_steps_write_one_line_a_step_when_stderr_is_not_a_terminal(capsys):
    from perturbgen_hf.commands.demo_workflow import _Steps

    with _Steps(["simulating: ", "tokenizing: ", "training: "], enabled=True) as steps:
        steps.next()
        steps.next()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["[1/3] simulating", "[2/3] tokenizing", "[3/3] training"]
