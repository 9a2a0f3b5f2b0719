"""Time-resolved gene embeddings, gene programs, gene-set overlap, plots and the `embed` command."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SHARED_DATA, train_tiny_shalek
from scipy import stats
from sklearn.metrics import adjusted_rand_score
from transformers import pipeline

import perturbgen_hf  # noqa: F401  (registers the Auto classes)
from perturbgen_hf.analysis import (
    find_gene_programs,
    gene_set_enrichment,
    observed_expression,
    plot_gene_programs,
    read_gmt,
)
from perturbgen_hf.cli import main
from perturbgen_hf.commands.perturb import read_screen_file
from perturbgen_hf.data import simulate_trajectory
from perturbgen_hf.io_utils import load_model_folder
from perturbgen_hf.pipelines.gene_embeddings import UNS_KEY, embed_genes
from perturbgen_hf.pipelines.prediction import cell_batch_seed, generation_lengths
from perturbgen_hf.tokenization import PerturbGenTokenizer, log_normalize


SHALEK = SHARED_DATA / "expression" / "shalek2014_bmdc_lps_timecourse.h5ad"
INTERFERON = ["CCL5", "CXCL10", "RSAD2", "IFIT1"]


@pytest.fixture(scope="module")
def lps_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embed")
    return train_tiny_shalek(folder, 128, 24, include_genes=[*INTERFERON, "TNF", "EGR1"])


@pytest.fixture(scope="module")
def lps(lps_model):
    model, tokenizer = load_model_folder(lps_model)
    adata = ad.read_h5ad(SHALEK)
    source = adata[(adata.obs["time"] == "1h").to_numpy()].copy()
    source.obs["half"] = np.where(np.arange(source.n_obs) % 2 == 0, "even", "odd")
    return model, tokenizer, adata, source


def _embed(lps, **kwargs):
    model, tokenizer, _, source = lps
    settings = {"iterations": 2, "batch_size": 16, "progress": False, **kwargs}
    return embed_genes(model, tokenizer, source, **settings)


def test_a_gene_embedding_is_its_mean_hidden_state_where_it_is_generated(lps):
    model, tokenizer, _, source = lps
    embeddings = _embed(lps, time_points=["2h", "6h"], batch_size=50)
    record = embeddings.uns[UNS_KEY]
    assert embeddings.shape == (model.config.num_target_genes, model.config.decoder_hidden_size)
    assert record["time_points"] == ["2h", "6h"] and record["method"] == "generate"
    assert list(embeddings.obsm["n_cells"].columns) == ["2h", "6h"]
    # The same generation, redone by hand from the documented seeding: batch starts 0 and 50 of 82 cells.
    ranked = tokenizer.rank_cells(source.X, list(source.var_names), model.config.max_source_length)
    hidden, genes = [], []
    for start in (0, 50):
        rows = range(start, min(start + 50, source.n_obs))
        cells = [ranked.cell(i) for i in rows]
        input_ids = torch.zeros(len(cells), max(map(len, cells)), dtype=torch.long)
        for i, cell in enumerate(cells):
            input_ids[i, : len(cell)] = torch.as_tensor(cell)
        generator = torch.Generator().manual_seed(cell_batch_seed(0, start, 0))
        with torch.no_grad():
            out = model.generate(
                input_ids,
                (input_ids != 0).long(),
                time_points=["2h", "6h"],
                num_iterations=2,
                generator=generator,
                output_hidden_states=True,
                noise_index=torch.arange(len(cells)),
                num_noise_rows=50,
                sequence_length=generation_lengths(cells, model.config),
            )
        hidden.append(out.decoder_hidden_states[:, 1].reshape(-1, model.config.decoder_hidden_size))
        genes.append(model.gene_index(out.sequences[:, 1]).reshape(-1))
    hidden, genes = torch.cat(hidden).numpy(), torch.cat(genes).numpy()
    counts = np.bincount(genes[genes >= 0], minlength=model.config.num_target_genes)
    np.testing.assert_array_equal(embeddings.obsm["n_cells"]["6h"].to_numpy(), counts)
    gene = int(np.argmax(counts))
    np.testing.assert_allclose(embeddings.layers["6h"][gene], hidden[genes == gene].mean(0), rtol=1e-5, atol=1e-6)
    # The generated cells are the perturbation pipeline's control cells (one prediction path): the mean predicted
    # log1p CP10k equals that of the pipeline's control for the same seed and batch size.
    pipe = pipeline("perturbation", model=model, tokenizer=tokenizer)
    result = pipe(
        source,
        genes=[tokenizer.id_to_gene(int(ranked.cell(0)[1]))],
        seed=0,
        iterations=2,
        batch_size=50,
        time_points=["2h", "6h"],
        null_perturbations=0,
        progress=False,
    )
    at_6h = (result.adata.obs["time_point"] == "6h").to_numpy()
    control = log_normalize(np.asarray(result.adata.layers["control"][at_6h], dtype=np.float64)).mean(0)
    np.testing.assert_allclose(embeddings.obsm["predicted_expression"]["6h"].to_numpy(), control, rtol=1e-4, atol=1e-5)


def test_embeddings_are_seeded_and_groups_add_up_to_the_pooled_mean(lps):
    first = _embed(lps, group_key="half", seed=3)
    again = _embed(lps, group_key="half", seed=3)
    other = _embed(lps, group_key="half", seed=4)
    np.testing.assert_array_equal(first.layers["4h"], again.layers["4h"])
    assert not np.array_equal(first.layers["4h"], other.layers["4h"])
    n = first.obsm["n_cells"]
    assert n["4h | even"].add(n["4h | odd"]).equals(n["4h"])
    pooled = (
        first.layers["4h | even"] * n["4h | even"].to_numpy()[:, None]
        + first.layers["4h | odd"] * n["4h | odd"].to_numpy()[:, None]
    )
    seen = n["4h"].to_numpy() > 0
    np.testing.assert_allclose(first.layers["4h"][seen], pooled[seen] / n["4h"].to_numpy()[seen, None], atol=1e-5)
    assert first.uns[UNS_KEY]["groups"] == ["even", "odd"]


def test_teacher_forced_embeddings_read_the_observed_cells(lps):
    model, tokenizer, adata, source = lps
    target = adata[(adata.obs["time"] == "4h").to_numpy()][: source.n_obs].copy()  # one per source cell
    embeddings = _embed(lps, targets={"4h": target})
    assert embeddings.uns[UNS_KEY]["method"] == "teacher_forced"
    capacity = min(model.config.num_target_genes, model.config.decoder_max_position_embeddings)
    ranked = tokenizer.rank_targets(target.X, list(target.var_names), capacity)
    observed = np.zeros(model.config.num_target_genes, dtype=int)
    for i in range(len(ranked)):
        observed[model.gene_index(torch.as_tensor(ranked.cell(i))).numpy()] += 1
    np.testing.assert_array_equal(embeddings.obsm["n_cells"]["4h"].to_numpy(), observed)
    with pytest.raises(ValueError, match="leave time_points out"):
        _embed(lps, targets={"4h": target}, time_points=["4h"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"time_points": ["-1"]}, "not a time after the source state"),
        ({"time_points": ["soon"]}, "Unknown time point 'soon'"),
        ({"group_key": "donor"}, "group_key 'donor' is not an obs column"),
        ({"gene_ids": "no_such_column"}, "is not a var column"),
        ({"num_samples": 0}, "num_samples must be >= 1"),
    ],
)
def test_bad_embedding_requests_get_one_clear_error(lps, kwargs, message):
    with pytest.raises((ValueError, KeyError), match=message):
        _embed(lps, **kwargs)


def _blobs(num_per_program=20, programs=3, seed=0):
    """Embeddings of three well separated groups of genes whose predicted activity rises, falls or stays."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, size=(programs, 16))
    labels = np.repeat(np.arange(programs), num_per_program)
    genes = [f"ENSG{i:05d}" for i in range(len(labels))]
    obs = pd.DataFrame({"gene_symbol": [f"GENE{i}" for i in range(len(labels))]}, index=genes)
    layers = {t: (centres[labels] + rng.normal(0, 0.3, (len(labels), 16))).astype(np.float32) for t in ("2h", "6h")}
    embeddings = ad.AnnData(X=layers["2h"], obs=obs, layers=layers)
    slope = np.array([1.0, -1.0, 0.0])[labels]
    embeddings.obsm["n_cells"] = pd.DataFrame({"2h": 10, "6h": 10}, index=obs.index)
    embeddings.obsm["predicted_expression"] = pd.DataFrame({"2h": 2.0, "6h": 2.0 + slope}, index=obs.index)
    embeddings.uns[UNS_KEY] = {"time_points": ["2h", "6h"], "time_values": [2.0, 6.0], "groups": []}
    return embeddings, labels


