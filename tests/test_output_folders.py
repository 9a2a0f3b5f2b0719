"""`--overwrite` never loses a result, never deletes what perturbgen-hf did not write, and nothing half-written stays."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from perturbgen_hf.cli import main
from perturbgen_hf.output_folder import (
    OUTPUT_MARKER,
    check_output_folder,
    remove_stale_staging,
    staged_output_folder,
)


def _time_course(path, cells=36, genes=30):
    rng = np.random.default_rng(0)
    counts = sp.csr_matrix(rng.poisson(2.0, (cells, genes)).astype(np.float32))
    obs = pd.DataFrame({"time": np.repeat(["0h", "2h", "6h"], cells // 3)}, index=[f"c{i}" for i in range(cells)])
    ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(genes)])).write_h5ad(path)
    return path


def _leftovers(folder):
    """Hidden staging folders beside the outputs."""
    return sorted(
        p.name for p in folder.iterdir() if p.name.startswith(".") and ("staging" in p.name or "replaced" in p.name)
    )


def _tokenize(data, out, *extra):
    return main(
        [
            "tokenize",
            str(data),
            "--out",
            str(out),
            "--time-key",
            "time",
            "--source",
            "0h",
            "--n-hvg",
            "10",
            "--no-progress",
            *extra,
        ]
    )


def test_a_result_carries_the_marker_and_leaves_no_staging(tmp_path):
    data = _time_course(tmp_path / "in.h5ad")
    assert _tokenize(data, tmp_path / "tokens") == 0
    marker = json.loads((tmp_path / "tokens" / OUTPUT_MARKER).read_text())
    assert marker["command"] == "tokenize"
    assert _leftovers(tmp_path) == []


def test_overwrite_refuses_a_folder_perturbgen_did_not_write_and_force_replaces_it(tmp_path, capsys):
    data = _time_course(tmp_path / "in.h5ad")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("three years")
    assert _tokenize(data, tmp_path / "mine", "--overwrite") == 1
    assert "--force-overwrite" in capsys.readouterr().err
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "three years"
    assert _tokenize(data, tmp_path / "mine", "--force-overwrite") == 0
    assert not (tmp_path / "mine" / "thesis.tex").exists()
    assert (tmp_path / "mine" / OUTPUT_MARKER).is_file()


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        check_output_folder(tmp_path / "f", overwrite=True)


# Each: a command line that fails on a bad option, given the folder of an earlier result with --overwrite. The
# earlier result must be intact afterwards and no staging folder left.
FAILING_OVERWRITES = {
    "evaluate-bad-preset": lambda d, o: [
        "evaluate",
        str(d),
        "--out",
        str(o),
        "--protocol",
        "heldout-time",
        "--heldout",
        "2h",
        "--time-key",
        "time",
        "--source",
        "0h",
        "--preset",
        "huge",
        "--overwrite",
        "--no-progress",
    ],
    "evaluate-bad-heldout": lambda d, o: [
        "evaluate",
        str(d),
        "--out",
        str(o),
        "--protocol",
        "heldout-time",
        "--heldout",
        "99h",
        "--time-key",
        "time",
        "--source",
        "0h",
        "--overwrite",
        "--no-progress",
    ],
    "evaluate-bad-fraction": lambda d, o: [
        "evaluate",
        str(d),
        "--out",
        str(o),
        "--protocol",
        "heldout-cells",
        "--heldout-fraction",
        "1.5",
        "--time-key",
        "time",
        "--source",
        "0h",
        "--overwrite",
        "--no-progress",
    ],
    "demo-bad-time-key": lambda d, o: [
        "demo",
        "--adata",
        str(d),
        "--time-key",
        "hour",
        "--source",
        "0h",
        "--gene",
        "G1",
        "--out",
        str(o),
        "--overwrite",
    ],
    "demo-zero-steps": lambda d, o: ["demo", "--fast", "--max-steps", "0", "--out", str(o), "--overwrite"],
    "tokenize-bad-source": lambda d, o: [
        "tokenize",
        str(d),
        "--out",
        str(o),
        "--time-key",
        "time",
        "--source",
        "9h",
        "--overwrite",
        "--no-progress",
    ],
    "tokenize-zero-processes": lambda d, o: [
        "tokenize",
        str(d),
        "--out",
        str(o),
        "--time-key",
        "time",
        "--source",
        "0h",
        "--num-proc",
        "0",
        "--overwrite",
        "--no-progress",
    ],
}


@pytest.mark.parametrize("case", sorted(FAILING_OVERWRITES))
def test_a_failed_overwrite_keeps_the_earlier_result(case, tmp_path, capsys):
    data = _time_course(tmp_path / "in.h5ad")
    out = tmp_path / "result"
    assert _tokenize(data, out) == 0  # an earlier result, with its marker
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(FAILING_OVERWRITES[case](data, out)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in err and "Traceback" not in err
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert _leftovers(tmp_path) == []


def test_evaluate_checks_its_options_before_tokenizing(tmp_path, capsys):
    data = _time_course(tmp_path / "in.h5ad")
    out = tmp_path / "eval"
    assert main(FAILING_OVERWRITES["evaluate-bad-preset"](data, out)) == 1
    assert "Unknown preset 'huge'" in capsys.readouterr().err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_staging_folders_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.staging-{dead_pid}-abc"
    stale.mkdir()
    (stale / "cells-00000.arrow").write_bytes(b"partial")
    alive = tmp_path / f".out.staging-{os.getpid()}-xyz"
    alive.mkdir()
    other = tmp_path / f".other.staging-{dead_pid}-abc"
    other.mkdir()
    assert remove_stale_staging(tmp_path / "out") == [stale]
    assert alive.exists() and other.exists()


def test_the_next_run_removes_what_a_killed_run_left(tmp_path):
    data = _time_course(tmp_path / "in.h5ad")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tokens.staging-{int(dead.stdout)}-k2"
    stale.mkdir()
    assert _tokenize(data, tmp_path / "tokens") == 0
    assert not stale.exists() and _leftovers(tmp_path) == []


def _fail_halfway(out):
    with staged_output_folder(out, "test") as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("disk full")


def test_a_failure_inside_the_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        _fail_halfway(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


_KILLED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from perturbgen_hf.output_folder import staged_output_folder

    with staged_output_folder(Path(sys.argv[1]), "test", overwrite=True) as staging:
        (staging / "partial.arrow").write_bytes(b"x" * 1000)
        print("writing", flush=True)
        time.sleep(60)
    """
)


def test_sigterm_cleans_up_and_keeps_the_earlier_result(tmp_path):
    out = tmp_path / "out"
    with staged_output_folder(out, "test") as staging:
        (staging / "old.txt").write_text("earlier result")
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLED, str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert process.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert (out / "old.txt").read_text() == "earlier result"
    assert _leftovers(tmp_path) == []
