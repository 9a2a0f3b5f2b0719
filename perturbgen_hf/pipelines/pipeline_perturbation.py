"""
The "perturbation" pipeline: predict how perturbing genes in source cells changes the cells at later time points.

    import perturbgen_hf
    from transformers import pipeline
    pipe = pipeline("perturbation", model="org/perturbgen-lps")
    result = pipe(source_adata, genes=["IL1B"], mode="mask", time_points=["6h", "10h"], seed=0)
    result.adata, result.de, result.summary

The model is duck-typed (`generate`, `config`), so the pipeline also runs as remote code.
"""

import logging

import anndata as ad
import numpy as np
import pandas as pd
import torch
from transformers import Pipeline

from .perturbation_edits import MODES, perturb_tokens
from .perturbation_result import PerturbationResult, paired_differential_expression


logger = logging.getLogger(__name__)

_PREPROCESS_KEYS = ("genes", "screen", "mode", "site", "gene_ids", "layer", "group_key", "method")
_FORWARD_KEYS = ("time_points", "num_samples", "iterations", "temperature", "seed", "cell_batch_size")


class PerturbationPipeline(Pipeline):
    """
    In silico perturbation with a PerturbGen model (see the module docstring).

    Call arguments (also accepted by `pipeline(...)` itself):
        genes (`list[str]`): genes perturbed together (symbols or Ensembl IDs). screen (`list[str]`): genes perturbed
            one at a time instead. mode (`str`, defaults to `"mask"`): `mask`, `pad`, `delete` or `overexpress`.
        site (`str`, defaults to `"src"`): where the edit is made (only the source cell for now).
        method (`str`, defaults to `"generate"`): MaskGIT generation of the future states.
        time_points (`list`): names or values of the predicted time points (default: the model's).
        num_samples (`int`, defaults to 1): generations averaged per cell. iterations (`int`, defaults to 16),
            temperature (`float`, defaults to 1.0): MaskGIT settings. seed (`int`, defaults to 0).
        batch_size (`int`, defaults to 32): cells per generation batch.
        gene_ids (`str` or `list`): var column (or list) of the source's gene identifiers (default: var_names).
        layer (`str`): layer of raw counts instead of X. group_key (`str`): obs column for per-group statistics.

    Returns:
        [`PerturbationResult`].
    """

    _load_tokenizer = True
    _load_feature_extractor = False
    _load_image_processor = False
    _load_processor = False

    def __call__(self, source, **kwargs):
        if "batch_size" in kwargs:  # the cells' batch size, not the base class's batching of inputs
            kwargs["cell_batch_size"] = kwargs.pop("batch_size")
        return super().__call__(source, **kwargs)

    def _sanitize_parameters(self, **kwargs):
        if "batch_size" in kwargs:
            kwargs["cell_batch_size"] = kwargs.pop("batch_size")
        unknown = sorted(set(kwargs) - set(_PREPROCESS_KEYS) - set(_FORWARD_KEYS))
        if unknown:
            raise TypeError(f"Unknown perturbation argument(s): {unknown}.")
        preprocess = {k: v for k, v in kwargs.items() if k in _PREPROCESS_KEYS and v is not None}
        forward = {k: v for k, v in kwargs.items() if k in _FORWARD_KEYS and v is not None}
        return preprocess, forward, {}

    # -- preprocess: tokenize, resolve genes, edit ---------------------------------------------------------------

    def preprocess(self, source, genes=None, screen=None, mode="mask", site="src", gene_ids=None, layer=None,
                   group_key=None, method="generate"):  # fmt: skip
        adata = self._read_source(source)
        if mode not in MODES:
            raise ValueError(f"Unknown mode {mode!r}; choose one of {list(MODES)}.")
        if site != "src":
            raise ValueError(f"site={site!r} is not available yet; perturb the source cell (site='src').")
        if method != "generate":
            raise ValueError(f"method={method!r} is not available yet; use method='generate'.")
        perturbations = _perturbation_sets(genes, screen)
        ids = {gene: self.tokenizer.gene_to_id(gene) for names in perturbations for gene in names}
        config = self.model.config
        max_length = getattr(config, "max_source_length", None) or config.encoder.max_position_embeddings
        counts, identifiers = _counts_and_genes(adata, gene_ids, layer)
        ranked = self.tokenizer.rank_cells(counts, identifiers, max_length)
        cells = [ranked.cell(i) for i in range(len(ranked))]
        variants, unaffected = [], {}
        for names in perturbations:
            label = "+".join(names)
            edited = [perturb_tokens(c, [ids[g] for g in names], mode, max_length) for c in cells]
            changed = np.array([flag for _, flag in edited])
            if not changed.any():
                raise ValueError(
                    f"No source cell expresses {label} among the {max_length - 2} top-ranked genes the model reads (mode "
                    f"{mode!r}): a knockout would change nothing. Check the gene, or use mode='overexpress'."
                )
            unaffected[label] = int((~changed).sum())
            if unaffected[label]:
                logger.info("%d of %d cells do not express %s: their prediction equals the control.",
                            unaffected[label], len(cells), label)  # fmt: skip
            variants.append({"label": label, "tokens": [t for t, _ in edited], "changed": changed})
        groups = None
        if group_key is not None:
            if group_key not in adata.obs.columns:
                raise KeyError(f"group_key {group_key!r} is not an obs column; available: {list(adata.obs.columns)}.")
            groups = adata.obs[group_key].astype(str).to_numpy()
        return {
            "cells": cells, "variants": variants, "cell_ids": adata.obs_names.astype(str).to_numpy(), "groups": groups,
            "summary": {"cells": len(cells), "cells_unaffected": unaffected, "mode": mode, "site": site},
        }  # fmt: skip

    def _read_source(self, source):
        if isinstance(source, ad.AnnData):
            adata = source
        else:
            adata = ad.read_h5ad(str(source))  # FileNotFoundError names a missing file
        if adata.n_obs == 0:
            raise ValueError("The source AnnData has no cells.")
        return adata

    # -- forward: one control per cell batch, perturbed variants with the same random draws ----------------------

    def _forward(self, inputs, time_points=None, num_samples=1, iterations=16, temperature=1.0, seed=0,
                 cell_batch_size=None):  # fmt: skip
        cell_batch_size = cell_batch_size or getattr(self, "_batch_size", None) or 32
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        cells = inputs["cells"]
        config = self.model.config
        if time_points is not None:
            time_points = [_as_time_point(t, config) for t in time_points]
        capacity = min(config.num_target_genes, config.decoder_max_position_embeddings - len(config.condition_tokens))
        settings = {"time_points": time_points, "num_iterations": iterations, "temperature": temperature}
        control, perturbed = [], {v["label"]: [] for v in inputs["variants"]}
        for start in range(0, len(cells), cell_batch_size):
            batch = slice(start, start + cell_batch_size)
            # As many genes as the (unperturbed) source cell expresses, within what the decoder can emit.
            lengths = torch.tensor([min(max(len(c) - 2, 1), capacity) for c in cells[batch]])
            # Every variant of this batch reuses the control's lengths and seeds: only the edit differs.
            reference = self._generate(cells[batch], lengths, seed, start, num_samples, settings)
            control.append(reference)
            for variant in inputs["variants"]:
                changed = variant["changed"][batch]
                if not changed.any():
                    perturbed[variant["label"]].append(reference)
                    continue
                result = self._generate(variant["tokens"][batch], lengths, seed, start, num_samples, settings)
                perturbed[variant["label"]].append(result)
        return {**inputs, "control": _stack(control), "perturbed": {k: _stack(v) for k, v in perturbed.items()},
                "settings": {**settings, "num_samples": num_samples, "seed": seed}}  # fmt: skip

    def _generate(self, tokens, lengths, seed, offset, num_samples, settings):
        width = max(len(t) for t in tokens)
        input_ids = torch.zeros(len(tokens), width, dtype=torch.long)
        for row, t in enumerate(tokens):
            input_ids[row, : len(t)] = torch.as_tensor(t, dtype=torch.long)
        attention_mask = (input_ids != 0).long()
        device = self.model.device
        counts, embeddings = 0.0, 0.0
        for sample in range(num_samples):
            generator = torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + offset * 131 + sample)
            out = self.model.generate(input_ids.to(device), attention_mask.to(device), sequence_length=lengths.to(device),
                                      generator=generator, **settings)  # fmt: skip
            counts = counts + out.counts.float().cpu().numpy()
            embeddings = embeddings + out.cell_embeddings.float().cpu().numpy()
        return {"counts": counts / num_samples, "embeddings": embeddings / num_samples,
                "time_values": out.time_values.cpu().numpy()}  # fmt: skip

    # -- postprocess: AnnData, statistics, summary ---------------------------------------------------------------

    def postprocess(self, outputs):
        config = self.model.config
        time_values = outputs["control"]["time_values"]
        names = [_time_name(config, v) for v in time_values]
        genes = list(config.target_genes or [f"gene_{i}" for i in range(config.num_target_genes)])
        symbols = [self.tokenizer.gene_symbols.get(g, g) for g in genes]
        blocks, tables = [], []
        for label, predicted in outputs["perturbed"].items():
            variant = next(v for v in outputs["variants"] if v["label"] == label)
            for t, (name, value) in enumerate(zip(names, time_values)):
                control, perturbed = outputs["control"]["counts"][:, t], predicted["counts"][:, t]
                obs = pd.DataFrame({
                    "cell_id": outputs["cell_ids"], "time_point": name, "time_value": float(value), "perturbation": label,
                    "group": outputs["groups"] if outputs["groups"] is not None else "all",
                    "changed": variant["changed"],
                    "cosine_similarity": _cosine(outputs["control"]["embeddings"][:, t], predicted["embeddings"][:, t]),
                })  # fmt: skip
                blocks.append((obs, control, perturbed))
                tables += _de_tables(control, perturbed, symbols, obs, label, name)
        obs = pd.concat([b[0] for b in blocks], ignore_index=True)
        obs.index = obs.index.astype(str)
        adata = ad.AnnData(
            X=np.vstack([b[2] for b in blocks]).astype(np.float32), obs=obs,
            var=pd.DataFrame({"gene_symbol": symbols}, index=pd.Index(genes, name="gene_id")),
            layers={"control": np.vstack([b[1] for b in blocks]).astype(np.float32),
                    "perturbed": np.vstack([b[2] for b in blocks]).astype(np.float32)},
        )  # fmt: skip
        summary = {**outputs["summary"], "perturbations": list(outputs["perturbed"]), "time_points": names}
        settings = {
            k: (list(map(str, v)) if isinstance(v, (list, tuple)) else v) for k, v in outputs["settings"].items()
        }
        return PerturbationResult(adata=adata, de=pd.concat(tables, ignore_index=True), summary=summary,
                                  config={**settings, "mode": summary["mode"], "site": summary["site"],
                                          "genes_to_perturb": summary["perturbations"]})  # fmt: skip


