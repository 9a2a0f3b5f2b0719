"""
Tokenizer throughput and peak memory: the package's chunked ranking against a straightforward per-cell reference
(CSR row, normalise, argsort, truncate, as Geneformer does), on the same backed h5ad, checking identical tokens.

    python benchmarks/bench_tokenize.py --cells 200000 --genes 20000 --nnz 2000 --workdir /tmp/bench

Each measurement runs in its own process (started from a parent that stays small: the data are generated in a
separate process too, because Linux carries a parent's peak RSS into `getrusage` of its children). Memory is the
resident set of the measuring process, and the summed resident sets of its worker processes, sampled every
100 ms from /proc (cheap, so it does not slow the run; forked workers share the parent's pages, so the worker
figure counts those again).
- reference: per cell, its row of a 2,048-cell chunk read from the backed file; the tokens of all cells are kept
  in memory, as Geneformer's tokenizer does before saving, and written to an Arrow file after the timed part.
- package: `PerturbGenTokenizer.rank_to_arrow`, with 1 and 2 processes: chunks are ranked and written to Arrow
  files as they are done (the timed part includes the writing).
- in memory, on one core (pinned): the same two methods on a `--memory-cells` CSR matrix already in memory,
  alternating three times, best of each (`PerturbGenTokenizer.rank_cells` against the reference's loop).
Both outputs are then compared cell by cell. The input sizes are a quarter of `--cells` and `--cells`, to show
whether memory grows with the number of cells. Results go to benchmarks/results/tokenize.json.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import psutil
import pyarrow as pa
import scipy.sparse as sp

from perturbgen_hf.tokenization import PerturbGenTokenizer
from perturbgen_hf.tokenization.tokenization_perturbgen import RankedCells, ranked_to_arrow, write_arrow_stream


CHUNK = 2048


def synthetic_counts(cells, genes, nnz, seed=0):
    """A CSR matrix of `cells` x `genes` integer counts with `nnz` non-zero genes per cell."""
    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, cells, 10_000):
        n = min(10_000, cells - start)
        columns = np.sort(np.stack([rng.choice(genes, nnz, replace=False) for _ in range(n)]), axis=1)
        values = rng.geometric(0.3, size=(n, nnz)).astype(np.float32)
        indptr = np.arange(0, n * nnz + 1, nnz)
        blocks.append(sp.csr_matrix((values.ravel(), columns.ravel(), indptr), shape=(n, genes)))
    return sp.vstack(blocks).tocsr()


def synthetic_h5ad(path, cells, genes, nnz, seed=0):
    adata = ad.AnnData(synthetic_counts(cells, genes, nnz, seed))
    adata.var_names = [f"ENSG{i:011d}" for i in range(genes)]
    adata.write_h5ad(path)  # uncompressed: the layout for streaming


def benchmark_tokenizer(genes, max_length):
    gene_ids = [f"ENSG{i:011d}" for i in range(genes)]
    medians = np.random.default_rng(1).uniform(0.5, 5.0, genes)
    return gene_ids, PerturbGenTokenizer.from_vocabulary(gene_ids, medians, model_max_length=max_length)


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


class PeakRSS:
    """Peak resident set of this process and the summed peak of its children, sampled in a thread."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start_mib = self.process.memory_info().rss / 2**20
        self.self_mib, self.children_mib, self.running = self.start_mib, 0.0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.self_mib = max(self.self_mib, self.process.memory_info().rss / 2**20)
            total = 0.0
            for child in self.process.children(recursive=True):
                try:
                    total += child.memory_info().rss / 2**20
                except psutil.Error:  # a worker may exit while sampled
                    continue
            self.children_mib = max(self.children_mib, total)
            time.sleep(0.1)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def measure(args):
    """One timed run (in this process); prints a JSON line."""
    gene_ids, tokenizer = benchmark_tokenizer(args.genes, args.max_length)
    backed = ad.read_h5ad(args.input, backed="r")
    output = Path(args.tokens_out)
    output.mkdir(parents=True, exist_ok=True)
    with PeakRSS() as memory:
        start = time.perf_counter()
        if args.measure == "reference":
            tokens = reference_tokenize(backed.X, gene_ids, tokenizer, args.max_length)
        else:
            tokenizer.rank_to_arrow(
                backed.X, gene_ids, output, args.max_length, chunk_size=CHUNK, num_proc=args.num_proc
            )
        seconds = time.perf_counter() - start
    if args.measure == "reference":
        offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in tokens], out=offsets[1:])
        write_arrow_stream(
            output / "tokens-00000.arrow", ranked_to_arrow(RankedCells(offsets, np.concatenate(tokens)))
        )
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cells_per_s": backed.n_obs / seconds,
                "rss_at_start_mib": memory.start_mib,
                "peak_rss_mib": memory.self_mib,
                "peak_workers_rss_mib": memory.children_mib,
            }
        )
    )


