import anndata as ad
import numpy as np
import pytest
from conftest import SHARED_DATA, train_tiny_shalek
from scipy import stats
from transformers import pipeline

import perturbgen_hf  # noqa: F401  (registers the "perturbation" task)
from perturbgen_hf.pipelines import (
    PerturbationPipeline,
    PerturbationResult,
    paired_differential_expression,
    perturb_tokens,
)
from perturbgen_hf.pipelines.perturbation_edits import expression_profile, matched_null_genes
from perturbgen_hf.pipelines.perturbation_result import (
    bootstrap_interval,
    differential_expression_against_null,
    null_p_values,
)


CELL = np.array([2, 10, 11, 12, 13, 3])


@pytest.mark.parametrize(
    ("mode", "genes", "expected", "changed"),
    [
        ("mask", [11], [2, 10, 1, 12, 13, 3], True),
        ("pad", [11, 13], [2, 10, 0, 12, 0, 3], True),
        ("delete", [11], [2, 10, 12, 13, 3], True),
        ("mask", [99], [2, 10, 11, 12, 13, 3], False),  # not expressed: unchanged
        ("overexpress", [12], [2, 12, 10, 11, 13, 3], True),  # moved to the top rank
        ("overexpress", [99], [2, 99, 10, 11, 12, 13, 3], True),  # inserted
        ("overexpress", [10], [2, 10, 11, 12, 13, 3], False),  # already first
    ],
)
def test_token_edits(mode, genes, expected, changed):
    new, did_change = perturb_tokens(CELL, genes, mode)
    assert new.tolist() == expected
    assert did_change is changed


def test_overexpression_keeps_the_length_limit():
    new, _ = perturb_tokens(CELL, [99], "overexpress", max_length=6)
    assert new.tolist() == [2, 99, 10, 11, 12, 3]  # the lowest-ranked gene drops out
    with pytest.raises(ValueError, match="'silence'"):
        perturb_tokens(CELL, [10], "silence")


def test_paired_statistics():
    rng = np.random.default_rng(0)
    control = rng.poisson(20, size=(30, 4)).astype(float)
    perturbed = control.copy()
    perturbed[:, 0] *= 3  # a strong change in gene 0
    table = paired_differential_expression(control, perturbed, ["a", "b", "c", "d"])
    assert table.loc[0, "log2_fold_change"] > 0.5
    assert table.loc[0, "wilcoxon_p"] < 1e-4 and table.loc[0, "wilcoxon_p_adjusted"] < 1e-3
    # the other genes fall (proportions shift) but gene-for-gene identical rows would give p = 1
    same = paired_differential_expression(control, control, ["a", "b", "c", "d"])
    assert (same["wilcoxon_p"] == 1).all() and (same["log2_fold_change"] == 0).all()


def test_null_p_values_are_calibrated_and_find_real_effects():
    # 400 genes with very different noise levels; 10 shams; the perturbation moves genes 0-9 by 8 of their own sds.
    rng = np.random.default_rng(0)
    sd = np.exp(rng.uniform(-8, 0, size=400))
    null = rng.normal(0, sd, size=(10, 400))
    effect = rng.normal(0, sd)
    effect[:10] += 8 * sd[:10]
    result = null_p_values(effect, null)
    calls = stats.false_discovery_control(result["p_value"]) < 0.05
    assert calls[:10].sum() >= 8 and calls[10:].sum() <= 1  # the FDR bounds the share of false calls
    # Pure noise (an effect drawn like the shams): p-values about uniform, at most 5% below 0.05 in expectation.
    rates = [
        np.mean(null_p_values(rng.normal(0, sd), rng.normal(0, sd, size=(10, 400)))["p_value"] < 0.05)
        for _ in range(20)
    ]
    assert np.mean(rates) <= 0.06
    np.testing.assert_allclose(result["null_sd"], null.std(0, ddof=1))
    with pytest.raises(ValueError, match="at least 3"):
        null_p_values(effect, null[:2])