def _perturbation_sets(genes, screen):
    if genes is not None and screen is not None:
        raise ValueError("Give `genes` (perturbed together) or `screen` (one at a time), not both.")
    if screen is not None:
        sets = [[g] for g in screen]
    elif genes is not None:
        sets = [list(genes)] if not isinstance(genes, str) else [[genes]]
    else:
        raise ValueError("Name the genes to perturb: genes=[...] or screen=[...].")
    if not sets or not all(sets):
        raise ValueError("The list of genes to perturb is empty.")
    return sets


def _counts_and_genes(adata, gene_ids, layer):
    if isinstance(gene_ids, str):
        if gene_ids not in adata.var.columns:
            raise KeyError(f"gene_ids {gene_ids!r} is not a var column; available: {list(adata.var.columns)}.")
        identifiers = ["" if pd.isna(g) else str(g) for g in adata.var[gene_ids]]
    else:
        identifiers = list(gene_ids) if gene_ids is not None else list(adata.var_names)
    if layer is not None:
        if layer not in adata.layers:
            raise KeyError(f"No layer {layer!r}; available: {list(adata.layers.keys())}.")
        return adata.layers[layer], identifiers
    return adata.X, identifiers


def _stack(parts):
    return {
        key: np.concatenate([p[key] for p in parts]) if key != "time_values" else parts[0][key] for key in parts[0]
    }


def _cosine(a, b):
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.where(norms > 0, norms, 1.0)


def _as_time_point(value, config):
    """A name of the model's time points, or a number (also given as text, e.g. from a command line)."""
    if isinstance(value, str) and value not in config.time_points:
        try:
            return float(value)
        except ValueError:
            raise ValueError(
                f"Unknown time point {value!r}; this model knows {config.time_points} (or give a number)."
            ) from None
    return value


def _time_name(config, value):
    for name, known in zip(config.time_points, config.time_values):
        if abs(known - value) < 1e-9:
            return name
    return f"{value:g}"


def _de_tables(control, perturbed, symbols, obs, label, time_point):
    tables = []
    groups = obs["group"].to_numpy()
    for group in ["all", *sorted(set(groups) - {"all"})]:
        rows = np.ones(len(groups), dtype=bool) if group == "all" else groups == group
        table = paired_differential_expression(control[rows], perturbed[rows], symbols)
        table.insert(0, "group", group)
        table.insert(0, "time_point", time_point)
        table.insert(0, "perturbation", label)
        tables.append(table)
    return tables
