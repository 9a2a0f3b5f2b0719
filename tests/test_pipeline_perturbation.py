import anndata as ad
import numpy as np
import pytest
from conftest import SHARED_DATA
from transformers import pipeline

import perturbgen_hf  # noqa: F401  (registers the "perturbation" task)
from perturbgen_hf.data import tokenize_anndata
from perturbgen_hf.pipelines import (
    PerturbationPipeline,
    PerturbationResult,
    paired_differential_expression,
    perturb_tokens,
)
from perturbgen_hf.training import main as train_main


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
    assert table.loc[0, "wilcoxon_p"] < 1e-4 and table.loc[0, "p_adjusted"] < 1e-3
    # the other genes fall (proportions shift) but gene-for-gene identical rows would give p = 1
    same = paired_differential_expression(control, control, ["a", "b", "c", "d"])
    assert (same["wilcoxon_p"] == 1).all() and (same["log2_fold_change"] == 0).all()


@pytest.fixture(scope="module")
def lps_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pert")
    tokenize_anndata(
        SHARED_DATA / "expression" / "shalek2014_bmdc_lps_timecourse.h5ad", folder / "tokens", time_key="time",
        time_value_key="time_h", source="1h", gene_id_key="human_ensembl_id", n_hvg=60, include_genes=["TNF", "EGR1"],
        progress=False,
    )  # fmt: skip
    assert train_main(["--data", str(folder / "tokens"), "--out", str(folder / "model"), "--preset", "tiny",
                       "--max_steps", "6", "--max_source_length", "256", "--max_target_length", "32", "--use_cpu",
                       "--report_to", "none", "--eval_fraction", "0", "--seed", "0"]) == 0  # fmt: skip
    return folder / "model"


@pytest.fixture(scope="module")
def source_cells():
    adata = ad.read_h5ad(SHARED_DATA / "expression" / "shalek2014_bmdc_lps_timecourse.h5ad")
    return adata[adata.obs["time"] == "1h"].copy()


@pytest.fixture(scope="module")
def pipe(lps_model):
    return pipeline("perturbation", model=str(lps_model), gene_ids="human_ensembl_id", iterations=4, batch_size=50)


def test_knockout_on_real_data(pipe, source_cells, tmp_path):
    assert isinstance(pipe, PerturbationPipeline)
    result = pipe(source_cells, genes=["TNF"], mode="mask", seed=0)
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
        ({"genes": ["TNF"], "site": "tgt"}, ValueError, "not available yet"),
        ({"genes": ["TNF"], "screen": ["EGR1"]}, ValueError, "not both"),
        ({"genes": ["TNF"], "colour": "red"}, TypeError, "colour"),
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
    with pytest.raises(ValueError, match="No source cell expresses"):
        pipe(source_cells, genes=[absent], mode="mask")
    result = pipe(source_cells[:10], genes=[absent], mode="overexpress")  # overexpression applies to every cell
    assert result.summary["cells_unaffected"][absent] == 0


def test_perturb_command_with_an_original_style_config(lps_model, source_cells, tmp_path, capsys):
    from perturbgen_hf.cli import main

    source = tmp_path / "source.h5ad"
    source_cells[:24].write_h5ad(source)
    config = tmp_path / "perturbation.yaml"
    config.write_text("genes_to_perturb: [TNF]\nperturbation_mode: delete\npred_tps: ['2h', '6h']\niterations: 3\n")
    out = tmp_path / "ko"
    argv = ["perturb", "--model", str(lps_model), "--adata", str(source), "--out", str(out), "--config", str(config),
            "--gene-id-key", "human_ensembl_id", "--seed", "3"]  # fmt: skip
    assert main(argv) == 0
    assert "perturbed TNF in 24 cells" in capsys.readouterr().out
    result = PerturbationResult.load(out)
    assert set(result.adata.obs["time_point"]) == {"2h", "6h"}
    assert result.config["mode"] == "delete"
    assert {p.name for p in (out / "plots").iterdir()} == {"volcano_TNF.png", "responders_TNF.png",
                                                          "significant_genes.png"}  # fmt: skip
    assert main(argv) == 1  # an existing result is not overwritten
    assert "--overwrite" in capsys.readouterr().err
    config.write_text("genes_to_perturb: [TNF]\npert_tps: ['2h']\n")
    assert main([*argv[:-2], "--overwrite"]) == 1
    assert "pert_tps" in capsys.readouterr().err
    config.write_text("genes: [TNF]\nwobble: 1\n")
    assert main([*argv, "--overwrite"]) == 1
    assert "Unknown key 'wobble'" in capsys.readouterr().err


def test_time_points_by_value(pipe, source_cells):
    result = pipe(source_cells[:8], genes=["TNF"], mode="overexpress", time_points=["3"], iterations=2)
    assert list(result.adata.obs["time_point"].unique()) == ["3"]  # an unseen time value, given as text
    with pytest.raises(ValueError, match="'9h'"):
        pipe(source_cells[:8], genes=["TNF"], mode="overexpress", time_points=["9h"])
