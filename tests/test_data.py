import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import tiny_config
from datasets import load_from_disk

from perturbgen_hf import PerturbGenForConditionalGeneration
from perturbgen_hf.cli import main
from perturbgen_hf.data import DataCollatorForPerturbGen, load_description, pair_cells, tokenize_anndata
from perturbgen_hf.output_folder import OUTPUT_MARKER
from perturbgen_hf.tokenization import PerturbGenTokenizer


@pytest.fixture(scope="module")
def shalek_folder(tmp_path_factory):
    from conftest import SHARED_DATA

    vocab = SHARED_DATA / "vocab"
    out = tmp_path_factory.mktemp("shalek") / "tokenized"
    code = main(
        [
            "tokenize",
            str(SHARED_DATA / "expression" / "shalek2014_bmdc_lps_timecourse.h5ad"),
            "--out",
            str(out),
            "--time-key",
            "time",
            "--time-value-key",
            "time_h",
            "--source",
            "1h",
            "--gene-id-key",
            "human_ensembl_id",
            "--dictionaries",
            str(vocab / "perturbgen_token_dict_gftokens_gc95M.pkl"),
            str(vocab / "perturbgen_gene_median_dict_gftokens_gc95M.pkl"),
            str(vocab / "perturbgen_ensembl_mapping_dict_gc95M.pkl"),
            "--n-hvg",
            "300",
            "--include-genes",
            "TNF",
            "EGR1",
            "--no-progress",
            "--seed",
            "3",
        ]
    )
    assert code == 0
    return out


def test_shalek_layout_and_description(shalek_folder):
    description = load_description(shalek_folder)
    assert description["source"] == "1h"
    assert description["time_points"] == ["2h", "4h", "6h"]
    assert description["time_values"] == [2.0, 4.0, 6.0]
    # the 300 most variable genes plus TNF and EGR1 where they are not among them already
    assert 300 <= description["num_target_genes"] <= 302
    tokenizer = PerturbGenTokenizer.from_pretrained(shalek_folder / "tokenizer")
    assert {"ENSG00000232810", "ENSG00000120738"} <= set(tokenizer.target_genes)  # TNF, EGR1
    report = description["pairing"]
    # every time point is drawn as often as the largest (4h, 162 cells): every cell used, duplicates balanced
    assert report["num_pairs"] == 162
    assert report["time_points"]["1h"] == {
        "cells": 82,
        "cells_used": 82,
        "cells_used_more_than_once": 80,
        "max_uses_of_a_cell": 2,
    }
    assert len(description["input"]["sha256"]) == 64
    dataset = load_from_disk(str(shalek_folder / "dataset"))
    assert len(dataset) == 162
    assert all(len(row) == 3 for row in dataset["target_input_ids"])


def test_shalek_tokens_match_a_direct_computation(shalek_folder, shared_data):
    tokenizer = PerturbGenTokenizer.from_pretrained(shalek_folder / "tokenizer")
    assert tokenizer.gene_to_id("TNF") == tokenizer.gene_to_id("ENSG00000232810")
    adata = ad.read_h5ad(shared_data / "expression" / "shalek2014_bmdc_lps_timecourse.h5ad")
    dataset = load_from_disk(str(shalek_folder / "dataset"))
    gene_ids = adata.var["human_ensembl_id"].astype(str).tolist()
    for row in (0, 50, 161):
        example = dataset[row]
        cell = adata[example["source_cell_id"]]
        counts = np.asarray(cell.X.todense()).ravel().astype(float)
        # Direct computation: sum duplicated genes, normalise by all counts, divide by median, sort, truncate.
        per_gene = {}
        for gene, value in zip(gene_ids, counts):
            token = tokenizer.vocab.get(gene)
            if token is not None and value > 0:
                per_gene[token] = per_gene.get(token, 0.0) + value
        medians = {tokenizer.vocab[g]: m for g, m in tokenizer.gene_medians.items()}
        scores = sorted((-(v / counts.sum() * 1e4 / medians[t]), t) for t, v in per_gene.items())
        assert example["source_input_ids"] == [2, *[t for _, t in scores][:4094], 3]
        # Targets: the same ranking restricted to the target genes, in decoder ids; counts over target genes.
        target_cell = adata[example["target_cell_ids"][0]]
        target_counts = tokenizer.target_counts(target_cell.X, gene_ids).toarray().ravel()
        assert example["target_counts_indices"][0] == np.flatnonzero(target_counts).tolist()
        assert example["target_counts_values"][0] == target_counts[target_counts > 0].tolist()
        assert example["target_library_size"][0] == float(target_cell.X.sum())