def test_effect_floor_and_interval():
    rng = np.random.default_rng(1)
    control = rng.poisson(50, size=(40, 3)).astype(float)
    genes = ["a", "b", "c"]
    shams = [control * rng.normal(1, 1e-4, size=control.shape) for _ in range(10)]
    tiny = control * np.array([1.02, 1.0, 1.0])  # consistent but tiny (log2 FC ~0.02): never significant
    table = differential_expression_against_null(control, tiny, shams, genes)
    assert table.loc[0, "p_adjusted"] < 0.05 and not table["significant"].any()  # below the effect floor
    large = control * np.array([4.0, 1.0, 1.0])
    table = differential_expression_against_null(control, large, shams, genes)
    assert table["significant"].all()  # gene a up, b and c down by composition (log2 FC about -0.8)
    assert (table["ci_low"] <= table["log2_fold_change"]).all() and (
        table["log2_fold_change"] <= table["ci_high"]
    ).all()
    perturbed = large
    low, high = bootstrap_interval(control, perturbed, 50, seed=0)
    np.testing.assert_array_equal(low, bootstrap_interval(control, perturbed, 50, seed=0)[0])  # seeded
    assert (low <= high).all()
    without = differential_expression_against_null(control, perturbed, [], genes)
    assert without["p_value"].isna().all() and not without["significant"].any()


def test_sham_genes_are_matched_to_the_perturbed_gene():
    rng = np.random.default_rng(0)
    # Gene 10 is in every cell at rank ~1; genes 20-79 at varied frequencies and ranks.
    cells = []
    for _ in range(50):
        others = rng.choice(np.arange(20, 80), size=30, replace=False)
        cells.append(np.array([2, 10, *others, 3]))
    profile = expression_profile(cells, 100)
    assert profile[0][10] == 50 and profile[1][10] == 1.0
    shams = matched_null_genes([10, 25], profile, 12, np.random.default_rng(0), pool_size=12)
    assert len(shams) == 12 and all(len(s) == 2 for s in shams)
    assert all(10 not in s and 25 not in s for s in shams)
    pool = np.array([g for g in range(20, 80) if g != 25])
    distance = np.abs(np.log(profile[1][pool] / 1.0)) + np.abs(np.log(profile[0][pool] / 50))
    assert {s[0] for s in shams} <= set(pool[np.argsort(distance, kind="stable")[:12]].tolist())


@pytest.fixture(scope="module")
def lps_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pert")
    return train_tiny_shalek(folder, 256, 32, gene_id_key="human_ensembl_id", include_genes=["TNF", "EGR1"])


@pytest.fixture(scope="module")
def source_cells():
    adata = ad.read_h5ad(SHARED_DATA / "expression" / "shalek2014_bmdc_lps_timecourse.h5ad")
    return adata[adata.obs["time"] == "1h"].copy()


@pytest.fixture(scope="module")
def pipe(lps_model):
    # 3 shams keep the suite fast; the default (10) is exercised by test_knockout_on_real_data.
    return pipeline(
        "perturbation",
        model=str(lps_model),
        gene_ids="human_ensembl_id",
        iterations=4,
        batch_size=50,
        null_perturbations=3,
    )


