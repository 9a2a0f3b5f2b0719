"""
A 20-gene knockout screen over 200 source cells, two ways, on the same model and cells in one run:

- package: `pipeline("perturbation")(cells, screen=genes)`: one control per cell batch shared by every gene, the
  encoder once per distinct source sequence, cross-attention keys/values of the fixed memory once per time point,
  and the changed cells of several genes batched together;
- naive: what the original PerturbGen does, gene by gene: keep the cells that express the gene (its `test_step`
  filter), then run a full control pass and a full perturbed pass (encoder included) on them, recomputing the
  cross-attention keys/values of the memory at every MaskGIT step;
- naive, all cells: the same without the filter (a control and a perturbed pass over every cell, for every gene).

Both give every cell the same random draws (the cell batch's seed and the cell's row), so their predictions must
agree; the script checks it and reports cells x genes per second, the ratio, and the peak memory of each run.

    python benchmarks/perturb.py [--cells 200 --genes 20 --batch-size 32 --iterations 16]

Model: random weights (timing and agreement do not need training), sized for a 2-core CPU but in the proportions of
the real thing (the source the decoder attends to is up to 16x longer than the cell it emits; Geneformer's 2,048
input genes against the original's 150 emitted genes is 14x): a 2-layer, 128-wide BERT encoder reading up to 1,024
genes per cell (the Shalek cells express a median of 1,364), a 2-layer, 128-wide decoder over 500 target genes
emitting up to 64 genes per cell, 2 predicted time points. Cells: the Shalek et al. 2014 LPS
time course (390 cells; the first `--cells`, recycled if needed). Genes: 20 target genes read (within each cell's first 1,024
ranks) in 20% to 95% of these cells, evenly spread over that range. Writes benchmarks/results/perturb.json.
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from transformers import BertConfig


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "expression"
SHALEK = DATA / "shalek2014_bmdc_lps_timecourse.h5ad"


def build_model(folder: Path, cells: ad.AnnData, num_target_genes: int, seed: int) -> None:
    from perturbgen_hf import PerturbGenConfig, PerturbGenForConditionalGeneration, PerturbGenTokenizer

    gene_ids = cells.var["human_ensembl_id"].astype(str).to_numpy()
    tokenizer = PerturbGenTokenizer.fit(cells.X, gene_ids, symbols=cells.var["human_ortholog_symbol"].astype(str))
    # Target genes: the most widely expressed vocabulary genes.
    usable = np.array([tokenizer.resolve_gene(g) is not None for g in gene_ids])
    fraction = np.asarray((cells.X > 0).mean(0)).ravel() * usable
    chosen, seen = [], set()
    for column in np.argsort(-fraction, kind="stable"):
        gene = tokenizer.resolve_gene(gene_ids[column])
        if gene is not None and gene not in seen:
            chosen.append(gene)
            seen.add(gene)
        if len(chosen) == num_target_genes:
            break
    tokenizer.set_target_genes(chosen)
    config = PerturbGenConfig(
        encoder=BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=512,
            max_position_embeddings=1024,
        ).to_dict(),
        decoder_hidden_size=128,
        decoder_num_layers=2,
        decoder_num_heads=4,
        decoder_intermediate_size=512,
        decoder_max_position_embeddings=64,
        time_points=["6h", "10h"],
        time_values=[6.0, 10.0],
        target_genes=chosen,
        num_target_genes=len(chosen),
    )
    torch.manual_seed(seed)
    PerturbGenForConditionalGeneration(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def choose_genes(cells: ad.AnnData, tokenizer, count: int, max_length: int) -> list[str]:
    """`count` target genes read (within the first `max_length` ranks) in 20-95% of the cells, spread evenly."""
    ranked = tokenizer.rank_cells(cells.X, list(cells.var["human_ensembl_id"].astype(str)), max_length)
    read = np.zeros(tokenizer.vocab_size)
    for i in range(len(ranked)):
        read[np.unique(ranked.cell(i))] += 1
    fraction = read / len(ranked)
    candidates = sorted(
        (
            (g, fraction[tokenizer.vocab[g]])
            for g in tokenizer.target_genes
            if 0.2 <= fraction[tokenizer.vocab[g]] <= 0.95
        ),
        key=lambda item: item[1],
    )
    picks = np.linspace(0, len(candidates) - 1, count).round().astype(int)
    return [candidates[i][0] for i in picks]


class _UncachedMemory:
    """Cross-attention keys/values recomputed at every decoder call, as the original does at every MaskGIT step."""

    def __init__(self, layers, memory):
        self.layers, self.memory = layers, memory

    def __iter__(self):
        return (layer.cross_attn.project_key_value(self.memory) for layer in self.layers)


def run_package(folder, cells_path, genes, batch_size, iterations, seed):
    from transformers import pipeline

    import perturbgen_hf  # noqa: F401

    torch.set_num_threads(torch.get_num_threads())
    cells = ad.read_h5ad(cells_path)
    pipe = pipeline("perturbation", model=str(folder), gene_ids="human_ensembl_id")
    start = time.perf_counter()
    result = pipe(
        cells, screen=genes, mode="mask", iterations=iterations, seed=seed, batch_size=batch_size, progress=False
    )
    seconds = time.perf_counter() - start
    obs = result.adata.obs
    per_gene = {}
    for gene in genes:
        label = pipe.tokenizer.resolve_gene(gene)
        rows = (obs["perturbation"] == gene).to_numpy() | (obs["perturbation"] == label).to_numpy()
        per_gene[gene] = {
            "changed": obs["changed"].to_numpy()[rows],
            "control": result.adata.layers["control"][rows],
            "perturbed": result.adata.layers["perturbed"][rows],
        }
    return {"seconds": seconds, "per_gene": per_gene, "peak_rss_mib": _peak_rss_mib(), "summary": result.summary}


def run_naive(folder, cells_path, genes, batch_size, iterations, seed, keep_only_expressing=True):
    import types

    from perturbgen_hf import PerturbGenForConditionalGeneration, PerturbGenTokenizer
    from perturbgen_hf.pipelines import perturb_tokens
    from perturbgen_hf.pipelines.prediction import cell_batch_seed

    cells = ad.read_h5ad(cells_path)
    model = PerturbGenForConditionalGeneration.from_pretrained(folder).eval()
    tokenizer = PerturbGenTokenizer.from_pretrained(folder)
    model.decoder.project_memory = types.MethodType(
        lambda self, memory: _UncachedMemory(self.layers, memory), model.decoder
    )
    config = model.config
    max_length = config.encoder.max_position_embeddings
    start = time.perf_counter()
    ranked = tokenizer.rank_cells(cells.X, list(cells.var["human_ensembl_id"].astype(str)), max_length)
    tokens = [ranked.cell(i) for i in range(len(ranked))]
    capacity = min(config.num_target_genes, config.decoder_max_position_embeddings)
    per_gene = {}
    for gene in genes:
        gene_id = tokenizer.gene_to_id(gene)
        edited = [perturb_tokens(t, [gene_id], "mask", max_length) for t in tokens]
        changed = np.array([flag for _, flag in edited])
        control = np.zeros((len(tokens), 2, config.num_target_genes), dtype=np.float32)
        perturbed = control.copy()
        for batch_start in range(0, len(tokens), batch_size):
            rows = np.arange(batch_start, min(batch_start + batch_size, len(tokens)))
            if keep_only_expressing:  # as the original's test_step: only the cells that express the gene
                rows = rows[changed[rows]]
            if len(rows) == 0:
                continue
            lengths = torch.tensor([min(max(len(tokens[r]) - 2, 1), capacity) for r in rows])
            for source, out in (([tokens[r] for r in rows], control), ([edited[r][0] for r in rows], perturbed)):
                input_ids, attention_mask = _pad(source)
                generator = torch.Generator().manual_seed(cell_batch_seed(seed, batch_start, 0))
                prediction = model.generate(
                    input_ids,
                    attention_mask,
                    sequence_length=lengths,
                    generator=generator,
                    num_iterations=iterations,
                    noise_index=torch.as_tensor(rows - batch_start),
                    num_noise_rows=batch_size,
                )
                out[rows] = prediction.counts.numpy()
        if not keep_only_expressing:  # unchanged cells were predicted twice with the same draws
            perturbed[~changed] = control[~changed]
        per_gene[gene] = {"changed": changed, "control": control, "perturbed": perturbed}
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "per_gene": per_gene, "peak_rss_mib": _peak_rss_mib()}


def _pad(tokens):
    width = max(len(t) for t in tokens)
    input_ids = torch.zeros(len(tokens), width, dtype=torch.long)
    for row, t in enumerate(tokens):
        input_ids[row, : len(t)] = torch.as_tensor(t)
    return input_ids, (input_ids != 0).long()


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _in_child(function, *args):
    """Run in a fresh process, so that each method's peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *args).result()


