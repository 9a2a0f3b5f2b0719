"""
Time-resolved gene embeddings: a gene's final decoder hidden state, averaged over the cells where the model predicts
it, per predicted time point (and per group of cells).

    from perturbgen_hf.pipelines import embed_genes
    embeddings = embed_genes(model, tokenizer, source_adata, time_points=["2h", "6h"], group_key="cell_type")
    embeddings.layers["6h"]            # genes x hidden: the mean hidden state at 6h
    embeddings.obsm["n_cells"]         # how many cells each mean is over

By default the future cells are generated from the source cells by [`generate_cells`], the perturbation pipeline's
own way (so the generated cells are the pipeline's control cells for the same seed and batch size), and a gene's
embedding is read where the model itself puts the gene. With `targets` (observed target cells, one row per source cell) the observed cells
are read out teacher-forced instead, as the original PerturbGen extracted its gene embeddings.

The result is an AnnData of genes (rows) x hidden units, so that scanpy works on it directly (`sc.pp.neighbors`,
`sc.tl.leiden`, `sc.tl.umap`); see `perturbgen_hf.analysis.gene_programs` for the gene programs built on it.
"""

import logging

import anndata as ad
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..tokenization import log_normalize
from .inputs import as_list, as_time_point, counts_and_gene_ids, rank_observed_targets, read_cells, time_point_name
from .prediction import generate_cells, pad_cells, pad_targets


logger = logging.getLogger(__name__)

ALL_CELLS = "all"
# `uns` key of the record of how the embeddings were made.
UNS_KEY = "perturbgen_embedding"


def layer_name(time_point: str, group: str | None = None) -> str:
    """Name of the embedding layer of a time point (pooled over groups) or of one group at a time point."""
    return str(time_point) if group is None else f"{time_point} | {group}"


