"""
How the perturbation pipeline's work is cut and put back together: model calls of `batch_size` rows, the units a
`torchrun` / `accelerate launch` process takes, and the assembly of every unit's predictions into arrays over all
cells (see the pipeline's module docstring).
"""

import itertools

import numpy as np
import torch


def process_state():
    """
    Accelerate's `PartialState` of this process: under `torchrun` / `accelerate launch` it joins the process group
    (gloo on CPU-only machines, where accelerate would otherwise treat each process as alone).
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def process_grid():
    """`(rank, world size)` of a `torchrun` / `accelerate launch` run; `(0, 1)` otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    state = process_state()
    return state.process_index, state.num_processes


def model_calls(variants, num_rows, batch_size, one_variant):
    """Slices of rows for one model call each: `batch_size` rows at most and, with `one_variant`, rows of one
    perturbation only (`variants[i]`: row `i`'s, in runs; `None`: the control).
    """
    starts = [0]
    if one_variant and variants is not None:
        starts += [i for i in range(1, num_rows) if variants[i] is not variants[i - 1]]
    bounds = [*starts, num_rows]
    for first, last in itertools.pairwise(bounds):
        for begin in range(first, last, batch_size):
            yield slice(begin, min(begin + batch_size, last))


def public_prediction(prediction):
    """What a unit reports of a control: no hidden states (only used in-process for the per-gene shifts)."""
    return {k: v for k, v in prediction.items() if k not in ("hidden", "start")}


def assemble(results, num_cells, num_variants, config):
    """Put the units' results (from any process, in any order) back into whole arrays."""
    results = sorted(results, key=lambda r: r["start"])
    controls = [r["control"] for r in results if r["control"] is not None]
    control = {key: concat_ragged([c[key] for c in controls]) for key in ("counts", "embeddings", "sequences")}
    time_values = controls[0]["time_values"][0]
    # An unaffected cell's genes keep their embeddings exactly (cosine 1); genes it does not predict have none.
    unaffected = np.where(_gene_presence(control["sequences"], config), 1.0, np.nan).astype(np.float32)
    perturbed = []
    for index in range(num_variants):
        merged = {
            "counts": control["counts"].copy(),
            "embeddings": control["embeddings"].copy(),
            "gene_cosine": unaffected.copy(),
            "changed": np.zeros(num_cells, dtype=bool),
        }
        for result in results:
            part = result["variants"].get(index)
            if part is None or len(part["rows"]) == 0:
                continue
            rows = part["rows"]
            for key in ("counts", "embeddings", "gene_cosine"):
                merged[key][rows] = part[key]
            merged["changed"][rows] = True
        perturbed.append(merged)
    return {"control": control, "perturbed": perturbed, "time_values": time_values}


def concat_ragged(arrays):
    """Concatenate along rows; sequences `(rows, S, T, L)` and hidden states `(rows, S, T, L, H)` of different batches
    may differ in `L` and are padded with 0 (`<pad>`) to the longest.
    """
    if arrays[0].ndim < 4:
        return np.concatenate(arrays)
    width = max(a.shape[3] for a in arrays)
    padded = []
    for a in arrays:
        pad = [(0, 0)] * a.ndim
        pad[3] = (0, width - a.shape[3])
        padded.append(np.pad(a, pad))
    return np.concatenate(padded)


def average_samples(outputs):
    """Counts and embeddings averaged over samples; sequences and hidden states of each sample (for gene shifts)."""
    return {
        "counts": np.mean([o.counts.float().cpu().numpy() for o in outputs], axis=0),
        "embeddings": np.mean([o.cell_embeddings.float().cpu().numpy() for o in outputs], axis=0),
        "sequences": np.stack([o.sequences.cpu().numpy() for o in outputs], axis=1),  # (rows, samples, T, L)
        "hidden": np.stack([o.decoder_hidden_states.float().cpu().numpy() for o in outputs], axis=1),
        "time_values": np.repeat(outputs[0].time_values.cpu().numpy()[None], len(outputs[0].counts), axis=0),
    }


def _gene_presence(sequences, config):
    """`(cells, T, genes)`: whether a gene is in a cell's control prediction (any sample)."""
    cells, _, times, _ = sequences.shape
    present = np.zeros((cells, times, config.num_target_genes), dtype=bool)
    genes = sequences - config.first_gene_token_id
    c, s, t, p = np.nonzero((genes >= 0) & (genes < config.num_target_genes))
    present[c, t, genes[c, s, t, p]] = True
    return present
