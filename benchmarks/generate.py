"""
Generation throughput: cells per second of `model.generate` and of a knockout screen through the perturbation
pipeline, per preset and batch size, with peak memory and the model FLOP utilisation (issue 20).

    python benchmarks/generate.py                                   # compact and base on this CPU
    python benchmarks/generate.py --device cuda --dtype bfloat16 --batch-sizes 32 128 512 --compile

Models have random weights in the preset's sizes (throughput does not depend on training); the source cells are
synthetic (`--source-length` expressed genes each, integer counts), the decoder emits `--target-length` genes over
`--time-points` time points with `--iterations` MaskGIT steps. Attention runs on
`torch.nn.functional.scaled_dot_product_attention` in the decoder and on transformers' "sdpa" in the BERT encoder.

FLOPs per cell are counted by torch's `FlopCounterMode` on one eager `generate` (matrix multiplications and
attention, as they ran), so the model FLOP utilisation is `FLOPs per cell x cells/s / peak FLOP/s`; the peak comes from `--peak-tflops`, or from the GPU's name
for the GPUs listed in `PEAK_TFLOPS` (dense bf16), and is not reported on a CPU without `--peak-tflops`.

Writes `benchmarks/results/generate.json` (or `--out`).
"""

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch


RESULTS = Path(__file__).resolve().parent / "results" / "generate.json"
# Dense bf16 tensor-core peaks (TFLOP/s) of the GPUs this benchmark may meet.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def flops_per_cell(model, input_ids, iterations: int) -> float:
    """
    FLOPs of generating one cell, counted by `torch.utils.flop_counter.FlopCounterMode` on one eager `generate` of
    `input_ids` (matrix multiplications and attention; what actually ran, including the extra greedy steps that
    resolve duplicate proposals), divided by the number of cells.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.generate(input_ids, (input_ids != 0).long(), num_iterations=iterations,
                       generator=torch.Generator(device=input_ids.device).manual_seed(0))  # fmt: skip
    return counter.get_total_flops() / len(input_ids)


def build_model(preset: str, num_genes: int, target_length: int, num_time_points: int, seed: int):
    from transformers import BertConfig

    from perturbgen_hf import PerturbGenConfig, PerturbGenForConditionalGeneration
    from perturbgen_hf.settings import PRESETS

    sizes = PRESETS[preset]
    times = [float(2 * (k + 1)) for k in range(num_time_points)]
    encoder = BertConfig(vocab_size=num_genes + 4, max_position_embeddings=4096, **sizes["encoder"])
    config = PerturbGenConfig(
        encoder=encoder.to_dict(),
        **sizes["decoder"],
        decoder_max_position_embeddings=target_length,
        time_points=[f"{t:g}h" for t in times],
        time_values=times,
        target_genes=[f"ENSG{g:011d}" for g in range(min(2000, num_genes))],
    )
    torch.manual_seed(seed)
    return PerturbGenForConditionalGeneration(config).eval()


def synthetic_cells(num_cells: int, num_genes: int, expressed: int, seed: int):
    """AnnData of integer counts: `expressed` genes per cell, gene ids matching `build_model`'s target genes."""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(num_cells), expressed)
    cols = np.concatenate([rng.choice(num_genes, expressed, replace=False) for _ in range(num_cells)])
    counts = rng.negative_binomial(2, 0.3, size=len(rows)).astype(np.float32) + 1
    matrix = sp.csr_matrix((counts, (rows, cols)), shape=(num_cells, num_genes))
    adata = ad.AnnData(matrix)
    adata.var_names = [f"ENSG{g:011d}" for g in range(num_genes)]
    adata.obs_names = [f"cell_{c}" for c in range(num_cells)]
    return adata


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak so far


