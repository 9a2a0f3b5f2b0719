"""
Gene programs from time-resolved gene embeddings, checked where the answer is known (issue 18).

- The simulator, whose network is known: a model is trained in the demo's settings (`perturbgen-hf demo`), the gene
  embeddings of every 0h cell are read (`embed_genes`, the demo's generation settings), programs are found, and their
  membership is compared with the true modules (regulator r, its direct and its second-tier targets) by the
  adjusted Rand index over the network's genes. The Leiden resolution is chosen on a validation simulation (seed 1,
  its own model) and scored once on seed 0 (the demo's). Beside it, with the same clustering and the same choice:
  the genes' observed expression across cells (z-scored log1p CP10k at every later time point), i.e. what plain
  co-expression of the data gives.
- The Shalek et al. 2014 LPS time course: a `compact` model (source 1h, predicted 2h, 4h, 6h; 500 genes, the known
  genes kept) is trained as `evaluate` trains, `perturbgen-hf embed --time-key time` runs at its defaults, and the
  program of each known gene and the activities of those programs are reported.

Writes `benchmarks/results/gene_programs.json`.

    python benchmarks/gene_programs.py [--workdir DIR] [--max-steps 1500] [--only simulator|shalek]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "expression"
RESULTS = Path(__file__).resolve().parent / "results" / "gene_programs.json"
RESOLUTIONS = (0.5, 1.0, 2.0)
INTERFERON = ["CCL5", "CXCL10", "RSAD2", "IFIT1", "IFIT3", "ISG15", "MX1"]
PRIMARY = ["EGR1", "TNF", "IER3", "NFKBIA", "CXCL2", "IL1B"]


def true_modules(symbols) -> np.ndarray:
    """Module of each simulated gene: r for REGr and its targets T{r}_..., 0 for genes outside the network."""
    modules = []
    for symbol in symbols:
        if symbol.startswith("REG"):
            modules.append(int(symbol[3:]))
        elif symbol.startswith("T"):
            modules.append(int(symbol[1:].split("_")[0]))
        else:
            modules.append(0)
    return np.array(modules)


def module_scores(programs: pd.Series, modules: np.ndarray) -> dict:
    """ARI over the network's genes (and over all genes, outside genes as one class), and per module the share of
    its genes in its most common program and that program's share of module genes (purity)."""
    from sklearn.metrics import adjusted_rand_score

    labels = programs.to_numpy()
    network = modules > 0
    scores = {
        "ari_network_genes": float(adjusted_rand_score(modules[network], labels[network])),
        "ari_all_genes": float(adjusted_rand_score(modules, labels)),
        "modules": {},
    }
    for module in sorted(set(modules[network])):
        members = labels[modules == module]
        top = pd.Series(members).value_counts().index[0]
        scores["modules"][f"REG{module}"] = {
            "genes": len(members),
            "program": str(top),
            "recall": float(np.mean(members == top)),
            "purity": float(np.mean(modules[labels == top] == module)),
        }
    return scores