def test_programs_recover_separated_groups_with_hubs_and_activity():
    embeddings, labels = _blobs()
    programs = find_gene_programs(embeddings, resolution=0.5, n_neighbors=8, seed=0)
    members = programs.membership.set_index("gene_id").loc[embeddings.obs_names]
    assert adjusted_rand_score(labels, members["program"]) == 1.0
    # Hubs: the num_hubs genes of each program with the largest within-program connectivity.
    for _, part in programs.membership.groupby("program"):
        expected = part.nlargest(3, "within_connectivity")["gene_id"]
        assert set(part[part["hub"]]["gene_id"]) == set(expected)
    # Activity: the mean predicted expression of the program's genes; the rising and falling ones change by 1.
    summary = programs.summary.set_index("program")
    rising = members["program"].iloc[0]
    assert summary.loc[rising, "trend"] == "rises" and summary.loc[rising, "change"] == pytest.approx(1.0)
    assert set(programs.top_changing(2)) == {rising, members["program"].iloc[20]}
    assert programs.top_changing(3)[2] == members["program"].iloc[40]  # the flat one last
    screen = programs.screen_list(1)
    hubs = programs.membership[(programs.membership["program"] == rising) & programs.membership["hub"]]
    assert screen == list(hubs.sort_values("within_connectivity", ascending=False)["gene_symbol"])
    again = find_gene_programs(embeddings, resolution=0.5, n_neighbors=8, seed=0)
    pd.testing.assert_frame_equal(programs.membership, again.membership)
    assert programs.program_of(["gene0", "ENSG00020", "nope"]) == {
        "gene0": rising,
        "ENSG00020": members["program"].iloc[20],
        "nope": None,
    }


