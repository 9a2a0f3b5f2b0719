"""Bad user files get one clear line that names the file and the problem, not a library's traceback."""

import json
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import SHARED_DATA, tiny_config

from perturbgen_hf import PerturbGenForConditionalGeneration
from perturbgen_hf.cli import main
from perturbgen_hf.io_utils import check_model_location, read_anndata
from perturbgen_hf.tokenization import PerturbGenTokenizer


SHALEK = SHARED_DATA / "expression" / "shalek2014_bmdc_lps_timecourse.h5ad"


def _small_h5ad(path):
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(2.0, (6, 5)).astype(np.float32))
    obs = pd.DataFrame({"time": ["0h", "0h", "0h", "2h", "2h", "2h"]}, index=[f"c{i}" for i in range(6)])
    ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(5)])).write_h5ad(path)
    return path


def _bad_input(kind, folder):
    """A bad h5ad of the given kind, made for real in `folder`; returns its path and a word the error must name."""
    path = folder / f"{kind}.h5ad"
    if kind == "missing":
        return path, "does not exist"
    if kind == "folder":
        path.mkdir()
        return path, "is a folder"
    if kind == "empty":
        path.write_bytes(b"")
        return path, "is empty"
    if kind == "csv":
        path.write_text("cell,GENE1,GENE2\nc1,0,3\nc2,1,0\n")
        return path, "text or CSV"
    if kind == "binary":
        path.write_bytes(bytes(range(256)) * 8)
        return path, "not an HDF5 file"
    if kind == "truncated":
        whole = _small_h5ad(folder / "whole.h5ad").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
        return path, "Could not read"
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    # The tokenized LPS data's tokenizer, with a tiny model of its sizes: a folder `perturb` loads.
    tokens = tmp_path_factory.mktemp("tokens") / "lps"
    assert main(["tokenize", str(SHALEK), "--out", str(tokens), "--time-key", "time", "--source", "1h", "--n-hvg",
                 "30", "--no-progress"]) == 0  # fmt: skip
    tokenizer = PerturbGenTokenizer.from_pretrained(tokens / "tokenizer")
    config = tiny_config(condition_tokens=[], num_target_genes=len(tokenizer.target_genes),
                         target_genes=tokenizer.target_genes)  # fmt: skip
    config.encoder.vocab_size = len(tokenizer.vocab)
    folder = tokens.parent / "model"
    PerturbGenForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _error_line(capsys):
    """The command's error: the last line of stderr, with no traceback (progress bars and reports may precede it)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return err.splitlines()[-1]


INPUT_KINDS = ["missing", "folder", "empty", "csv", "binary", "truncated"]


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_a_bad_h5ad_is_one_line_naming_it(kind, tmp_path):
    path, words = _bad_input(kind, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as raised:
        read_anndata(path)
    message = str(raised.value)
    assert str(path) in message and words in message and "\n" not in message


@pytest.mark.parametrize("command", ["tokenize", "perturb", "evaluate", "demo"])
@pytest.mark.parametrize("kind", ["csv", "truncated", "folder"])
def test_every_command_that_reads_an_h5ad_reports_it_in_one_line(command, kind, saved_model, tmp_path, capsys):
    path, words = _bad_input(kind, tmp_path)
    out = str(tmp_path / "out")
    argv = {
        "tokenize": ["tokenize", str(path), "--out", out, "--time-key", "time", "--source", "0h", "--no-progress"],
        "perturb": ["perturb", "--model", str(saved_model), "--adata", str(path), "--genes", "G1",
                    "--out", out],
        "evaluate": ["evaluate", str(path), "--out", out, "--protocol", "heldout-time", "--heldout", "2h",
                     "--time-key", "time", "--source", "0h", "--no-progress"],
        "demo": ["demo", "--adata", str(path), "--time-key", "time", "--source", "0h", "--gene", "G1", "--out", out],
    }[command]  # fmt: skip
    assert main(argv) == 1
    err = _error_line(capsys)
    assert err.startswith(f"perturbgen-hf {command}: error:") and str(path) in err and words in err
    assert not (tmp_path / "out").exists()  # checked before any output is made


@pytest.mark.parametrize("value", [np.ones((3, 4)), sp.csr_matrix(np.ones((3, 4))), pd.DataFrame(np.ones((3, 4)))])
def test_the_python_api_says_what_it_accepts_instead_of_a_matrix(value):
    with pytest.raises(TypeError, match=r"AnnData or the path of an \.h5ad file.*var=pandas\.DataFrame"):
        read_anndata(value)


def test_a_good_h5ad_and_an_anndata_are_read(tmp_path):
    path = _small_h5ad(tmp_path / "ok.h5ad")
    adata = read_anndata(path)
    assert adata.shape == (6, 5)
    assert read_anndata(adata) is adata
    assert read_anndata(path, backed="r").isbacked


# -- model folders ------------------------------------------------------------------------------------------------------


def _bad_model(kind, saved_model, folder):
    """A bad `--model` of the given kind, made for real; returns it and words the error must contain."""
    path = folder / kind
    if kind == "missing":
        return path, "no such folder"
    if kind == "hub id offline":
        return "some-org/some-model", "HF_HUB_OFFLINE"
    if kind == "file":
        path.write_text("x")
        return path, "is a file"
    if kind == "empty folder":
        path.mkdir()
        return path, "empty"
    if kind == "tokenized folder":
        path.mkdir()
        (path / "perturbgen_data.json").write_text("{}")
        return path, "tokenized-data folder"
    if kind == "interrupted training":
        (path / "checkpoint-10").mkdir(parents=True)
        (path / "checkpoint-40").mkdir()
        (path / "checkpoint-200").mkdir()
        return path, "checkpoint-200"
    shutil.copytree(saved_model, path)
    if kind == "corrupted config":
        (path / "config.json").write_text('{"model_type": "perturbgen", ')
        return path, "not valid JSON"
    if kind == "config without model_type":
        config = json.loads((path / "config.json").read_text())
        config.pop("model_type")
        (path / "config.json").write_text(json.dumps(config))
        return path, "model_type"
    if kind == "no tokenizer":
        (path / "vocab.json").unlink()
        return path, "no tokenizer"
    if kind == "no weights":
        (path / "model.safetensors").unlink()
        return path, "no weights"
    if kind == "truncated weights":
        weights = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(weights[: len(weights) - 100])
        return path, "truncated"
    if kind == "garbage weights":
        (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"0" * 64)
        return path, "not a safetensors header"
    if kind == "weights of another size":
        config = json.loads((path / "config.json").read_text())
        config["decoder_intermediate_size"] = 41
        (path / "config.json").write_text(json.dumps(config))
        return path, "do not match the sizes"
    raise AssertionError(kind)


MODEL_KINDS = ["missing", "hub id offline", "file", "empty folder", "tokenized folder", "interrupted training",
               "corrupted config", "config without model_type", "no weights", "truncated weights", "garbage weights",
               "weights of another size", "no tokenizer"]  # fmt: skip


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_bad_model_is_one_line_naming_it(kind, saved_model, tmp_path, capsys):
    model, words = _bad_model(kind, saved_model, tmp_path)
    source = _small_h5ad(tmp_path / "source.h5ad")
    code = main(["perturb", "--model", str(model), "--adata", str(source), "--genes", "G1",
                 "--out", str(tmp_path / "out")])  # fmt: skip
    err = _error_line(capsys)
    assert code == 1 and str(model) in err and words in err
    assert not (tmp_path / "out").exists()


def test_a_good_model_folder_passes_the_checks(saved_model):
    check_model_location(saved_model)
    check_model_location(str(saved_model))


def test_a_hub_id_is_left_to_transformers_when_online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    check_model_location("some-org/some-model")  # not refused here: transformers fetches it (or says why not)
    with pytest.raises(FileNotFoundError, match="not a Hugging Face Hub id"):
        check_model_location("./no/such/../folder")