def measure_in_memory(args):
    """
    Both methods on one in-memory CSR matrix, pinned to one core, alternating three times (best of each); checks
    that every cell's tokens agree. Prints a JSON line.
    """
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    gene_ids, tokenizer = benchmark_tokenizer(args.genes, args.max_length)
    counts = synthetic_counts(args.memory_cells, args.genes, args.nnz, seed=1)
    seconds = {"reference": [], "package": []}
    for _ in range(3):
        start = time.perf_counter()
        reference = reference_tokenize(counts, gene_ids, tokenizer, args.max_length)
        seconds["reference"].append(time.perf_counter() - start)
        start = time.perf_counter()
        package = tokenizer.rank_cells(counts, gene_ids, args.max_length, chunk_size=CHUNK)
        seconds["package"].append(time.perf_counter() - start)
    different = sum(not np.array_equal(package.cell(i), reference[i]) for i in range(len(reference)))
    best = {kind: min(values) for kind, values in seconds.items()}
    print(
        json.dumps(
            {
                "cells": args.memory_cells,
                "reference_cells_per_s": args.memory_cells / best["reference"],
                "package_cells_per_s": args.memory_cells / best["package"],
                "speedup": best["reference"] / best["package"],
                "seconds": seconds,
                "cells_with_different_tokens": int(different),
            }
        )
    )


def run_measurement(args, kind, num_proc, path, out):
    command = [
        sys.executable,
        __file__,
        "--measure",
        kind,
        "--num-proc",
        str(num_proc),
        "--input",
        str(path),
        "--tokens-out",
        str(out),
        "--genes",
        str(args.genes),
        "--max-length",
        str(args.max_length),
        "--workdir",
        args.workdir,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def cells_of(folder):
    for path in sorted(Path(folder).glob("tokens-*.arrow")):
        for batch in pa.ipc.open_stream(pa.memory_map(str(path))):
            column = batch.column(0)
            offsets, values = column.offsets.to_numpy(), column.values.to_numpy()
            for i in range(len(column)):
                yield values[offsets[i] : offsets[i + 1]]


def count_differences(folder_a, folder_b):
    checked, different = 0, 0
    for a, b in zip(cells_of(folder_a), cells_of(folder_b), strict=True):
        checked += 1
        different += not np.array_equal(a, b)
    return checked, different


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=2_000, help="non-zero genes per cell")
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--workdir", required=True, help="folder for the synthetic h5ad files and outputs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "tokenize.json"))
    parser.add_argument(
        "--memory-cells", type=int, default=20_000, help="cells of the in-memory, one-core comparison (0: skip it)"
    )
    parser.add_argument("--measure", choices=["reference", "package", "in-memory"], help=argparse.SUPPRESS)
    parser.add_argument("--num-proc", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--tokens-out", help=argparse.SUPPRESS)
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        return synthetic_h5ad(args.generate, args.cells, args.genes, args.nnz)
    if args.measure == "in-memory":
        return measure_in_memory(args)
    if args.measure:
        return measure(args)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = {"genes": args.genes, "nnz_per_cell": args.nnz, "chunk_size": CHUNK, "runs": []}
    if args.memory_cells:
        command = [sys.executable, __file__, "--measure", "in-memory", "--workdir", args.workdir]
        command += ["--memory-cells", str(args.memory_cells), "--genes", str(args.genes), "--nnz", str(args.nnz)]
        command += ["--max-length", str(args.max_length)]
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        results["in_memory_one_core"] = json.loads(result.stdout.strip().splitlines()[-1])
        print(json.dumps(results["in_memory_one_core"]), flush=True)
    for cells in (args.cells // 4, args.cells):
        path = workdir / f"synthetic_{cells}x{args.genes}x{args.nnz}.h5ad"
        if not path.exists():
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--generate",
                    str(path),
                    "--cells",
                    str(cells),
                    "--genes",
                    str(args.genes),
                    "--nnz",
                    str(args.nnz),
                    "--workdir",
                    args.workdir,
                ],
                check=True,
            )
        run = {"cells": cells, "reference": run_measurement(args, "reference", 1, path, workdir / "reference")}
        for num_proc in (1, 2):
            out = workdir / f"package_{num_proc}"
            for old in out.glob("tokens-*.arrow"):
                old.unlink()
            result = run_measurement(args, "package", num_proc, path, out)
            result["speedup"] = result["cells_per_s"] / run["reference"]["cells_per_s"]
            result["cells_checked"], result["cells_with_different_tokens"] = count_differences(
                workdir / "reference", out
            )
            run[f"package_num_proc_{num_proc}"] = result
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