def test_programs_fill_in_late_genes_leave_out_absent_ones_and_refuse_too_few():
    from perturbgen_hf.analysis.gene_programs import _features

    embeddings, labels = _blobs()
    embeddings.obsm["n_cells"].iloc[:5] = 2  # genes 0-4: too few cells at both time points
    embeddings.obsm["n_cells"].iloc[5:10, 0] = 0  # genes 5-9: not generated at 2h (a gene that switches on late)
    programs = find_gene_programs(embeddings, resolution=0.5, n_neighbors=8, min_cells=5)
    assert programs.excluded == list(embeddings.obs_names[:5]) and len(programs.membership) == 55
    # A late gene stands in at 2h with its 6h embedding, and lands with its group.
    features, _ = _features(embeddings, ["2h", "6h"], 5)
    np.testing.assert_allclose(features[0, :16], embeddings.layers["6h"][5])
    np.testing.assert_allclose(features[0, 16:], embeddings.layers["6h"][5])
    members = programs.membership.set_index("gene_id")["program"]
    assert adjusted_rand_score(labels[5:], members.loc[embeddings.obs_names[5:]]) == 1.0
    with pytest.raises(ValueError, match="too few for a 60-neighbour graph"):
        find_gene_programs(embeddings, n_neighbors=60)
    with pytest.raises(ValueError, match="resolution must be > 0"):
        find_gene_programs(embeddings, resolution=0)
    with pytest.raises(ValueError, match="not written by embed_genes"):
        find_gene_programs(ad.AnnData(np.zeros((3, 2))))


def test_gene_set_overlap_is_a_hypergeometric_test(tmp_path):
    embeddings, _ = _blobs()
    programs = find_gene_programs(embeddings, resolution=0.5, n_neighbors=8)
    gmt = tmp_path / "sets.gmt"
    first = [f"GENE{i}" for i in range(0, 10)]  # 10 of the first program's 20
    mixed = ["gene0", "GENE25", "GENE45", "ENSG00050", "NOT_A_GENE"]  # case and ids match; unknown genes do not
    gmt.write_text(f"first\tdesc\t{chr(9).join(first)}\n# a comment\n\nmixed\t\t{chr(9).join(mixed)}\n")
    sets = read_gmt(gmt)
    assert sets["mixed"][-1] == "NOT_A_GENE"
    table = gene_set_enrichment(programs, sets)
    top = table.iloc[0]
    assert top["gene_set"] == "first" and top["overlap"] == 10 and top["set_size"] == 10 and top["universe"] == 60
    assert top["p_value"] == pytest.approx(stats.hypergeom.sf(9, 60, 10, 20))
    np.testing.assert_allclose(table["fdr"], stats.false_discovery_control(table["p_value"], method="bh"))
    assert table[table["gene_set"] == "mixed"]["set_size"].iloc[0] == 4
    (tmp_path / "bad.gmt").write_text("only_a_name\n")
    with pytest.raises(ValueError, match=r"bad\.gmt:1"):
        read_gmt(tmp_path / "bad.gmt")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_gmt(tmp_path / "missing.gmt")