def test_kang_stratified_with_conditions(tmp_path, shared_data):
    out = tmp_path / "kang"
    description = tokenize_anndata(
        shared_data / "expression" / "kang2018_pbmc_ifnb_muscat_subset.h5ad",
        out,
        time_key="condition",
        time_order=["ctrl", "stim"],
        source="ctrl",
        gene_id_key="ensembl_id",
        n_hvg=200,
        pairing="stratified",
        pairing_key="cell_type",
        condition_keys=["donor"],
        progress=False,
    )
    assert description["time_points"] == ["stim"]
    assert description["time_values"] == [2.0]  # no number in the names: positions
    per_group = description["pairing"]["pairs_per_group"]
    assert set(per_group) == {"B cells", "CD4 T cells", "CD8 T cells", "CD14+ Monocytes", "FCGR3A+ Monocytes"}
    dataset = load_from_disk(str(out / "dataset"))
    adata = ad.read_h5ad(shared_data / "expression" / "kang2018_pbmc_ifnb_muscat_subset.h5ad", backed="r")
    obs = adata.obs
    for example in dataset.select(range(0, len(dataset), 97)):
        source, target = obs.loc[example["source_cell_id"]], obs.loc[example["target_cell_ids"][0]]
        assert source["cell_type"] == target["cell_type"] == example["source_group"]
        assert (source["condition"], target["condition"]) == ("ctrl", "stim")
    tokenizer = PerturbGenTokenizer.from_pretrained(out / "tokenizer")
    assert tokenizer.condition_tokens == [f"donor={d}" for d in sorted(obs["donor"].astype(str).unique())]
    assert dataset[0]["target_condition_ids"][0][0] >= 4 + tokenizer.num_target_genes


def test_collator_feeds_the_model(shalek_folder):
    description = load_description(shalek_folder)
    tokenizer = PerturbGenTokenizer.from_pretrained(shalek_folder / "tokenizer")
    config = tiny_config(
        encoder={
            "vocab_size": tokenizer.vocab_size,
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 4096,
        },
        target_genes=tokenizer.target_genes,
        num_target_genes=tokenizer.num_target_genes,
        condition_tokens=[],
        time_points=description["time_points"],
        time_values=description["time_values"],
        decoder_max_position_embeddings=512,
        context_mode="all",
    )
    tokenizer.check_model_compatibility(config)
    dataset = load_from_disk(str(shalek_folder / "dataset"))
    collator = DataCollatorForPerturbGen.for_model(config, max_target_length=256, seed=0)
    batch = collator([dataset[i] for i in range(4)])
    assert batch["context_input_ids"].shape[:2] == (4, 2)
    assert batch["target_counts"].shape == (4, tokenizer.num_target_genes)
    masked = batch["decoder_input_ids"] == 1
    assert torch.equal(masked, batch["labels"] != -100)
    assert (masked.sum(1) >= 1).all()
    assert torch.equal(
        DataCollatorForPerturbGen.for_model(config, max_target_length=256, seed=0)([dataset[i] for i in range(4)])[
            "labels"
        ],
        batch["labels"],
    )
    model = PerturbGenForConditionalGeneration(config)
    out = model(**batch)
    assert torch.isfinite(out.loss)


def test_collator_previous_context_blanks_later_time_points():
    example = {
        "source_input_ids": [2, 10, 3],
        "target_input_ids": [[4, 5], [6], [7, 8, 9]],
        "target_condition_ids": [[], [], []],
        "target_counts_indices": [[0], [1], [2]],
        "target_counts_values": [[1.0], [2.0], [3.0]],
        "target_library_size": [10.0, 20.0, 30.0],
    }
    collator = DataCollatorForPerturbGen([1.0, 2.0, 3.0], num_target_genes=6, target_index=1)
    batch = collator([example])
    assert batch["context_time_values"].tolist() == [[1.0, 3.0]]
    assert batch["context_input_ids"][0, 0].tolist()[:2] == [4, 5]
    assert (batch["context_input_ids"][0, 1] == 0).all()  # 3.0 is later: absent under "previous"
    assert batch["target_counts"][0].tolist() == [0, 2, 0, 0, 0, 0]
    assert batch["library_size"].tolist() == [20.0]