def test_knockout_on_real_data(pipe, source_cells, tmp_path):
    assert isinstance(pipe, PerturbationPipeline)
    result = pipe(source_cells, genes=["TNF"], mode="mask", seed=0, null_perturbations=10)
    adata = result.adata
    assert adata.shape == (82 * 3, pipe.model.config.num_target_genes)
    assert list(adata.var_names) == pipe.model.config.target_genes
    assert set(adata.obs["time_point"]) == {"2h", "4h", "6h"}
    assert {"control", "perturbed"} <= set(adata.layers)
    changed = adata.obs["changed"].to_numpy()
    difference = np.abs(adata.layers["control"] - adata.layers["perturbed"]).sum(1)
    assert (difference[changed] > 0).all()
    assert (difference[~changed] == 0).all()  # cells without TNF are unaffected, and counted
    unaffected = result.summary["cells_unaffected"]["TNF"]
    assert unaffected == int((~changed).sum()) // 3 and 0 < unaffected < 82
    assert set(result.de["time_point"]) == {"2h", "4h", "6h"}
    assert np.isfinite(result.de["log2_fold_change"]).all()
    # Judged against 10 sham knockouts of genes expressed like TNF: a 6-step model finds nothing (where the paired
    # tests of two deterministic predictions called thousands of genes significant); the table is sorted by p.
    de = result.de
    shams = result.summary["null_genes"]["TNF"]
    assert len(shams) == 10 and all("TNF" not in genes for genes in shams)
    assert de["p_value"].between(0, 1).all() and (de["null_sd"] >= 0).all()
    assert de["significant"].sum() == 0 and result.summary["significant"]["TNF"] == {"2h": 0, "4h": 0, "6h": 0}
    first = de[(de["time_point"] == "2h") & (de["group"] == "all")]
    assert first["p_value"].is_monotonic_increasing
    # reproducible under the seed; the Ensembl ID names the same gene
    again = pipe(source_cells, genes=["ENSG00000232810"], mode="mask", seed=0)
    assert np.array_equal(again.adata.layers["perturbed"], adata.layers["perturbed"])
    # saving round-trips and never overwrites silently
    saved = result.save(tmp_path / "ko")
    loaded = PerturbationResult.load(saved)
    assert np.array_equal(loaded.adata.layers["perturbed"], adata.layers["perturbed"])
    assert loaded.config["genes_to_perturb"] == ["TNF"]
    assert len(loaded.de) == len(result.de)
    with pytest.raises(FileExistsError, match="overwrite"):
        result.save(tmp_path / "ko")


def test_a_seed_against_other_seeds_calls_nothing(pipe, source_cells):
    # Calibration on real data: the "effect" of changing only the random draws, judged against 10 more seeds, is
    # exchangeable with its null: about 5% of p-values below 0.05 and nothing significant.
    runs = [
        pipe(source_cells[:40], genes=["TNF"], seed=seed, null_perturbations=0, time_points=["6h"]).adata
        for seed in range(12)
    ]
    control = [r.layers["control"][(r.obs["time_point"] == "6h").to_numpy()] for r in runs]
    genes = [f"g{i}" for i in range(control[0].shape[1])]
    table = differential_expression_against_null(control[0], control[1], control[2:], genes)
    assert (table["p_value"] < 0.05).mean() <= 0.1
    assert (table["p_adjusted"] < 0.05).mean() <= 0.05 and not table["significant"].any()


