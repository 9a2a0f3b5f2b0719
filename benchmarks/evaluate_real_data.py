"""
The evaluation protocols on real data, with CPU-sized models and a fixed seed (issue 6):

- Shalek et al. 2014 LPS time course (source 1h): `heldout-time` 4h (interpolation between 2h and 6h) and 6h
  (extrapolation beyond 4h);
- Kang et al. 2018 IFN-beta PBMCs (source ctrl, target stim): `heldout-group` CD4 T cells and CD14+ Monocytes
  (learn ctrl -> stim on the other cell types, predict stim for the held-out one from its ctrl cells);
- the package's simulator (source 0h): `heldout-time` 6h (interpolation between 2h and 12h) and 12h
  (extrapolation beyond 6h).

Each run trains its own model without the held-out part (`compact` preset) through `perturbgen-hf evaluate`, then
scores it beside the baselines. Writes `benchmarks/results/evaluate_real_data.json` (every metric of every method,
the run times and settings) and prints a Markdown table per run.

    python benchmarks/evaluate_real_data.py [--workdir DIR] [--max-steps 1500] [--only shalek_4h ...]
    python benchmarks/evaluate_real_data.py --models DIR --workdir OTHER   # re-score the models a run saved in DIR
"""

import argparse
import json
import shlex
import tempfile
import time
from pathlib import Path

import pandas as pd

from perturbgen_hf.settings import TIME_SCALES


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "expression"
RESULTS = Path(__file__).resolve().parent / "results" / "evaluate_real_data.json"

SHALEK = ["--time-key", "time", "--source", "1h"]
KANG = ["--time-key", "condition", "--time-order", "ctrl", "stim", "--source", "ctrl", "--group-key", "cell_type"]
RUNS = {
    "shalek_4h": (
        DATA / "shalek2014_bmdc_lps_timecourse.h5ad",
        ["--protocol", "heldout-time", "--heldout", "4h", *SHALEK],
    ),
    "shalek_6h": (
        DATA / "shalek2014_bmdc_lps_timecourse.h5ad",
        ["--protocol", "heldout-time", "--heldout", "6h", *SHALEK],
    ),
    "kang_cd4t": (
        DATA / "kang2018_pbmc_ifnb_muscat_subset.h5ad",
        ["--protocol", "heldout-group", "--heldout", "CD4 T cells", *KANG],
    ),
    "kang_cd14mono": (
        DATA / "kang2018_pbmc_ifnb_muscat_subset.h5ad",
        ["--protocol", "heldout-group", "--heldout", "CD14+ Monocytes", *KANG],
    ),
    # The package's simulator (seed 0: 400 clones x 2 cells at 0h, 2h, 6h, 12h), written into the workdir.
    "simulated_6h": (None, ["--protocol", "heldout-time", "--heldout", "6h", "--time-key", "time", "--source", "0h"]),
    "simulated_12h": (
        None,
        ["--protocol", "heldout-time", "--heldout", "12h", "--time-key", "time", "--source", "0h"],
    ),
}
# The metrics shown in the tables (metrics.csv has them all).
SHOWN = [
    "pearson_delta",
    "pearson_delta_top20_de",
    "mse",
    "mae",
    "r2_means",
    "r2_means_top100_de",
    "e_distance_squared",
    "mmd_rbf",
    "wasserstein_per_gene",
    "overlap_at_N",
    "de_direction_match",
    "de_spearman_lfc_sig",
    "token_top25_overlap",
]


def table(metrics: pd.DataFrame) -> str:
    wide = metrics[metrics["metric"].isin(SHOWN)].pivot_table(
        index="method", columns="metric", values="value", dropna=False
    )
    wide = wide[[m for m in SHOWN if m in wide.columns]]
    order = [
        "PerturbGen (this model)",
        "no change",
        "training mean",
        "nearest time point",
        "neighbour interpolation",
        "OT interpolation",
        "linear (PCA + ridge)",
    ]
    wide = wide.reindex([m for m in order if m in wide.index])
    header = "| method | " + " | ".join(wide.columns) + " |"
    lines = [header, "|" + "---|" * (len(wide.columns) + 1)]
    for method, row in wide.iterrows():
        lines.append(f"| {method} | " + " | ".join("n/a" if pd.isna(v) else f"{v:.3g}" for v in row) + " |")
    return "\n".join(lines)


def head_to_head(metrics: pd.DataFrame) -> dict:
    """
    For each baseline: on how many metrics the model is better, of those both have (per evaluated state), by each
    metric's direction in `perturbgen_hf.evaluation.metrics.METRIC_DIRECTIONS`.
    """
    from perturbgen_hf.evaluation.metrics import higher_is_better

    model = "PerturbGen (this model)"
    counts = {}
    for (metric, _, _), part in metrics.groupby(["metric", "time_point", "group"], sort=False):
        values = part.set_index("method")["value"].dropna()
        if model not in values:
            continue
        for baseline, value in values.drop(model).items():
            better = values[model] > value if higher_is_better(metric) else values[model] < value
            won, total = counts.get(baseline, (0, 0))
            counts[baseline] = (won + int(better), total + 1)
    return {baseline: f"{won}/{total}" for baseline, (won, total) in counts.items()}


def main() -> None:
    from perturbgen_hf.cli import main as cli

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where models and outputs go (default: a temporary folder)")
    parser.add_argument("--max-steps", type=int, default=1500, help="training steps per model")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-scale", default="gap", choices=TIME_SCALES, help="see `evaluate --time-scale`")
    parser.add_argument(
        "--models", help="re-score the models an earlier run saved under DIR/<run>/model (no training)"
    )
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="perturbgen_eval_"))
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in args.only or list(RUNS):
        path, options = RUNS[name]
        if path is None:
            path = workdir / "simulated.h5ad"
            if not path.is_file():
                from perturbgen_hf.data import simulate_trajectory

                workdir.mkdir(parents=True, exist_ok=True)
                simulate_trajectory(seed=0).write_h5ad(path)
        out = workdir / name
        started = time.perf_counter()
        reuse = ["--model", str(Path(args.models) / name / "model")] if args.models else []
        code = cli(
            [
                "evaluate",
                str(path),
                "--out",
                str(out),
                *options,
                *reuse,
                "--preset",
                "compact",
                "--max-steps",
                str(args.max_steps),
                "--seed",
                str(args.seed),
                "--time-scale",
                args.time_scale,
                "--overwrite",
                "--no-progress",
            ]
        )
        if code != 0:
            raise SystemExit(f"{name} failed with exit code {code}")
        seconds = time.perf_counter() - started
        metrics = pd.read_csv(out / "metrics.csv")
        summary = json.loads((out / "metrics.json").read_text())
        previous = results.get(name, {})
        results[name] = {
            "command": shlex.join(["perturbgen-hf", "evaluate", path.name, *options]),
            # With --models: the seconds of the run that trained the model, and of this scoring.
            "seconds": previous.get("seconds") if args.models else round(seconds, 1),
            "scoring_seconds": round(seconds, 1) if args.models else None,
            "cells": summary["cells"],
            "settings": summary["settings"],
            "best_method": summary["best_method"],
            "model_better_than": head_to_head(metrics),
            "metrics": metrics.to_dict(orient="records"),
        }
        RESULTS.write_text(json.dumps(results, indent=1, default=float))
        print(
            f"\n### {name} ({seconds:.0f} s)\n\n{table(metrics)}\n\nmodel better than: {head_to_head(metrics)}\n",
            flush=True,
        )


if __name__ == "__main__":
    main()