def test_pairing_modes():
    obs = pd.DataFrame({"t": ["a"] * 4 + ["b"] * 6, "g": ["x", "x", "y", "y", "x", "x", "x", "y", "y", "y"]})
    pairs, report = pair_cells(obs, "t", ["a", "b"], "stratified", "g", seed=1)
    assert len(pairs) == 6
    assert (obs["g"].to_numpy()[pairs[:, 0]] == obs["g"].to_numpy()[pairs[:, 1]]).all()
    assert report["time_points"]["b"]["cells_used"] == 6
    again, _ = pair_cells(obs, "t", ["a", "b"], "stratified", "g", seed=1)
    assert np.array_equal(pairs, again)
    mapping = pd.DataFrame({"a": ["x", "y"], "b": ["y", "x"]})
    crossed, _ = pair_cells(obs, "t", ["a", "b"], "mapping", "g", mapping=mapping)
    assert (obs["g"].to_numpy()[crossed[:, 0]] != obs["g"].to_numpy()[crossed[:, 1]]).all()
    lonely = obs.assign(g=["x", "z", "y", "y", "x", "x", "x", "y", "y", "y"])
    with pytest.raises(ValueError, match=r"Group 'z'.*no cells at time point\(s\) \['b'\]"):
        pair_cells(lonely, "t", ["a", "b"], "stratified", "g")
    with pytest.raises(KeyError, match="'celltype'"):
        pair_cells(obs, "t", ["a", "b"], "stratified", "celltype")