def test_screen_shares_the_control(pipe, source_cells):
    result = pipe(source_cells[:30], screen=["TNF", "EGR1"], mode="delete", seed=1)
    obs = result.adata.obs
    tnf = result.adata.layers["control"][(obs["perturbation"] == "TNF").to_numpy()]
    egr1 = result.adata.layers["control"][(obs["perturbation"] == "EGR1").to_numpy()]
    assert np.array_equal(tnf, egr1)
    assert set(result.de["perturbation"]) == {"TNF", "EGR1"}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"genes": []}, ValueError, "empty"),
        ({}, ValueError, "Name the genes"),
        ({"genes": ["TNFF"]}, KeyError, "did you mean TNF"),
        ({"genes": ["TNF"], "mode": "silence"}, ValueError, "'silence'"),
        ({"genes": ["TNF"], "site": "tgt"}, ValueError, "needs perturb_time_points"),
        ({"genes": ["TNF"], "perturb_time_points": ["2h"]}, ValueError, "site='tgt' only"),
        ({"genes": ["TNF"], "site": "cytoplasm"}, ValueError, "'cytoplasm'"),
        ({"genes": ["TNF"], "method": "teacher_forced"}, ValueError, "needs `targets`"),
        ({"genes": ["TNF"], "targets": {"2h": None}}, ValueError, "teacher_forced"),
        ({"genes": ["TNF"], "mode": "overexpress", "num_samples": 0}, ValueError, "num_samples"),
        ({"genes": ["TNF"], "screen": ["EGR1"]}, ValueError, "not both"),
        ({"genes": ["TNF"], "colour": "red"}, TypeError, "colour"),
        ({"genes": ["TNF"], "fdr": 5}, ValueError, "between 0 and 1.*got 5"),
        ({"genes": ["TNF"], "fdr": 0}, ValueError, "fdr must be"),
        ({"genes": ["TNF"], "min_abs_log2fc": -0.1}, ValueError, "min_abs_log2fc must be.*-0.1"),
        ({"genes": ["TNF"], "min_abs_log2fc": float("nan")}, ValueError, "min_abs_log2fc must be"),
        ({"genes": ["TNF"], "bootstrap": 2.5}, ValueError, "bootstrap must be.*2.5"),
    ],
)
def test_bad_requests(pipe, source_cells, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe(source_cells[:5], **kwargs)


def test_a_gene_no_cell_expresses_is_an_error(pipe, source_cells):
    # A vocabulary gene (fitted on all time points) with no count in any 1h cell.
    ids = source_cells.var["human_ensembl_id"].astype(str).to_numpy()
    silent = np.asarray(source_cells.X.sum(0)).ravel() == 0
    absent = next(g for g in ids[silent] if g in pipe.tokenizer.vocab and not (ids[~silent] == g).any())
    with pytest.raises(ValueError, match="no source cell expresses it"):
        pipe(source_cells, genes=[absent], mode="mask")
    screen = pipe(source_cells, screen=["TNF", absent], mode="mask", iterations=2)
    assert screen.summary["perturbations"] == ["TNF"]  # a screen reports the silent gene instead of failing
    assert absent in screen.summary["perturbations_skipped"]
    with pytest.raises(ValueError, match="No gene of the screen"):
        pipe(source_cells, screen=[absent], mode="mask")
    result = pipe(source_cells[:10], genes=[absent], mode="overexpress")  # overexpression applies to every cell
    assert result.summary["cells_unaffected"][absent] == 0


def test_a_gene_expressed_but_ranked_beyond_what_the_model_reads_says_so(pipe, source_cells):
    # IL1B: counts in 75 of the 82 1h cells, at rank 445 or beyond: never among the 256 genes this model reads.
    column = list(source_cells.var_names).index("IL1B")
    assert (np.asarray(source_cells.X[:, column].todense()).ravel() > 0).mean() > 0.8
    with pytest.raises(ValueError, match=r"(?s)IL1B.* cells have counts for it, but it ranks below the top 256 genes"):
        pipe(source_cells, genes=["IL1B"], mode="delete")


def test_perturb_command_with_an_original_style_config(lps_model, source_cells, tmp_path, capsys):
    from perturbgen_hf.cli import main

    source = tmp_path / "source.h5ad"
    source_cells[:24].write_h5ad(source)
    config = tmp_path / "perturbation.yaml"
    config.write_text("genes_to_perturb: [TNF]\nperturbation_mode: delete\npred_tps: ['2h', '6h']\niterations: 3\n")
    out = tmp_path / "ko"
    argv = [
        "perturb",
        "--model",
        str(lps_model),
        "--adata",
        str(source),
        "--out",
        str(out),
        "--config",
        str(config),
        "--gene-id-key",
        "human_ensembl_id",
        "--seed",
        "3",
    ]
    assert main(argv) == 0
    assert "perturbed TNF in 24 cells" in capsys.readouterr().out
    result = PerturbationResult.load(out)
    assert set(result.adata.obs["time_point"]) == {"2h", "6h"}
    assert result.config["mode"] == "delete"
    assert {p.name for p in (out / "plots").iterdir()} == {
        "volcano_TNF.png",
        "responders_TNF.png",
        "significant_genes.png",
    }
    assert main(argv) == 1  # an existing result is not overwritten
    assert "--overwrite" in capsys.readouterr().err
    config.write_text("genes_to_perturb: [TNF]\nperturbation_sequence: [src, tgt]\n")
    assert main([*argv[:-2], "--overwrite"]) == 1
    assert "one site per run" in capsys.readouterr().err
    config.write_text("genes: [TNF]\nwobble: 1\n")
    assert main([*argv, "--overwrite"]) == 1
    assert "Unknown key 'wobble'" in capsys.readouterr().err


def test_time_points_by_value(pipe, source_cells):
    result = pipe(source_cells[:8], genes=["TNF"], mode="overexpress", time_points=["3"], iterations=2)
    assert list(result.adata.obs["time_point"].unique()) == ["3"]  # an unseen time value, given as text
    with pytest.raises(ValueError, match="'9h'"):
        pipe(source_cells[:8], genes=["TNF"], mode="overexpress", time_points=["9h"])


def test_a_screen_equals_its_single_gene_runs(pipe, source_cells):
    # Each cell's random draws are its own, so neither the other genes of the screen nor how the perturbed rows are
    # grouped changes a gene's prediction.
    cells = source_cells[:30]
    screen = pipe(cells, screen=["TNF", "EGR1"], mode="mask", seed=2, batch_size=16, variants_per_batch=2)
    alone = pipe(cells, genes=["EGR1"], mode="mask", seed=2, batch_size=16)
    rows = (screen.adata.obs["perturbation"] == "EGR1").to_numpy()
    np.testing.assert_allclose(screen.adata.layers["perturbed"][rows], alone.adata.layers["perturbed"], rtol=1e-5)
    np.testing.assert_allclose(screen.adata.layers["control"][rows], alone.adata.layers["control"], rtol=1e-5)
    split = pipe(cells, screen=["TNF", "EGR1"], mode="mask", seed=2, batch_size=16, variants_per_batch=1)
    np.testing.assert_allclose(split.adata.layers["perturbed"], screen.adata.layers["perturbed"], rtol=1e-5)
    # The same when the edit acts on generated target cells (each stacked row carries its own perturbed genes).
    late = [
        pipe(
            cells,
            screen=["TNF", "EGR1"],
            mode="delete",
            site="tgt",
            perturb_time_points=["2h"],
            seed=2,
            batch_size=16,
            variants_per_batch=n,
            iterations=2,
        ).adata
        for n in (1, 2)
    ]
    assert np.array_equal(late[0].obs["changed"], late[1].obs["changed"]) and late[0].obs["changed"].any()
    np.testing.assert_allclose(late[1].layers["perturbed"], late[0].layers["perturbed"], rtol=1e-5)


def test_per_gene_embedding_shift(pipe, source_cells):
    result = pipe(source_cells[:20], genes=["TNF"], mode="delete", seed=0, time_points=["2h"])
    shift = result.adata.layers["gene_embedding_cosine"]
    changed = result.adata.obs["changed"].to_numpy()
    finite = np.isfinite(shift)
    assert finite.any() and (shift[finite] <= 1 + 1e-5).all() and (shift[finite] >= -1 - 1e-5).all()
    assert np.allclose(shift[~changed][finite[~changed]], 1.0)  # unaffected cells keep every gene's embedding
    assert changed.any() and "embedding_cosine" in result.de.columns


def test_gene_cosine_matches_genes_not_positions():
    from types import SimpleNamespace

    from perturbgen_hf.pipelines.perturbation_result import gene_cosine as _gene_cosine

    config = SimpleNamespace(first_gene_token_id=4, num_target_genes=3)
    # control: genes 4, 5 at positions 0, 1; perturbed: gene 5 moved to position 0, gene 6 new, gene 4 gone
    control_sequences = np.array([[[[4, 5]]]])
    sequences = np.array([[[[5, 6]]]])
    control_hidden = np.array([[[[[1.0, 0.0], [0.0, 1.0]]]]])
    hidden = np.array([[[[[1.0, 1.0], [5.0, 5.0]]]]])
    shift = _gene_cosine(control_sequences, control_hidden, sequences, hidden, config)
    assert shift.shape == (1, 1, 3)
    assert np.isnan(shift[0, 0, 0]) and np.isnan(shift[0, 0, 2])  # in one prediction only
    np.testing.assert_allclose(shift[0, 0, 1], 1 / np.sqrt(2))  # gene 5: [0, 1] vs [1, 1]


def test_target_site_knockout_propagates_through_context(pipe, source_cells):
    assert pipe.model.config.context_mode != "none"
    result = pipe(
        source_cells[:40],
        genes=["TNF"],
        site="tgt",
        perturb_time_points=["2h"],
        mode="mask",
        time_points=["2h", "6h"],
        seed=4,
    )
    obs = result.adata.obs
    changed = obs["changed"].to_numpy()
    assert changed.any(), "some generated 2h cells should contain TNF"
    difference = np.abs(result.adata.layers["control"] - result.adata.layers["perturbed"]).sum(1)
    for time_point in ("2h", "6h"):  # the edited state is read out at 2h and is the context of 6h
        at = (obs["time_point"] == time_point).to_numpy()
        assert (difference[at & changed] > 0).all()
        assert (difference[at & ~changed] == 0).all()
    tnf = list(result.adata.var["gene_symbol"]).index("TNF")
    at_2h = (obs["time_point"] == "2h").to_numpy()
    assert np.isnan(result.adata.layers["gene_embedding_cosine"][at_2h & changed, tnf]).all()  # masked out
    assert result.config["perturb_time_points"] == ["2h"] and result.summary["site"] == "tgt"
    with pytest.raises(KeyError, match="not among the model's"):
        pipe(source_cells[:5], genes=["ACTB"], site="tgt", perturb_time_points=["2h"])


def test_teacher_forced_readout_of_observed_targets(pipe, source_cells, lps_model):
    adata = ad.read_h5ad(SHARED_DATA / "expression" / "shalek2014_bmdc_lps_timecourse.h5ad")
    cells = source_cells[:25]
    targets = {t: adata[(adata.obs["time"] == t).to_numpy()][:25].copy() for t in ("2h", "6h")}
    result = pipe(cells, genes=["TNF"], mode="delete", method="teacher_forced", targets=targets)
    obs = result.adata.obs
    assert set(obs["time_point"]) == {"2h", "6h"} and result.summary["method"] == "teacher_forced"
    changed = obs["changed"].to_numpy()
    difference = np.abs(result.adata.layers["control"] - result.adata.layers["perturbed"]).sum(1)
    assert (difference[changed] > 0).all() and (difference[~changed] == 0).all()
    # the readout scales to each observed cell's library size (ZINB zeros aside, the totals follow it)
    tokenizer = pipe.tokenizer
    observed = np.asarray(tokenizer.target_counts(targets["6h"].X, targets["6h"].var["human_ensembl_id"]).sum(1))
    at_6h = (obs["time_point"] == "6h").to_numpy()
    totals = result.adata.layers["control"][at_6h].sum(1)
    assert stats.spearmanr(totals, observed.ravel()).statistic > 0.95
    assert np.all(totals <= observed.ravel() * (1 + 1e-4))
    again = pipe(cells, genes=["TNF"], mode="delete", method="teacher_forced", targets=targets, seed=9)
    np.testing.assert_array_equal(again.adata.layers["perturbed"], result.adata.layers["perturbed"])  # no sampling
    # editing the observed 2h cells instead changes 2h and, through context, 6h
    edited = pipe(
        cells, genes=["TNF"], site="tgt", perturb_time_points=["2h"], method="teacher_forced", targets=targets
    )
    assert edited.adata.obs["changed"].any()
    with pytest.raises(ValueError, match="25 source cells"):
        pipe(cells, genes=["TNF"], method="teacher_forced", targets={"2h": targets["2h"][:10]})


def test_a_screen_run_on_two_processes_equals_one(lps_model, source_cells, tmp_path):
    import os
    import subprocess
    import sys

    source = tmp_path / "source.h5ad"
    source_cells[:40].write_h5ad(source)
    common = [
        "perturb",
        "--model",
        str(lps_model),
        "--adata",
        str(source),
        "--screen",
        "TNF",
        "EGR1",
        "ACTB",
        "--mode",
        "delete",
        "--gene-id-key",
        "human_ensembl_id",
        "--batch-size",
        "16",
        "--variants-per-batch",
        "1",
        "--iterations",
        "3",
        "--time-points",
        "2h",
        "6h",
        "--seed",
        "5",
        "--no-plots",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "perturbgen_hf.cli", *common, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    two = subprocess.run(
        [*launcher, "perturbgen_hf.cli", *common, "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr
    first, second = PerturbationResult.load(tmp_path / "one"), PerturbationResult.load(tmp_path / "two")
    for layer in ("control", "perturbed"):
        np.testing.assert_array_equal(first.adata.layers[layer], second.adata.layers[layer])
    assert first.adata.obs.equals(second.adata.obs)
    assert first.summary == second.summary
    assert first.summary["perturbations_skipped"].keys() == {"ACTB"}  # not expressed in these cells