def time_generate(model, input_ids, batch_size, iterations, device, repeats=1):
    """Cells/s of `generate` over `input_ids` in batches (after one warm-up batch)."""

    def run(rows):
        ids = input_ids[rows].to(device)
        with torch.inference_mode():
            model.generate(ids, (ids != 0).long(), num_iterations=iterations,
                           generator=torch.Generator(device=device).manual_seed(0))  # fmt: skip

    run(slice(0, batch_size))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(repeats):
        for first in range(0, len(input_ids), batch_size):
            run(slice(first, first + batch_size))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return repeats * len(input_ids) / (time.perf_counter() - start)


def time_screen(model, tokenizer, cells, genes, batch_size, iterations, device):
    """(cells x genes)/s of a knockout screen through the pipeline (its default num_samples, no sham null)."""
    from transformers import pipeline

    pipe = pipeline("perturbation", model=model, tokenizer=tokenizer, device=device)
    start = time.perf_counter()
    pipe(cells, screen=genes, mode="delete", iterations=iterations, batch_size=batch_size, null_perturbations=0,
         progress=False)  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(cells) * len(genes) / (time.perf_counter() - start)


def tokenizer_for(adata, model):
    from perturbgen_hf import PerturbGenTokenizer

    # Every gene in the vocabulary (ids in var order, as `build_model` assumes), median 1: synthetic data.
    tokenizer = PerturbGenTokenizer.from_vocabulary(list(adata.var_names), np.ones(adata.n_vars))
    tokenizer.set_target_genes(list(model.config.target_genes))
    return tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["compact", "base"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--cells", type=int, default=32, help="cells per measurement")
    parser.add_argument("--source-length", type=int, default=1024, help="expressed genes per source cell")
    parser.add_argument("--target-length", type=int, default=128, help="genes emitted per cell and time point")
    parser.add_argument("--time-points", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--genes", type=int, default=2500, help="genes in the vocabulary")
    parser.add_argument("--screen-genes", type=int, default=4, help="genes of the screen (0: no screen)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder layers")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s, for the FLOP utilisation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    import perturbgen_hf  # noqa: F401  (registers the pipeline)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    peak = args.peak_tflops
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if peak is None and device.type == "cuda":
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    adata = synthetic_cells(args.cells, args.genes, args.source_length, args.seed)
    rows = []
    for preset in args.presets:
        model = build_model(preset, args.genes, args.target_length, args.time_points, args.seed)
        model.to(device=device, dtype=dtype)
        tokenizer = tokenizer_for(adata, model)
        ranked = tokenizer.rank_cells(adata.X, list(adata.var_names), args.source_length + 2)
        width = max(len(ranked.cell(i)) for i in range(len(ranked)))
        input_ids = torch.zeros(len(ranked), width, dtype=torch.long)
        for i in range(len(ranked)):
            input_ids[i, : len(ranked.cell(i))] = torch.as_tensor(ranked.cell(i))
        flops = flops_per_cell(model, input_ids[: min(4, len(input_ids))].to(device), args.iterations)
        if args.compile:  # after the FLOP count, which runs eagerly
            for layer in model.decoder.layers:
                layer.forward = torch.compile(layer.forward, dynamic=True)
        for batch_size in args.batch_sizes:
            cells_per_s = time_generate(model, input_ids, batch_size, args.iterations, device)
            achieved = flops * cells_per_s / 1e12
            row = {"preset": preset, "batch_size": batch_size, "generate_cells_per_s": cells_per_s,
                   "gflops_per_cell": flops / 1e9, "achieved_tflops": achieved,
                   "mfu": achieved / peak if peak else None, "peak_memory_mib": peak_memory_mib(device),
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "encoder_attention": model.encoder.config._attn_implementation}  # fmt: skip
            if args.screen_genes:
                genes = list(model.config.target_genes[: args.screen_genes])
                row["screen_cells_x_genes_per_s"] = time_screen(model, tokenizer, adata, genes, batch_size,
                                                                args.iterations, device)  # fmt: skip
            rows.append(row)
            print(json.dumps(row))
    result = {"device": name, "device_type": device.type, "dtype": args.dtype, "compile": args.compile,
              "threads": torch.get_num_threads(), "peak_tflops": peak, "settings": vars(args), "runs": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