def test_observed_activity_on_the_simulator():
    adata = simulate_trajectory(num_clones=20, num_unaffected=30, seed=0)
    adata.var_names = adata.var["gene_symbol"].to_numpy()
    tok = PerturbGenTokenizer.fit(adata.X, list(adata.var_names))
    tok.set_target_genes(list(adata.var_names[:20]))
    table = observed_expression(adata, "time", tok)
    assert list(table.columns) == ["0h", "2h", "6h", "12h"] and list(table.index) == list(adata.var_names[:20])
    at = (adata.obs["time"] == "6h").to_numpy()
    expected = log_normalize(adata.X[at][:, :20].toarray().astype(float)).mean(0)
    np.testing.assert_allclose(table["6h"], expected)
    with pytest.raises(KeyError, match="time key 'day'"):
        observed_expression(adata, "day", tok)


def test_plots_are_written(tmp_path):
    embeddings, _ = _blobs()
    programs = find_gene_programs(embeddings, resolution=0.5, n_neighbors=8)
    paths = plot_gene_programs(programs, tmp_path / "plots", label_genes=["GENE7"])
    assert [p.name for p in paths] == ["program_activity_heatmap.png", "gene_umap.png", "top_programs_over_time.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_embed_command_writes_programs_and_a_screen_list_perturb_reads(lps_model, tmp_path, capsys):
    out = tmp_path / "embed"
    argv = [
        "embed",
        "--model",
        str(lps_model),
        "--adata",
        str(SHALEK),
        "--out",
        str(out),
        "--time-key",
        "time",
        "--iterations",
        "2",
        "--n-neighbors",
        "5",
        "--min-cells",
        "2",
        "--label-genes",
        *INTERFERON,
    ]
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert "from 82 source cells at 2h, 4h, 6h" in line
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert files == [
        "gene_embeddings.h5ad",
        "gene_programs.csv",
        "plots",
        "program_activity.csv",
        "program_summary.csv",
        "screen_genes.txt",
        "summary.json",
    ]
    activity = pd.read_csv(out / "program_activity.csv")
    # Observed activity at every time point of the data (1h is the source: observed only), predicted at 2h-6h.
    assert list(activity[activity["program"] == "P1"]["time_point"]) == ["1h", "2h", "4h", "6h"]
    assert activity[activity["time_point"] == "1h"]["predicted"].isna().all()
    assert activity["observed"].notna().all()
    screen = read_screen_file(out / "screen_genes.txt")
    summary = json.loads((out / "summary.json").read_text())
    assert screen == summary["screen_genes"] and 1 <= len(screen) <= 9
    embeddings = ad.read_h5ad(out / "gene_embeddings.h5ad")
    assert list(embeddings.uns[UNS_KEY]["time_points"]) == ["2h", "4h", "6h"]
    # Nothing is overwritten; a bad time point or option is one line and exit 1, before anything is written.
    assert main(argv) == 1
    assert "not empty" in capsys.readouterr().err
    assert main([*argv[:6], str(tmp_path / "bad"), "--time-points", "soon"]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Unknown time point 'soon'" in errors[0] and not (tmp_path / "bad").exists()
    assert main([*argv[:6], str(tmp_path / "bad"), "--use-groups"]) == 1
    assert "--use-groups needs --group-key" in capsys.readouterr().err
    assert main([*argv[:6], str(tmp_path / "bad"), "--gmt", str(tmp_path / "none.gmt")]) == 1
    assert "Gene set file not found" in capsys.readouterr().err


def test_screen_files(tmp_path):
    path = tmp_path / "screen.txt"
    path.write_text("# hubs\nIL1B\n\nTNF  # a comment\n")
    assert read_screen_file(path) == ["IL1B", "TNF"]
    path.write_text("IL1B\nIL1B\n")
    with pytest.raises(ValueError, match="listed twice"):
        read_screen_file(path)
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no gene"):
        read_screen_file(path)
    from perturbgen_hf.cli import build_parser
    from perturbgen_hf.commands.perturb import _perturb_options

    path.write_text("IL1B\nTNF\n")
    args = build_parser().parse_args(
        ["perturb", "--model", "m", "--adata", "a", "--out", "o", "--screen-file", str(path)]
    )
    assert _perturb_options(args)["screen"] == ["IL1B", "TNF"]
