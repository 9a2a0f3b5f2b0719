"""
How closely a trained model reproduces time points, trained or not (issue 15): generate every given time point from
source cells, draw Poisson cells around the expected counts (as `evaluate` does) and score their pseudobulk against
all observed cells of that time point, overall and by the genes' observed expression rank. If a held-out time
point scores like the trained ones, time generalises and the limit is the fit itself.

    python benchmarks/trained_time_fit.py MODEL_FOLDER DATA.h5ad --time-key time --source 0h \
        --time-points 2h 4h 6h 9h 12h --time-value-key time_value [--cells 128] [--seed 0]

Writes `benchmarks/results/trained_time_fit.json` (one entry per model folder name) and prints a table.
"""

import argparse
import json
from pathlib import Path

import numpy as np


RESULTS = Path(__file__).resolve().parent / "results" / "trained_time_fit.json"
RANK_BANDS = ((0, 64), (64, 128), (128, 200), (200, None))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a saved PerturbGen model folder")
    parser.add_argument("adata", help="h5ad of raw counts with the source and the scored time points")
    parser.add_argument("--time-key", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--time-points", nargs="+", required=True)
    parser.add_argument("--time-value-key", help="obs column of time values (hours), for time points the model lacks")
    parser.add_argument("--cells", type=int, default=128, help="source cells generated from")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import anndata as ad
    import torch

    from perturbgen_hf.evaluation import metrics
    from perturbgen_hf.io_utils import load_model_folder

    model, tokenizer = load_model_folder(Path(args.model))
    adata = ad.read_h5ad(args.adata)
    times = adata.obs[args.time_key].astype(str).to_numpy()
    source = adata[np.flatnonzero(times == args.source)[: args.cells]]
    batch = tokenizer(source, padding=True, return_tensors="pt", max_length=model.config.max_source_length)
    asked = list(args.time_points)
    if args.time_value_key:  # by value: a model knows only the names of its trained time points
        value_of = adata.obs.groupby(args.time_key, observed=True)[args.time_value_key].first().to_dict()
        asked = [float(value_of[t]) for t in args.time_points]
    with torch.no_grad():
        out = model.generate(
            batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            time_points=asked,
            generator=torch.Generator().manual_seed(args.seed),
        )
    counts = out.counts.numpy()
    observed_all = metrics.log_normalize(tokenizer.target_counts(adata.X, list(adata.var_names)).toarray())
    reference = observed_all[times == args.source].mean(0)
    rng = np.random.default_rng(args.seed)
    rows = {"trained_time_points": list(model.config.time_points), "cells": len(source)}
    print(
        "| time point | trained | mse | pearson_delta | "
        + " | ".join(f"mse, rank {a}-{b or 'end'}" for a, b in RANK_BANDS)
        + " |"
    )
    for k, time_point in enumerate(args.time_points):
        predicted = metrics.log_normalize(rng.poisson(np.clip(counts[:, k], 0.0, None))).mean(0)
        observed = observed_all[times == time_point].mean(0)
        order = np.argsort(-observed)
        bands = [float(np.mean((predicted[order[a:b]] - observed[order[a:b]]) ** 2)) for a, b in RANK_BANDS]
        entry = {
            "trained": time_point in model.config.time_points,
            "mse": metrics.mse(predicted, observed),
            "pearson_delta": metrics.pearson_delta(predicted, observed, reference),
            "mse_by_rank_band": dict(zip([f"{a}-{b or 'end'}" for a, b in RANK_BANDS], bands)),
        }
        rows[time_point] = entry
        print(
            f"| {time_point} | {entry['trained']} | {entry['mse']:.4f} | {entry['pearson_delta']:.3f} | "
            + " | ".join(f"{v:.3f}" for v in bands)
            + " |"
        )
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results[Path(args.model).resolve().parent.name] = rows
    RESULTS.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
