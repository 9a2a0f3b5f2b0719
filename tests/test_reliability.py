"""Bad user files get one clear line that names the file and the problem, not a library's traceback."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings

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
                "30",
                "--no-progress",
            ]
        )
        == 0
    )
    tokenizer = PerturbGenTokenizer.from_pretrained(tokens / "tokenizer")
    config = tiny_config(
        condition_tokens=[], num_target_genes=len(tokenizer.target_genes), target_genes=tokenizer.target_genes
    )
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
        "perturb": ["perturb", "--model", str(saved_model), "--adata", str(path), "--genes", "G1", "--out", out],
        "evaluate": [
            "evaluate",
            str(path),
            "--out",
            out,
            "--protocol",
            "heldout-time",
            "--heldout",
            "2h",
            "--time-key",
            "time",
            "--source",
            "0h",
            "--no-progress",
        ],
        "demo": ["demo", "--adata", str(path), "--time-key", "time", "--source", "0h", "--gene", "G1", "--out", out],
    }[command]
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


MODEL_KINDS = [
    "missing",
    "hub id offline",
    "file",
    "empty folder",
    "tokenized folder",
    "interrupted training",
    "corrupted config",
    "config without model_type",
    "no weights",
    "truncated weights",
    "garbage weights",
    "weights of another size",
    "no tokenizer",
]


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_a_bad_model_is_one_line_naming_it(kind, saved_model, tmp_path, capsys):
    model, words = _bad_model(kind, saved_model, tmp_path)
    source = _small_h5ad(tmp_path / "source.h5ad")
    code = main(
        ["perturb", "--model", str(model), "--adata", str(source), "--genes", "G1", "--out", str(tmp_path / "out")]
    )
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


# -- silently accepted inputs -------------------------------------------------------------------------------------------


def _with_obs_and_var(path, times=None, genes=None):
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(2.0, (9, 6)).astype(np.float32))
    times = times if times is not None else ["0h"] * 3 + ["2h"] * 3 + ["6h"] * 3
    obs = pd.DataFrame({"time": times}, index=[f"c{i}" for i in range(9)])
    var = pd.DataFrame(index=pd.Index(genes or [f"G{i}" for i in range(6)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata's own "names are not unique"
        ad.AnnData(counts, obs=obs, var=var).write_h5ad(path)
    return path


@pytest.mark.parametrize("missing", [np.nan, None, ""])
def test_cells_without_a_time_point_are_an_error_not_a_time_point(missing, tmp_path, capsys):
    times = ["0h", missing, "0h", "2h", "2h", "2h", "6h", "6h", "6h"]
    path = _with_obs_and_var(tmp_path / "nan.h5ad", times=times)
    assert (
        main(
            [
                "tokenize",
                str(path),
                "--out",
                str(tmp_path / "t"),
                "--time-key",
                "time",
                "--source",
                "0h",
                "--no-progress",
            ]
        )
        == 1
    )
    err = _error_line(capsys)
    assert "1 cell(s) have no time point" in err and "c1" in err
    assert not (tmp_path / "t").exists()


def test_duplicated_gene_ids_are_named_once(tmp_path, caplog):
    path = _with_obs_and_var(tmp_path / "dup.h5ad", genes=["G0", "G1", "G2", "G0", "G1", "G5"])
    with caplog.at_level("WARNING", logger="perturbgen_hf"):
        assert (
            main(
                [
                    "tokenize",
                    str(path),
                    "--out",
                    str(tmp_path / "t"),
                    "--time-key",
                    "time",
                    "--source",
                    "0h",
                    "--no-progress",
                ]
            )
            == 0
        )
    warnings = [r.getMessage() for r in caplog.records if "occur more than once" in r.getMessage()]
    assert len(warnings) == 1
    assert "2 gene identifiers of var_names" in warnings[0] and "G0, G1" in warnings[0]


BAD_PERTURB_OPTIONS = {
    "negative time point": (["--time-points", "-5"], "not a time after the source"),
    "infinite time point": (["--time-points", "inf"], "not a time after the source"),
    "unknown time point": (["--time-points", "tomorrow"], "Unknown time point 'tomorrow'"),
    "fdr above 1": (["--fdr", "5"], "fdr must be a false discovery rate between 0 and 1"),
    "fdr of 0": (["--fdr", "0"], "fdr must be a false discovery rate between 0 and 1"),
    "negative effect floor": (["--min-abs-log2fc", "-1"], "min_abs_log2fc must be"),
    "zero samples": (["--num-samples", "0"], "--num-samples must be >= 1"),
    "zero iterations": (["--iterations", "0"], "--iterations must be >= 1"),
    "zero batch": (["--batch-size", "0"], "--batch-size must be >= 1"),
    "negative nulls": (["--null-perturbations", "-2"], "--null-perturbations must be >= 0"),
    "unknown gene": (["--genes", "NOTAGENE"], "NOTAGENE"),
}


@pytest.mark.parametrize("case", sorted(BAD_PERTURB_OPTIONS))
def test_bad_perturb_options_are_one_line_and_write_nothing(case, saved_model, tmp_path, capsys):
    options, words = BAD_PERTURB_OPTIONS[case]
    source = SHALEK_SOURCE_CELLS(tmp_path)
    genes = [] if "--genes" in options else ["--genes", "Il1b"]
    code = main(
        [
            "perturb",
            "--model",
            str(saved_model),
            "--adata",
            str(source),
            *genes,
            "--iterations",
            "1",
            "--null-perturbations",
            "0",
            "--bootstrap",
            "0",
            "--no-plots",
            "--out",
            str(tmp_path / "out"),
            *options,
        ]
    )
    err = _error_line(capsys)
    assert code == 1 and words in err, err
    assert not (tmp_path / "out").exists()


def SHALEK_SOURCE_CELLS(folder):
    """Four 1h cells of the LPS time course (the saved model's data), as an h5ad."""
    path = folder / "source.h5ad"
    if not path.exists():
        lps = ad.read_h5ad(SHALEK)
        lps[np.flatnonzero((lps.obs["time"].astype(str) == "1h").to_numpy())[:4]].copy().write_h5ad(path)
    return path


def test_train_refuses_zero_steps_and_a_negative_learning_rate_before_making_a_folder(saved_model, tmp_path, capsys):
    tokens = saved_model.parent / "lps"
    for options, words in (
        (["--max_steps", "0"], "--max_steps must be a positive number"),
        (["--max_steps", "2", "--learning_rate", "-1"], "--learning_rate must be >= 0"),
    ):
        assert main(["train", "--data", str(tokens), "--out", str(tmp_path / "m"), "--use_cpu", *options]) == 1
        assert words in _error_line(capsys)
        assert not (tmp_path / "m").exists()


# -- start-up -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["tokenize", "--help"],
        ["train", "--help"],
        ["perturb", "--help"],
        ["evaluate", "--help"],
        ["demo", "--help"],
        ["convert-original", "--help"],
    ],
)
def test_help_and_version_do_not_import_torch(argv):
    # As the console script runs it: the package is imported with argv[0] = "perturbgen-hf".
    code = (
        "import sys; sys.argv = ['perturbgen-hf', *sys.argv[1:]]\n"
        "from perturbgen_hf.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write('torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().endswith("torch not imported"), done.stderr[-2000:]
    assert "usage:" in done.stdout or "perturbgen-hf 0" in done.stdout or "perturbgen-hf " in done.stdout


@pytest.mark.parametrize("command", ["tokenize", "train", "perturb", "evaluate", "demo", "convert-original"])
def test_help_shows_each_default_once_and_none_for_flags(command, capsys):
    code = 0
    try:
        main([command, "--help"])
    except SystemExit as exit_:  # argparse exits after help; `train` (HfArgumentParser) returns
        code = exit_.code
    assert code in (0, None)
    text = " ".join(capsys.readouterr().out.split())  # unwrapped, so that a phrase split over lines is found
    assert f"usage: perturbgen-hf {command}" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not re.search(r"\(default: [^)]*\) \(default:", text), "an option shows two defaults"
    if command == "demo":
        assert "training steps (default: 1600; with --fast: 8)" in text
        assert "random seed (default: 0)" in text  # 0 is a default to show, though 0 == False


def test_importing_the_package_still_registers_the_auto_classes():
    code = (
        "import perturbgen_hf\n"
        "from transformers import AutoConfig, pipeline\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "print(type(AutoConfig.for_model('perturbgen')).__name__, 'perturbation' in PIPELINE_REGISTRY.get_supported_tasks())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.stdout.split() == ["PerturbGenConfig", "True"], done.stderr[-2000:]


# -- corrupted bytes ----------------------------------------------------------------------------------------------------


def _corrupt(path, dataset):
    """Overwrite the middle half of `X/<dataset>`'s stored bytes with random bytes, in place."""
    import h5py

    with h5py.File(path, "r") as handle:
        stored = handle[f"X/{dataset}"]
        if stored.chunks:
            info = stored.id.get_chunk_info(0)
            offset, size = info.byte_offset, info.size
        else:
            offset, size = stored.id.get_offset(), stored.id.get_storage_size()
    with open(path, "r+b") as handle:
        handle.seek(offset + size // 4)
        handle.write(np.random.default_rng(1).integers(0, 256, size // 2, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("dataset", ["indices", "indptr", "data"])
@pytest.mark.parametrize("command", ["tokenize", "evaluate"])
def test_corrupted_counts_are_an_error_not_a_crash(dataset, command, tmp_path):
    # Run as a separate process: before the check, corrupted indices crashed it with a segmentation fault.
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(2.0, (60, 40)).astype(np.float32))
    obs = pd.DataFrame({"time": np.repeat(["0h", "2h", "6h"], 20)}, index=[f"c{i}" for i in range(60)])
    path = tmp_path / "counts.h5ad"
    ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(40)])).write_h5ad(path)
    _corrupt(path, dataset)
    argv = {
        "tokenize": [
            "tokenize",
            str(path),
            "--out",
            str(tmp_path / "out"),
            "--time-key",
            "time",
            "--source",
            "0h",
            "--no-progress",
        ],
        "evaluate": [
            "evaluate",
            str(path),
            "--out",
            str(tmp_path / "out"),
            "--protocol",
            "heldout-time",
            "--heldout",
            "2h",
            "--time-key",
            "time",
            "--source",
            "0h",
            "--no-progress",
        ],
    }[command]
    done = subprocess.run(
        [sys.executable, "-m", "perturbgen_hf.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr and last.startswith(f"perturbgen-hf {command}: error:"), done.stderr[-3000:]
    # Corrupted structure (indices, row pointers) is named with the file; corrupted values read as non-counts.
    assert (str(path) in last and "corrupted" in last) or "NaN or infinite" in last or "raw counts" in last, last
    assert not (tmp_path / "out").exists()


# -- option files -------------------------------------------------------------------------------------------------------

YAML_CASES = {
    "malformed": ("genes: [IL1B\nmode: : mask\n", "is not valid YAML at line"),
    "a list": ("- a\n- b\n", "must hold a mapping of option names to values, not a list"),
    "binary": (bytes(range(256)), "not"),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
@pytest.mark.parametrize("command", ["perturb", "train"])
def test_a_bad_yaml_config_is_one_line(case, command, saved_model, tmp_path, capsys):
    text, words = YAML_CASES[case]
    config = tmp_path / "options.yaml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    argv = {
        "perturb": [
            "perturb",
            "--model",
            str(saved_model),
            "--adata",
            str(SHALEK_SOURCE_CELLS(tmp_path)),
            "--out",
            str(tmp_path / "out"),
            "--config",
            str(config),
        ],
        "train": [
            "train",
            "--data",
            str(saved_model.parent / "lps"),
            "--out",
            str(tmp_path / "out"),
            "--use_cpu",
            "--config",
            str(config),
        ],
    }[command]
    assert main(argv) == 1
    err = _error_line(capsys)
    assert str(config) in err and words in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "tokenized-data folder", "empty folder"])
def test_a_bad_tokenizer_folder_is_one_line(kind, saved_model, tmp_path, capsys):
    folder = {
        "missing": tmp_path / "nope",
        "tokenized-data folder": saved_model.parent / "lps",
        "empty folder": tmp_path / "empty",
    }[kind]
    if kind == "empty folder":
        folder.mkdir()
    source = _small_h5ad(tmp_path / "in.h5ad")
    assert (
        main(
            [
                "tokenize",
                str(source),
                "--out",
                str(tmp_path / "out"),
                "--time-key",
                "time",
                "--source",
                "0h",
                "--tokenizer",
                str(folder),
                "--no-progress",
            ]
        )
        == 1
    )
    err = _error_line(capsys)
    assert str(folder) in err and ("does not exist" in err or "no vocab.json" in err), err
    if kind == "tokenized-data folder":
        assert "its tokenizer is" in err