def _write(tmp_path, X, obs=None):
    obs = obs if obs is not None else pd.DataFrame({"time": ["0h", "0h", "6h", "6h"]}, index=list("abcd"))
    adata = ad.AnnData(sp.csr_matrix(X), obs=obs)
    adata.var_names = ["G1", "G2", "G3"]
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--source", "0h", "--time-key", "day"], "Time key 'day' is not an obs column"),
        (["--source", "3h", "--time-key", "time"], "Source time point '3h' is not in the data"),
        (["--source", "0h", "--time-key", "time", "--targets", "9h"], r"Target time point\(s\) \['9h'\]"),
        (["--source", "0h", "--time-key", "time", "--pairing", "stratified"], "needs a pairing key"),
        (
            ["--source", "0h", "--time-key", "time", "--pairing", "stratified", "--pairing-key", "ct"],
            "'ct' is not an obs column",
        ),
        (["--source", "0h", "--time-key", "time", "--num-proc", "0"], "num_proc must be a whole number >= 1, got 0"),
        (["--source", "0h", "--time-key", "time", "--chunk-size", "-5"], "chunk_size must be"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    path = _write(tmp_path, np.array([[1, 2, 0], [0, 3, 1], [4, 0, 1], [1, 1, 1]]))
    code = main(["tokenize", str(path), "--out", str(tmp_path / "out"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("perturbgen-hf tokenize: error:")
    assert err.count("\n") == 1
    import re

    assert re.search(message, err), err


@pytest.mark.parametrize(
    ("X", "message"),
    [
        ([[1.5, 2, 0], [0, 3, 1], [4, 0, 1], [1, 1, 1]], "non-integer"),
        ([[1, -2, 0], [0, 3, 1], [4, 0, 1], [1, 1, 1]], "negative"),
        ([[np.nan, 2, 0], [0, 3, 1], [4, 0, 1], [1, 1, 1]], "NaN"),
    ],
)
def test_cli_refuses_non_count_data(tmp_path, capsys, X, message):
    path = _write(tmp_path, np.array(X, dtype=float))
    assert main(["tokenize", str(path), "--out", str(tmp_path / "o"), "--time-key", "time", "--source", "0h"]) == 1
    assert message in capsys.readouterr().err


def test_cli_missing_file_existing_output_and_help(tmp_path, capsys):
    assert (
        main(
            ["tokenize", str(tmp_path / "nope.h5ad"), "--out", str(tmp_path / "o"), "--time-key", "t", "--source", "a"]
        )
        == 1
    )
    assert "nope.h5ad" in capsys.readouterr().err
    path = _write(tmp_path, np.array([[1, 2, 0], [0, 3, 1], [4, 0, 1], [1, 1, 1]]))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("precious")
    args = [
        "tokenize",
        str(path),
        "--out",
        str(tmp_path / "o"),
        "--time-key",
        "time",
        "--source",
        "0h",
        "--no-progress",
    ]
    assert main(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "o" / "keep.txt").read_text() == "precious"
    # A folder perturbgen-hf did not write is replaced only on --force-overwrite; an earlier result on --overwrite.
    assert main([*args, "--overwrite"]) == 1
    assert "--force-overwrite" in capsys.readouterr().err
    assert (tmp_path / "o" / "keep.txt").read_text() == "precious"
    assert main([*args, "--force-overwrite"]) == 0
    assert not (tmp_path / "o" / "keep.txt").exists()
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((tmp_path / "o" / "perturbgen_data.json").read_text())["time_values"] == [6.0]
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenize", "--help"])
    assert exit_info.value.code == 0
    assert "--pairing-key" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["tokenize"])
    assert exit_info.value.code == 2


def test_parallel_tokenize_gives_the_same_dataset(tmp_path, shared_data):
    path = shared_data / "expression" / "kang2018_pbmc_ifnb_muscat_subset.h5ad"
    options = {
        "time_key": "condition",
        "time_order": ["ctrl", "stim"],
        "source": "ctrl",
        "gene_id_key": "ensembl_id",
        "n_hvg": 100,
        "pairing": "stratified",
        "pairing_key": "cell_type",
        "chunk_size": 200,
        "progress": False,
    }
    tokenize_anndata(path, tmp_path / "one", num_proc=1, **options)
    tokenize_anndata(path, tmp_path / "two", num_proc=2, **options)
    one, two = load_from_disk(str(tmp_path / "one" / "dataset")), load_from_disk(str(tmp_path / "two" / "dataset"))
    assert one.to_dict() == two.to_dict()
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        OUTPUT_MARKER,
        "dataset",
        "perturbgen_data.json",
        "tokenizer",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def _cell_state(adata):
    """Each simulated cell's class: its cell type and which regulators it expresses (on clones express them)."""
    regulators = np.flatnonzero(adata.var["role"].to_numpy() == "regulator")
    on = np.asarray(adata.X[:, regulators].todense()) > 2
    return [f"{t}|{''.join(map(str, row.astype(int)))}" for t, row in zip(adata.obs["cell_type"].astype(str), on)]


def test_transport_pairing_follows_descendants():
    from perturbgen_hf.data.simulate import simulate_trajectory

    adata = simulate_trajectory(num_clones=60, cells_per_clone=2, time_values=(0.0, 2.0, 6.0), seed=3)
    times = ["0h", "2h", "6h"]
    state = np.asarray(_cell_state(adata))
    agreement = {}
    for mode in ("random", "transport"):
        pairs, report = pair_cells(adata.obs, "time", times, mode, counts=adata.X, seed=0)
        assert pairs.shape == (120, 3)
        for column, t in enumerate(times):  # every pair's cells are at its time points
            assert (adata.obs["time"].astype(str).to_numpy()[pairs[:, column]] == t).all()
        agreement[mode] = [float(np.mean(state[pairs[:, 0]] == state[pairs[:, k]])) for k in (1, 2)]
    assert report["transport"]["epsilon"] > 0
    # Random pairs share a source's state by chance (about 1 in 16 classes); transport pairs, one step later, mostly
    # do, and still far more often than chance two steps later (measured: 0.575 and 0.483).
    assert max(agreement["random"]) < 0.2, agreement
    assert agreement["transport"][0] > 0.5 and agreement["transport"][1] > 0.4, agreement
    # Seeded: the same seed gives the same pairs; within groups, pairs stay in their group.
    again, _ = pair_cells(adata.obs, "time", times, "transport", counts=adata.X, seed=0)
    assert np.array_equal(again, pairs)
    grouped, _ = pair_cells(adata.obs, "time", times, "transport", "cell_type", counts=adata.X, seed=0)
    types = adata.obs["cell_type"].astype(str).to_numpy()
    assert (types[grouped[:, 0]] == types[grouped[:, 2]]).all()
    with pytest.raises(ValueError, match="counts"):
        pair_cells(adata.obs, "time", times, "transport")


def test_time_labels_with_mixed_units_are_ordered_in_hours():
    from perturbgen_hf.data.tokenize_dataset import resolve_time_points

    obs = pd.DataFrame({"time": ["6h", "90min", "10h", "0h", "90min"]})
    assert resolve_time_points(obs, "time") == (["0h", "90min", "6h", "10h"], [0.0, 1.5, 6.0, 10.0])
    days = pd.DataFrame({"time": ["day3", "day10", "day1"]})
    assert resolve_time_points(days, "time") == (["day1", "day3", "day10"], [1.0, 3.0, 10.0])
    # Given values order the time points; an explicit order that contradicts them is refused.
    obs["hours"] = obs["time"].map({"0h": 0.0, "90min": 1.5, "6h": 6.0, "10h": 10.0})
    assert resolve_time_points(obs, "time", time_value_key="hours")[0] == ["0h", "90min", "6h", "10h"]
    with pytest.raises(ValueError, match="not increasing"):
        resolve_time_points(obs, "time", time_order=["0h", "6h", "90min", "10h"], time_value_key="hours")
