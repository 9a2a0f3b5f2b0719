"""
Every Python block of README.md runs as written, on a tiny model trained here.

The blocks name files and folders ("path/or/hub-id", "lps_model", "cells_at_90min.h5ad", the original dictionaries);
the fixture creates each of them in a temporary folder, which the blocks run in: the LPS time course of
Shalek et al. 2014 (`../shared/data`) relabelled to the README's story (source 90min, targets 6h and 10h), a `tiny`
model trained for a few steps on it, and the original PerturbGen dictionaries under the names the README uses.
Names a block uses without defining (`cells_90min`, `adata`: cells of the source state) come from `NAMESPACE`.
"""

import re
import shutil
from pathlib import Path

import anndata as ad
import pytest
from conftest import SHARED_DATA

from perturbgen_hf.data import tokenize_anndata
from perturbgen_hf.training import main as train_main


README = Path(__file__).resolve().parents[1] / "README.md"
TIMES = {"1h": ("90min", 1.5), "2h": ("6h", 6.0), "4h": ("10h", 10.0)}  # the Shalek times, renamed
DICTIONARIES = {
    "token_dict.pkl": "perturbgen_token_dict_gftokens_gc95M.pkl",
    "gene_median_dict.pkl": "perturbgen_gene_median_dict_gftokens_gc95M.pkl",
    "ensembl_mapping_dict.pkl": "perturbgen_ensembl_mapping_dict_gc95M.pkl",
    "gene_name_id_dict.pkl": "geneformer_gc30M_gene_name_id_dict.pkl",
}


def python_blocks(text: str) -> list[tuple[int, str]]:
    """`(line, code)` of every ```python block."""
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


@pytest.fixture(scope="module")
def readme_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme")
    adata = ad.read_h5ad(SHARED_DATA / "expression" / "shalek2014_bmdc_lps_timecourse.h5ad")
    adata = adata[adata.obs["time"].isin(list(TIMES))].copy()
    adata.obs["time"] = adata.obs["time"].astype(str).map(lambda t: TIMES[t][0])
    adata.obs["time_h"] = adata.obs["time"].map(dict(TIMES.values())).astype(float)
    adata.var["ensembl_id"] = adata.var["human_ensembl_id"]
    tokenize_anndata(
        adata,
        folder / "tokens",
        time_key="time",
        time_value_key="time_h",
        source="90min",
        gene_id_key="ensembl_id",
        n_hvg=60,
        include_genes=["IL1B"],
        progress=False,
    )
    assert (
        train_main(
            [
                "--data",
                str(folder / "tokens"),
                "--out",
                str(folder / "lps_model"),
                "--preset",
                "tiny",
                "--max_steps",
                "4",
                "--max_source_length",
                "2048",
                "--max_target_length",
                "32",
                "--use_cpu",
                "--report_to",
                "none",
                "--eval_fraction",
                "0",
                "--seed",
                "0",
            ]
        )
        == 0
    )
    for name in ("perturbgen-lps", "path/or/hub-id"):
        shutil.copytree(folder / "lps_model", folder / name)
    # 16 source cells keep the pipeline blocks to seconds; IL1B has counts in most of them.
    source = adata[adata.obs["time"] == "90min"][:16].copy()
    source.write_h5ad(folder / "cells_at_90min.h5ad")
    for name, original in DICTIONARIES.items():
        shutil.copy(SHARED_DATA / "vocab" / original, folder / name)
    return folder, source


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, readme_folder, monkeypatch):
    folder, source = readme_folder
    monkeypatch.chdir(folder)  # the blocks name their files relative to where the user runs them
    namespace = {"__name__": "__readme__", "cells_90min": source, "adata": source}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    if "result" in namespace:  # a perturbation block: its result covers every source cell and predicted time point
        result = namespace["result"]
        assert result.summary["cells"] == source.n_obs
        assert set(result.de["time_point"]) >= {"6h", "10h"} and result.de["log2_fold_change"].notna().all()