def coexpression_programs(adata: ad.AnnData, genes, resolution: float, seed: int) -> pd.Series:
    """Programs of the genes' observed expression across cells, with the clustering `find_gene_programs` uses."""
    import scanpy as sc

    from perturbgen_hf.tokenization import log_normalize

    columns = [list(adata.var_names).index(g) for g in genes]
    blocks = []
    for time_point in list(dict.fromkeys(adata.obs["time"].astype(str)))[1:]:
        counts = adata[(adata.obs["time"].astype(str) == time_point).to_numpy()].X.toarray()
        values = log_normalize(counts.astype(np.float64))[:, columns]
        blocks.append(((values - values.mean(0)) / (values.std(0) + 1e-8)).T)
    features = ad.AnnData(np.concatenate(blocks, axis=1).astype(np.float32))
    sc.pp.pca(features, n_comps=30, random_state=seed)
    sc.pp.neighbors(features, n_neighbors=15, use_rep="X_pca", random_state=seed)
    sc.tl.leiden(features, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    return pd.Series(features.obs["leiden"].astype(str).to_numpy(), index=list(genes))


def simulator_run(workdir: Path, seed: int) -> dict:
    from transformers import AutoModel, AutoTokenizer

    from perturbgen_hf.analysis import find_gene_programs
    from perturbgen_hf.commands.demo_workflow import run_demo
    from perturbgen_hf.data import simulate_trajectory
    from perturbgen_hf.pipelines.gene_embeddings import embed_genes
    from perturbgen_hf.settings import DemoSettings

    settings = DemoSettings(seed=seed)
    folder = workdir / f"demo_seed{seed}"
    started = time.perf_counter()
    if not (folder / "model" / "model.safetensors").is_file():
        run_demo(folder, settings, progress=False, overwrite=folder.exists())
    demo = json.loads((folder / "summary.json").read_text())
    model = AutoModel.from_pretrained(folder / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    simulation = simulate_trajectory(
        num_clones=settings.num_clones, cells_per_clone=settings.cells_per_clone, seed=seed
    )
    source = simulation[(simulation.obs["time"].astype(str) == "0h").to_numpy()]
    embeddings = embed_genes(
        model,
        tokenizer,
        source,
        iterations=settings.iterations,
        num_samples=settings.num_samples,
        temperature=settings.temperature,
        seed=seed,
        batch_size=64,
        progress=False,
    )
    symbols = dict(zip(simulation.var_names, simulation.var["gene_symbol"]))
    embeddings.obs["gene_symbol"] = [symbols[g] for g in embeddings.obs_names]
    runs = {}
    for resolution in RESOLUTIONS:
        programs = find_gene_programs(embeddings, resolution=resolution, seed=seed)
        members = programs.membership
        modules = true_modules(members["gene_symbol"])
        coexpressed = coexpression_programs(simulation, members["gene_id"], resolution, seed)
        runs[str(resolution)] = {
            "programs": len(programs.summary),
            "genes_clustered": len(members),
            "model": module_scores(members["program"], modules),
            "observed_coexpression": module_scores(
                coexpressed.reindex(members["gene_id"]).reset_index(drop=True), modules
            ),
            "top_changing": programs.summary.sort_values("change", ascending=False)
            .head(3)[["program", "size", "hubs", "change", "trend"]]
            .to_dict("records"),
        }
    knockouts = regulator_knockouts(folder, settings, simulation)
    return {
        "seed": seed,
        "seconds": time.perf_counter() - started,
        "resolutions": runs,
        "knockout_auroc": knockouts,
        "demo_knockout_auroc": demo["auroc"],
        "demo_knockout_pearson": demo["pearson"],
    }


def regulator_knockouts(folder: Path, settings, simulation: ad.AnnData) -> dict:
    """AUROC of each regulator's predicted knockout effects against the simulator's truth, per time point, on the
    demo's held-out source cells with the demo's settings: whether the model reads every regulator."""
    from transformers import pipeline

    from perturbgen_hf.commands.demo_workflow import _split_clones, _with_symbols
    from perturbgen_hf.data import simulate_trajectory
    from perturbgen_hf.data.simulate import true_effects
    from perturbgen_hf.evaluation.effects import effect_scores

    heldout = _split_clones(simulation, settings.heldout_fraction, settings.seed)
    source = _with_symbols(simulation[heldout & (simulation.obs["time"].astype(str) == "0h").to_numpy()])
    pipe = pipeline("perturbation", model=str(folder / "model"), gene_ids="gene_id")
    regulators = list(simulation.uns["network"]["regulators"])
    result = pipe(
        source,
        screen=regulators,
        mode="delete",
        iterations=settings.iterations,
        num_samples=settings.num_samples,
        temperature=settings.temperature,
        seed=settings.seed,
        null_perturbations=0,
        progress=False,
    )
    scores = {}
    for regulator in regulators:
        knocked = simulate_trajectory(
            num_clones=settings.num_clones,
            cells_per_clone=settings.cells_per_clone,
            seed=settings.seed,
            knockout=[regulator],
        )
        truth = true_effects(simulation[heldout], knocked[heldout])
        scores[regulator] = {}
        for time_point in ["2h", "6h", "12h"]:
            true_t = truth[(truth["time_point"] == time_point) & (truth["gene_symbol"] != regulator)]
            true_t = true_t.set_index("gene_symbol")["log2_fold_change"]
            de = result.de[
                (result.de["time_point"] == time_point)
                & (result.de["group"] == "all")
                & (result.de["perturbation"] == regulator)
            ]
            predicted = de.set_index("gene")["log2_fold_change"].reindex(true_t.index).fillna(0.0)
            scores[regulator][time_point] = effect_scores(predicted.to_numpy(), true_t.to_numpy())["auroc"]
    return scores


def shalek_run(workdir: Path, max_steps: int, seed: int) -> dict:
    from perturbgen_hf.cli import main as cli
    from perturbgen_hf.data import tokenize_anndata
    from perturbgen_hf.settings import EvaluationSettings
    from perturbgen_hf.training import train_on_cpu

    data = DATA / "shalek2014_bmdc_lps_timecourse.h5ad"
    folder = workdir / "shalek"
    started = time.perf_counter()
    settings = EvaluationSettings(max_steps=max_steps, seed=seed)
    if not (folder / "model" / "model.safetensors").is_file():
        tokenize_anndata(
            data,
            folder / "tokens",
            time_key="time",
            time_value_key="time_h",
            source="1h",
            n_hvg=settings.n_hvg,
            include_genes=INTERFERON + PRIMARY,
            pairing="transport",
            seed=seed,
            max_length=settings.max_source_length,
            progress=False,
        )
        train_on_cpu(folder / "tokens", folder / "model", settings, log_every=max(1, max_steps // 10))
    trained = time.perf_counter() - started
    out = folder / "embed"
    code = cli(
        [
            "embed",
            "--model",
            str(folder / "model"),
            "--adata",
            str(data),
            "--out",
            str(out),
            "--time-key",
            "time",
            "--seed",
            str(seed),
            "--label-genes",
            *INTERFERON,
            *PRIMARY,
            "--overwrite",
        ]
    )
    if code != 0:
        raise SystemExit(f"perturbgen-hf embed failed with exit code {code}")
    members = pd.read_csv(out / "gene_programs.csv")
    activity = pd.read_csv(out / "program_activity.csv")
    summary = pd.read_csv(out / "program_summary.csv")
    placed = members.set_index("gene_symbol")["program"]
    known = {g: (placed[g] if g in placed.index else None) for g in INTERFERON + PRIMARY}
    chosen = sorted({p for p in known.values() if p is not None}, key=lambda p: int(p[1:]))
    curves = {}
    for program in chosen:
        part = activity[activity["program"] == program]
        curves[program] = {
            "size": int(summary.set_index("program").loc[program, "size"]),
            "hubs": summary.set_index("program").loc[program, "hubs"],
            "predicted": dict(zip(part["time_point"], part["predicted"].round(3))),
            "observed": dict(zip(part["time_point"], part["observed"].round(3))),
        }
    return {
        "train_seconds": trained,
        "seconds": time.perf_counter() - started,
        "max_steps": max_steps,
        "programs": len(summary),
        "genes_clustered": len(members),
        "known_genes": known,
        "program_activity": curves,
        "screen_genes": (out / "screen_genes.txt").read_text().splitlines()[1:],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="where models and outputs go (default: a temporary folder)")
    parser.add_argument("--max-steps", type=int, default=1500, help="training steps of the Shalek model")
    parser.add_argument("--only", choices=["simulator", "shalek"], help="run one part")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gene_programs_"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.only in (None, "simulator"):
        validation = simulator_run(workdir, seed=1)
        chosen = max(RESOLUTIONS, key=lambda r: validation["resolutions"][str(r)]["model"]["ari_network_genes"])
        chosen_coexpression = max(
            RESOLUTIONS, key=lambda r: validation["resolutions"][str(r)]["observed_coexpression"]["ari_network_genes"]
        )
        test = simulator_run(workdir, seed=0)
        results["simulator"] = {
            "validation_seed_1": validation,
            "chosen_resolution": chosen,
            "chosen_resolution_coexpression": chosen_coexpression,
            "test_seed_0": test,
            "scored": {
                "model": test["resolutions"][str(chosen)]["model"],
                "observed_coexpression": test["resolutions"][str(chosen_coexpression)]["observed_coexpression"],
            },
        }
        print(json.dumps(results["simulator"]["scored"], indent=1))
    if args.only in (None, "shalek"):
        results["shalek"] = shalek_run(workdir, args.max_steps, args.seed)
        print(json.dumps(results["shalek"], indent=1, default=str))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {RESULTS} (work in {workdir})")


if __name__ == "__main__":
    main()
