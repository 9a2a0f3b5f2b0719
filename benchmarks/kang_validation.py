"""
Model choices for unseen cell types, made on validation splits of the Kang training data (never on the scored
cell types).

Each scored run of `evaluate_real_data.py` holds one cell type out (CD4 T cells, CD14+ Monocytes). Its validation
split removes that cell type from the data altogether and holds out its nearest relative among the rest instead:
CD8 T cells for the CD4 T run, FCGR3A+ Monocytes for the CD14+ run. Each setting is scored there with
`perturbgen-hf evaluate --protocol heldout-group` and the same training recipe as the scored runs. Writes
`benchmarks/results/kang_validation.json` and prints one table.

    python benchmarks/kang_validation.py --workdir /tmp/kangval [--max-steps 1500]
"""

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import pandas as pd


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "expression" / "kang2018_pbmc_ifnb_muscat_subset.h5ad"
RESULTS = Path(__file__).resolve().parent / "results" / "kang_validation.json"
# validation split: (cell type removed, cell type held out)
SPLITS = {"for CD4 T": ("CD4 T cells", "CD8 T cells"), "for CD14+ Mono": ("CD14+ Monocytes", "FCGR3A+ Monocytes")}
# settings compared: EvaluationSettings fields
VARIANTS = {"no source copy": {"count_source_copy": False}, "source copy": {"count_source_copy": True}}
SHOWN = ("mse", "pearson_delta", "e_distance_squared", "r2_means_top100_de")


def main() -> None:
    from perturbgen_hf.evaluation.protocols import run_evaluation
    from perturbgen_hf.settings import EvaluationSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="where models and outputs go")
    parser.add_argument("--max-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run only these settings")
    args = parser.parse_args()
    adata = ad.read_h5ad(DATA)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for split, (removed, heldout) in SPLITS.items():
        subset = adata[adata.obs["cell_type"] != removed].copy()
        for variant in args.only or list(VARIANTS):
            settings = EvaluationSettings(preset="compact", max_steps=args.max_steps, seed=args.seed,
                                          **VARIANTS[variant])  # fmt: skip
            started = time.perf_counter()
            out = Path(args.workdir) / f"{removed}-{variant}".replace(" ", "_")
            run_evaluation(subset, out, "heldout-group", time_key="condition", source="ctrl",
                                    heldout=heldout, group_key="cell_type", time_order=["ctrl", "stim"],
                                    settings=settings, overwrite=True, progress=False)  # fmt: skip
            metrics = json.loads((out / "metrics.json").read_text())
            rows = {}
            table = pd.read_csv(out / "metrics.csv")
            for method, part in table[table["metric"].isin(SHOWN)].groupby("method"):
                rows[method] = dict(zip(part["metric"], part["value"]))
            results.setdefault(split, {})[variant] = {
                "removed": removed, "heldout": heldout, "settings": VARIANTS[variant],
                "seconds": round(time.perf_counter() - started, 1), "cells": metrics["cells"], "scores": rows,
            }  # fmt: skip
            RESULTS.write_text(json.dumps(results, indent=1, default=float))
            model, linear = rows["PerturbGen (this model)"], rows.get("linear (PCA + ridge)", {})
            print(f"{split} | {variant} | " + " | ".join(f"{m} {model[m]:.3f} (linear {linear.get(m, float('nan')):.3f})"
                                                       for m in SHOWN), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