def compare(package, naive, genes):
    """Largest differences between the two methods' predictions of the changed cells, and agreement of the flags."""
    worst = {"control": 0.0, "perturbed": 0.0}
    same_flags = True
    for gene in genes:
        a, b = package["per_gene"][gene], naive["per_gene"][gene]
        changed = b["changed"]
        same_flags &= bool(np.array_equal(a["changed"][: len(changed)], changed))
        for key in worst:
            # package rows are (time point, cell); naive rows are cells with a time axis
            mine = np.stack([a[key][t * len(changed) : (t + 1) * len(changed)] for t in range(2)], axis=1)
            diff = np.abs(mine[changed] - b[key][changed]) / (np.abs(b[key][changed]) + 1.0)
            worst[key] = max(worst[key], float(diff.max(initial=0.0)))
    return {"same_changed_cells": same_flags, "max_relative_difference": worst}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--genes", type=int, default=20)
    parser.add_argument("--target-genes", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all-cells", action="store_true", help="also time the naive loop without the cell filter")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "perturb.json"))
    args = parser.parse_args(argv)

    from perturbgen_hf import PerturbGenTokenizer

    adata = ad.read_h5ad(SHALEK)
    index = np.arange(args.cells) % adata.n_obs
    cells = adata[index].copy()
    cells.obs_names = [f"cell{i}" for i in range(args.cells)]
    with tempfile.TemporaryDirectory() as tmp:
        folder, cells_path = Path(tmp) / "model", Path(tmp) / "cells.h5ad"
        build_model(folder, adata, args.target_genes, args.seed)
        cells.write_h5ad(cells_path)
        genes = choose_genes(cells, PerturbGenTokenizer.from_pretrained(folder), args.genes, 1024)
        settings = (folder, cells_path, genes, args.batch_size, args.iterations, args.seed)
        package = _in_child(run_package, *settings)
        naive = _in_child(run_naive, *settings)
        naive_all = _in_child(run_naive, *settings, False) if args.all_cells else None
    work = args.cells * len(genes)
    agreement = compare(package, naive, genes)
    changed = sum(int(naive["per_gene"][g]["changed"].sum()) for g in genes)
    results = {
        "cells": args.cells,
        "genes": genes,
        "changed_cells_total": changed,
        "batch_size": args.batch_size,
        "iterations": args.iterations,
        "threads": torch.get_num_threads(),
        "package": {
            "seconds": package["seconds"],
            "cells_x_genes_per_s": work / package["seconds"],
            "peak_rss_mib": package["peak_rss_mib"],
        },
        "naive": {
            "seconds": naive["seconds"],
            "cells_x_genes_per_s": work / naive["seconds"],
            "peak_rss_mib": naive["peak_rss_mib"],
        },
        "speedup": naive["seconds"] / package["seconds"],
        **agreement,
    }
    if naive_all is not None:
        results["naive_all_cells"] = {
            "seconds": naive_all["seconds"],
            "cells_x_genes_per_s": work / naive_all["seconds"],
            "peak_rss_mib": naive_all["peak_rss_mib"],
            "speedup": naive_all["seconds"] / package["seconds"],
            **compare(package, naive_all, genes),
        }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