def embed_genes(
    model,
    tokenizer,
    source,
    time_points=None,
    group_key: str | None = None,
    targets: dict | None = None,
    gene_ids=None,
    layer: str | None = None,
    num_samples: int = 1,
    iterations: int = 16,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> ad.AnnData:
    r"""
    Mean decoder hidden state of every target gene, per predicted time point (and per group of source cells).

    Args:
        model ([`PerturbGenForConditionalGeneration`]): a trained model (duck-typed: `generate`, `readout`,
            `gene_index`, `config`).
        tokenizer ([`PerturbGenTokenizer`]): its tokenizer.
        source (`AnnData` or `str`): source-state cells (raw counts), or an h5ad path.
        time_points (`list`, *optional*): names or values of the time points to embed (default: the model's). With
            `targets`, the time points are those of `targets`.
        group_key (`str`, *optional*): obs column of the source cells (e.g. `cell_type`): embeddings are also
            averaged per group, in layers named `"{time point} | {group}"`.
        targets (`dict`, *optional*): `{time point: AnnData or h5ad path}` of observed target cells, one row per
            source cell in the source's order; they are read out teacher-forced instead of generated.
        gene_ids (`str` or `list`, *optional*): var column (or list) of the source's gene identifiers.
        layer (`str`, *optional*): layer of raw counts instead of `X`.
        num_samples (`int`, defaults to 1): generations per source cell (each adds its cells to the means).
        iterations (`int`, defaults to 16), temperature (`float`, defaults to 1.0): MaskGIT settings.
        batch_size (`int`, defaults to 32): source cells per model call.
        seed (`int`, defaults to 0): seeds the generation; the same seed gives the same embeddings.
        progress (`bool`, defaults to `True`): show a progress bar.

    Returns:
        `anndata.AnnData` of shape `(num_target_genes, decoder_hidden_size)`: `obs` indexed by gene id with
        `gene_symbol`; `X` the mean over every time point and group; `layers[time point]` (and
        `layers["{time point} | {group}"]`) the mean at that time point (0 where the gene was never predicted);
        `obsm["n_cells"]` (`pd.DataFrame`, one column per layer) the number of cells each mean is over;
        `obsm["predicted_expression"]` (`pd.DataFrame`, one column per time point and per layer) the mean predicted
        log1p counts per 10,000 of every gene over all cells (the count head's output, whether the gene's token
        was generated or not); `uns["perturbgen_embedding"]` how the embeddings were made.
    """
    config = model.config
    for name, value in (("num_samples", num_samples), ("iterations", iterations), ("batch_size", batch_size)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if not config.target_genes:
        raise ValueError(
            "This model has no target-gene vocabulary (config.target_genes is empty), so its gene embeddings cannot "
            "be named; train it on data with gene identifiers."
        )
    adata = read_cells(source, "source")
    counts, identifiers = counts_and_gene_ids(adata, gene_ids, layer)
    tokenizer.resolve_genes(identifiers)  # one clear error when no gene of the data is in the vocabulary
    groups = _groups(adata, group_key)
    max_length = getattr(config, "max_source_length", None) or config.encoder.max_position_embeddings
    ranked = tokenizer.rank_cells(counts, identifiers, max_length)
    cells = [ranked.cell(i) for i in range(len(ranked))]
    observed = None
    if targets is not None:
        if time_points is not None:
            raise ValueError("With `targets` the embedded time points are those of `targets`; leave time_points out.")
        observed = rank_observed_targets(config, tokenizer, targets, len(cells), gene_ids, layer)
        time_names = observed["time_points"]
        time_values = [config.time_value(t) for t in time_names]
    else:
        time_names, time_values = _generated_time_points(config, time_points)
    sums = _Sums(len(time_names), len(groups["names"]), config.num_target_genes, config.decoder_hidden_size)
    if observed is None:
        library = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        settings = (int(batch_size), int(num_samples), int(iterations), float(temperature), int(seed), library)
        batches = generate_cells(
            model, cells, time_values, *settings, output_hidden_states=True, progress=progress, desc="gene embeddings"
        )
        outputs = ((rows, out) for rows, _, _, out in batches)
    else:
        outputs = _readouts(model, observed, cells, int(batch_size), progress)
    for rows, out in outputs:
        sums.add(
            model.gene_index(out.sequences).cpu().numpy(),
            out.decoder_hidden_states.float().cpu().numpy(),
            out.counts.float().cpu().numpy(),
            groups["index"][rows],
        )
    record = {
        "method": "teacher_forced" if observed is not None else "generate",
        "group_key": group_key,
        "num_source_cells": len(cells),
        "num_samples": int(num_samples) if observed is None else 1,
        "iterations": int(iterations),
        "temperature": float(temperature),
        "seed": int(seed),
        "model": str(getattr(config, "_name_or_path", "") or ""),
    }
    return _as_anndata(sums, config, tokenizer, time_names, time_values, groups, record)


def _generated_time_points(config, time_points):
    """Names and values of the time points to generate, ascending (as `generate` returns them)."""
    requested = as_list(time_points) or list(config.time_points)
    resolved = [as_time_point(t, config) for t in requested]
    values = [config.time_value(t) if isinstance(t, str) else float(t) for t in resolved]
    if len(set(values)) != len(values):
        raise ValueError(f"time_points {requested} name a time point twice.")
    values = sorted(values)
    return [time_point_name(config, v) for v in values], values


def _groups(adata, group_key):
    if group_key is None:
        return {"names": [], "index": np.full(adata.n_obs, -1)}
    if group_key not in adata.obs.columns:
        raise KeyError(f"group_key {group_key!r} is not an obs column; available: {list(adata.obs.columns)}.")
    labels = adata.obs[group_key].astype(str).to_numpy()
    names = list(dict.fromkeys(labels))
    return {"names": names, "index": np.array([names.index(x) for x in labels])}


@torch.inference_mode()
def _readouts(model, observed, cells, batch_size, progress):
    """Teacher-forced readouts of the observed target cells, `batch_size` source cells at a time."""
    targets = observed["tokens"]
    for start in tqdm(range(0, len(cells), batch_size), desc="gene embeddings", unit="batch", disable=not progress):
        rows = np.arange(start, min(start + batch_size, len(cells)))
        input_ids, attention_mask = pad_cells([cells[r] for r in rows], model.device)
        decoder_input_ids = pad_targets(targets, rows, model.device)
        library = torch.as_tensor(observed["library_size"][rows], dtype=torch.float32, device=model.device)
        out = model.readout(
            input_ids,
            decoder_input_ids,
            observed["time_points"],
            attention_mask,
            library_size=library,
            output_hidden_states=True,
        )
        yield rows, out


class _Sums:
    """Running sums of hidden states, cell counts and predicted expression per time point, group and gene."""

    def __init__(self, num_times, num_groups, num_genes, hidden_size):
        # One slot per group plus one for all cells (the last).
        slots = num_groups + 1
        self.hidden = np.zeros((num_times, slots, num_genes, hidden_size))
        self.n_cells = np.zeros((num_times, slots, num_genes), dtype=np.int64)
        self.expression = np.zeros((num_times, slots, num_genes))
        self.cells = np.zeros((num_times, slots), dtype=np.int64)

    def add(self, gene_index, hidden, counts, group_index):
        """
        Args:
            gene_index (`np.ndarray` of shape `(batch, num_times, length)`): target-gene column per position, -1
                elsewhere. hidden (`np.ndarray` of shape `(batch, num_times, length, hidden)`).
            counts (`np.ndarray` of shape `(batch, num_times, num_genes)`): predicted counts.
            group_index (`np.ndarray` of shape `(batch,)`): group of each cell (-1 without groups).
        """
        expression = np.stack([log_normalize(counts[:, t]) for t in range(counts.shape[1])], axis=1)
        for slot_of_cell in (np.full(len(group_index), -1), group_index):
            if slot_of_cell is group_index and (group_index < 0).all():
                continue
            for t in range(gene_index.shape[1]):
                cell, position = np.nonzero(gene_index[:, t] >= 0)
                genes = gene_index[cell, t, position]
                slots = slot_of_cell[cell]
                np.add.at(self.hidden[t], (slots, genes), hidden[cell, t, position])
                np.add.at(self.n_cells[t], (slots, genes), 1)
                np.add.at(self.expression[t], slot_of_cell, expression[:, t])
                np.add.at(self.cells[t], slot_of_cell, 1)


def _as_anndata(sums, config, tokenizer, time_names, time_values, groups, record):
    genes = list(config.target_genes)
    symbols = [tokenizer.gene_symbols.get(g, g) for g in genes]
    means = sums.hidden / np.maximum(sums.n_cells, 1)[..., None]
    layers, n_cells, expression = {}, {}, {}
    slots = [(None, -1)] + [(name, i) for i, name in enumerate(groups["names"])]
    for t, time_name in enumerate(time_names):
        for group, slot in slots:
            name = layer_name(time_name, group)
            layers[name] = means[t, slot].astype(np.float32)
            n_cells[name] = sums.n_cells[t, slot]
            expression[name] = sums.expression[t, slot] / max(int(sums.cells[t, slot]), 1)
    pooled = sums.hidden[:, -1].sum(axis=0) / np.maximum(sums.n_cells[:, -1].sum(axis=0), 1)[:, None]
    obs = pd.DataFrame({"gene_symbol": symbols}, index=pd.Index(genes, name="gene_id"))
    embeddings = ad.AnnData(X=pooled.astype(np.float32), obs=obs, layers=layers)
    embeddings.obsm["n_cells"] = pd.DataFrame(n_cells, index=obs.index)
    embeddings.obsm["predicted_expression"] = pd.DataFrame(expression, index=obs.index)
    embeddings.uns[UNS_KEY] = {
        **{k: v for k, v in record.items() if v is not None},
        "time_points": list(time_names),
        "time_values": [float(v) for v in time_values],
        "groups": list(groups["names"]),
        "layers": list(layers),
        "definition": "mean final decoder hidden state of the gene over the cells where its token is "
        + ("observed (teacher-forced)" if record["method"] == "teacher_forced" else "generated"),
    }
    never = int((sums.n_cells[:, -1].sum(axis=0) == 0).sum())
    if never:
        logger.info("%d of %d target genes were never predicted: their embeddings are 0.", never, len(genes))
    return embeddings


def embedding_layers(embeddings: ad.AnnData, groups: bool = False) -> list[str]:
    """The embedding layers of each time point (pooled over groups), or of each time point and group."""
    record = embeddings.uns.get(UNS_KEY)
    if record is None:
        raise ValueError(f"This AnnData has no uns[{UNS_KEY!r}]: it was not written by embed_genes.")
    times, names = list(record["time_points"]), list(record.get("groups", []))
    if groups and names:
        return [layer_name(t, g) for t in times for g in names]
    return [layer_name(t) for t in times]
