"""
Tokenizer throughput and peak memory: the package's chunked ranking against a straightforward per-cell reference
(CSR row, normalise, argsort, truncate, as Geneformer does), on the same backed h5ad, checking identical tokens.

    python benchmarks/bench_tokenize.py --cells 200000 --genes 20000 --nnz 2000 --workdir /tmp/bench

Writes benchmarks/results/tokenize.json. Peak memory is measured with tracemalloc (numpy reports its buffers to it)
at two input sizes, to show whether it grows with the number of cells.
"""

import argparse
import json
import time
import tracemalloc
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from perturbgen_hf.tokenization import PerturbGenTokenizer


CHUNK = 2048


def synthetic_h5ad(path, cells, genes, nnz, seed=0):
    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, cells, 10_000):
        n = min(10_000, cells - start)
        columns = np.sort(np.stack([rng.choice(genes, nnz, replace=False) for _ in range(n)]), axis=1)
        values = rng.geometric(0.3, size=(n, nnz)).astype(np.float32)
        indptr = np.arange(0, n * nnz + 1, nnz)
        blocks.append(sp.csr_matrix((values.ravel(), columns.ravel(), indptr), shape=(n, genes)))
    adata = ad.AnnData(sp.vstack(blocks).tocsr())
    adata.var_names = [f"ENSG{i:011d}" for i in range(genes)]
    adata.write_h5ad(path)  # uncompressed: the layout for streaming


def reference_tokenize(X, gene_ids, tokenizer, max_length):
    """Per cell: its CSR row, normalise, divide by medians, argsort (ties by token id), truncate."""
    token_of = np.array([tokenizer.vocab[g] for g in gene_ids])
    medians = np.array([tokenizer.gene_medians[g] for g in gene_ids])
    out = []
    for start in range(0, X.shape[0], CHUNK):
        chunk = X[start : start + CHUNK]
        for i in range(chunk.shape[0]):
            row = chunk[i]
            data = row.data.astype(np.float64)
            values = data / data.sum() * 10_000 / medians[row.indices]
            tokens = token_of[row.indices]
            order = np.lexsort((tokens, -values))[: max_length - 2]
            out.append(np.concatenate([[2], tokens[order], [3]]).astype(np.int32))
    return out


def package_tokenize(X, gene_ids, tokenizer, max_length):
    ranked = tokenizer.rank_cells(X, gene_ids, max_length, chunk_size=CHUNK, check_counts=True)
    return ranked


def measure(function, *args):
    tracemalloc.start()
    start = time.perf_counter()
    result = function(*args)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, seconds, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=2_000, help="non-zero genes per cell")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--workdir", required=True, help="folder for the synthetic h5ad files")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tokenize.json"))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    gene_ids = [f"ENSG{i:011d}" for i in range(args.genes)]
    medians = np.random.default_rng(1).uniform(0.5, 5.0, args.genes)
    tokenizer = PerturbGenTokenizer.from_vocabulary(gene_ids, medians, model_max_length=args.max_length)
    results = {"cells": args.cells, "genes": args.genes, "nnz_per_cell": args.nnz, "runs": []}
    for cells in (args.cells // 4, args.cells):
        path = workdir / f"synthetic_{cells}x{args.genes}.h5ad"
        if not path.exists():
            synthetic_h5ad(path, cells, args.genes, args.nnz)
        backed = ad.read_h5ad(path, backed="r")
        ours, ours_s, ours_peak = measure(package_tokenize, backed.X, gene_ids, tokenizer, args.max_length)
        reference, ref_s, ref_peak = measure(reference_tokenize, backed.X, gene_ids, tokenizer, args.max_length)
        identical = len(reference) == len(ours) and all(
            np.array_equal(reference[i], ours.cell(i)) for i in range(len(reference))
        )
        run = {
            "cells": cells,
            "identical_tokens": identical,
            "package_cells_per_s": cells / ours_s,
            "reference_cells_per_s": cells / ref_s,
            "speedup": ref_s / ours_s,
            "package_peak_mib": ours_peak / 2**20,
            "reference_peak_mib": ref_peak / 2**20,
        }
        results["runs"].append(run)
        print(json.dumps(run))
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
