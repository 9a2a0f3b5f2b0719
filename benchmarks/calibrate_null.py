"""
How often the perturbation statistics call an effect that is not there (issue 14), on real data:

- the scenario that exposed the paired tests: a `tiny` model trained `--steps` (default 20 and 200) on the
  Shalek et al. 2014 LPS time course (source 1h), TNF knocked out in the first `--cells` (20) 1h cells, judged
  against `--shams` (10) matched sham knockouts. Reported: the median and largest |log2 fold change|, the genes the
  old paired Wilcoxon test calls (BH < 0.05), and those the null calls (BH < FDR and |log2 fold change| >= floor);
- sham against shams: each sham knockout, as if it were the perturbation, judged against the other shams (the
  empirical null is exchangeable with a sham, so about 5% of p-values fall below 0.05 and nothing is significant);
- seed against seeds: the control prediction under seed 0 judged against the controls under `--seeds` other seeds
  (the "effect" of nothing but the random draws).

Every rate is the share of gene x time point tests. Writes benchmarks/results/calibrate_null.json.

    python benchmarks/calibrate_null.py [--workdir DIR] [--steps 20 200] [--cells 20] [--shams 10] [--seeds 10]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "expression"
SHALEK = DATA / "shalek2014_bmdc_lps_timecourse.h5ad"
RESULTS = Path(__file__).resolve().parent / "results" / "calibrate_null.json"


def train_model(folder: Path, steps: int) -> Path:
    from perturbgen_hf.training import main as train_main

    out = folder / f"model_{steps}"
    code = train_main(
        [
            "--data",
            str(folder / "tokens"),
            "--out",
            str(out),
            "--preset",
            "tiny",
            "--max_steps",
            str(steps),
            "--use_cpu",
            "--report_to",
            "none",
            "--eval_fraction",
            "0",
            "--seed",
            "0",
        ]
    )
    if code != 0:
        raise SystemExit(f"training {steps} steps failed ({code})")
    return out


def rates(tables) -> dict:
    """Shares of tests with p < 0.05, BH-adjusted p < 0.05, and significant, over the given tables."""
    p = np.concatenate([t["p_value"].to_numpy() for t in tables])
    q = np.concatenate([t["p_adjusted"].to_numpy() for t in tables])
    significant = np.concatenate([t["significant"].to_numpy() for t in tables])
    return {
        "tests": int(p.size),
        "p_below_0.05": float((p < 0.05).mean()),
        "bh_below_0.05": float((q < 0.05).mean()),
        "significant": int(significant.sum()),
    }


def calibrate(model: Path, cells, num_shams: int, num_seeds: int) -> dict:
    from transformers import pipeline

    from perturbgen_hf.pipelines.perturbation_result import differential_expression_against_null

    pipe = pipeline("perturbation", model=str(model), gene_ids="human_ensembl_id", batch_size=len(cells))
    genes = list(pipe.model.config.target_genes)
    result = pipe(cells, genes=["TNF"], mode="mask", seed=0, null_perturbations=num_shams, progress=False)
    de = result.de[result.de["group"] == "all"]
    knockout = {
        "median_abs_log2fc": float(de["log2_fold_change"].abs().median()),
        "max_abs_log2fc": float(de["log2_fold_change"].abs().max()),
        "paired_wilcoxon_bh_below_0.05": int((de["wilcoxon_p_adjusted"] < 0.05).sum()),
        "significant_against_null": int(de["significant"].sum()),
        "tests": len(de),
        "p_below_0.05": float((de["p_value"] < 0.05).mean()),
    }

    # Each sham, as if it were the perturbation, against the others (the same predictions the null used: same seed).
    shams = list(result.summary["null_genes"]["TNF"])
    screen = pipe(cells, screen=[g[0] for g in shams], mode="mask", seed=0, null_perturbations=0, progress=False)
    tables = []
    for name in screen.summary["time_points"]:
        at = screen.adata[screen.adata.obs["time_point"] == name]
        control = at[at.obs["perturbation"] == shams[0][0]].layers["control"]
        predicted = [at[at.obs["perturbation"] == g[0]].layers["perturbed"] for g in shams]
        for k in range(len(predicted)):
            others = predicted[:k] + predicted[k + 1 :]
            tables.append(differential_expression_against_null(control, predicted[k], others, genes, bootstrap=0))

    # Seed 0's control against the controls of other seeds.
    controls = []
    for seed in range(num_seeds + 2):
        run = pipe(cells, genes=["TNF"], mode="mask", seed=seed, null_perturbations=0, progress=False)
        controls.append(run.adata[run.adata.obs["perturbation"] == "TNF"])
    seed_tables = []
    for name in result.summary["time_points"]:
        at = [c[c.obs["time_point"] == name].layers["control"] for c in controls]
        seed_tables.append(differential_expression_against_null(at[0], at[1], at[2:], genes, bootstrap=0))
    return {
        "knockout_tnf": knockout,
        "sham_against_shams": rates(tables),
        "seed_against_seeds": rates(seed_tables),
        "sham_genes": [g[0] for g in shams],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="Where the tokens and models go (default: a temp dir)."
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 200], help="Training steps of each model.")
    parser.add_argument("--cells", type=int, default=20, help="1h source cells perturbed.")
    parser.add_argument("--shams", type=int, default=10, help="Sham knockouts in the null.")
    parser.add_argument("--seeds", type=int, default=10, help="Other seeds the control of seed 0 is judged against.")
    args = parser.parse_args(argv)

    import anndata as ad

    from perturbgen_hf.data import tokenize_anndata

    folder = args.workdir or Path(tempfile.mkdtemp(prefix="calibrate_null_"))
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "tokens").exists():
        tokenize_anndata(
            SHALEK,
            folder / "tokens",
            time_key="time",
            time_value_key="time_h",
            source="1h",
            gene_id_key="human_ensembl_id",
            n_hvg=500,
            include_genes=["TNF"],
            progress=False,
        )
    adata = ad.read_h5ad(SHALEK)
    cells = adata[adata.obs["time"] == "1h"][: args.cells].copy()
    runs = {}
    for steps in args.steps:
        start = time.perf_counter()
        runs[f"{steps}_steps"] = {
            **calibrate(train_model(folder, steps), cells, args.shams, args.seeds),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(f"{steps} steps:", json.dumps(runs[f"{steps}_steps"], indent=1))
    RESULTS.write_text(
        json.dumps({"settings": vars(args) | {"workdir": str(folder)}, "runs": runs}, indent=2, default=str)
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
