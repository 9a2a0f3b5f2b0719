"""
The "perturbation" pipeline: predict how perturbing genes in source cells changes the cells at later time points.

    import perturbgen_hf
    from transformers import pipeline
    pipe = pipeline("perturbation", model="org/perturbgen-lps")
    result = pipe(source_adata, genes=["IL1B"], mode="mask", time_points=["6h", "10h"], seed=0)
    result.adata, result.de, result.summary

How the work is organised (and why):

- The source cells are cut into batches of `batch_size` cells. Every cell of a batch has its own row of random
  draws, made from a generator seeded by `(seed, batch start, sample)`; the control run and every perturbed run of a
  cell use that same row (`noise_index` of `generate`), so control and perturbed differ by the edit alone, and the
  result does not depend on how the perturbed rows are grouped.
- The control of a batch is generated once and shared by every perturbation of a screen; a perturbed run holds only
  the cells its edit changes (the others are the control by construction), and the changed cells of several
  perturbations go through the model together, `batch_size` rows at a time.
- The work is a grid of units (cell batch x chunk of `variants_per_batch` perturbations), fixed by the data and not
  by the number of processes. Launched under `torchrun` / `accelerate launch`, each process takes a contiguous share
  of the units and the results are gathered, so every process returns the same result as a single-process run.

The model is duck-typed (`generate`, `readout`, `config`), so the pipeline also runs as remote code.

The generation path is `prediction.py`; the work's cutting and assembly `sharding.py`; inputs `inputs.py`; edits
`perturbation_edits.py`; statistics and the saved result `perturbation_result.py`.
"""

import logging

import anndata as ad
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import Pipeline

from ..settings import PERTURBATION_ARGUMENTS
from .inputs import (
    as_list,
    as_time_point,
    check_choice,
    counts_and_gene_ids,
    rank_observed_targets,
    read_cells,
    time_point_name,
)
from .perturbation_edits import (
    MODES,
    edit_target_batch,
    expression_profile,
    matched_null_genes,
    perturb_target_tokens,
    perturb_tokens,
)
from .perturbation_result import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_FDR,
    DEFAULT_MIN_ABS_LOG2FC,
    PerturbationResult,
    _significant_calls,
    check_significance_settings,
    cosine,
    de_tables,
    gene_cosine,
    sorted_by_significance,
    with_gene_shift,
)
from .prediction import cell_batch_seed, generation_lengths, pad_cells, pad_targets
from .sharding import (
    assemble,
    average_samples,
    concat_ragged,
    model_calls,
    process_grid,
    process_state,  # noqa: F401  (documented here: `pipeline_perturbation.process_state().device`)
    public_prediction,
)


logger = logging.getLogger(__name__)

_PREPROCESS_KEYS = PERTURBATION_ARGUMENTS["preprocess"]
_FORWARD_KEYS = tuple("cell_batch_size" if k == "batch_size" else k for k in PERTURBATION_ARGUMENTS["forward"])
_POSTPROCESS_KEYS = PERTURBATION_ARGUMENTS["postprocess"]
DEFAULT_NULL_PERTURBATIONS = 10
SITES = ("src", "tgt")
METHODS = ("generate", "teacher_forced")


class PerturbationPipeline(Pipeline):
    """
    In silico perturbation with a PerturbGen model (see the module docstring).

    Call arguments (also accepted by `pipeline(...)` itself):
        genes (`list[str]`): genes perturbed together (symbols or Ensembl IDs). screen (`list[str]`): genes perturbed
            one at a time instead. mode (`str`, defaults to `"mask"`): `mask`, `pad`, `delete` or `overexpress`.
        site (`str`, defaults to `"src"`): edit the source cell (`"src"`) or the predicted cells at
            `perturb_time_points` (`"tgt"`), whose edited state is then the context of the later time points.
        method (`str`, defaults to `"generate"`): `"generate"` predicts the future states by MaskGIT;
            `"teacher_forced"` reads out observed target cells (the original's "inference" mode), given as
            `targets={time point: AnnData}` with one row per source cell, in the source's order.
        time_points (`list`): names or values of the predicted time points (default: the model's).
        num_samples (`int`, defaults to 1): generations averaged per cell. iterations (`int`, defaults to 16),
            temperature (`float`, defaults to 1.0): MaskGIT settings. seed (`int`, defaults to 0).
        batch_size (`int`, defaults to 32): cells per batch and rows per model call (bounds the memory).
        variants_per_batch (`int`, defaults to 8): perturbations of a screen per unit of work (the granularity of
            data-parallel screens).
        gene_ids (`str` or `list`): var column (or list) of the source's gene identifiers (default: var_names).
        layer (`str`): layer of raw counts instead of X. group_key (`str`): obs column for per-group statistics.
        progress (`bool`, defaults to `True`): show a progress bar (on the main process).

    Returns:
        [`PerturbationResult`].
    """

    _load_tokenizer = True
    _load_feature_extractor = False
    _load_image_processor = False
    _load_processor = False

    def __call__(self, source, **kwargs):
        """Perturb `source` (an AnnData or h5ad path); see the class docstring for the arguments."""
        if "batch_size" in kwargs:  # the cells' batch size, not the base class's batching of inputs
            kwargs["cell_batch_size"] = kwargs.pop("batch_size")
        return super().__call__(source, **kwargs)

    def _sanitize_parameters(self, **kwargs):
        if "batch_size" in kwargs:
            kwargs["cell_batch_size"] = kwargs.pop("batch_size")
        unknown = sorted(set(kwargs) - set(_PREPROCESS_KEYS) - set(_FORWARD_KEYS) - set(_POSTPROCESS_KEYS))
        if unknown:
            raise TypeError(f"Unknown perturbation argument(s): {unknown}.")
        preprocess = {k: v for k, v in kwargs.items() if k in _PREPROCESS_KEYS and v is not None}
        forward = {k: v for k, v in kwargs.items() if k in _FORWARD_KEYS and v is not None}
        postprocess = {k: v for k, v in kwargs.items() if k in _POSTPROCESS_KEYS and v is not None}
        check_significance_settings(**postprocess)  # before any generation, not after it
        for value in as_list(forward.get("time_points")):
            as_time_point(value, self.model.config, warn=False)  # before the cells are tokenized
        return preprocess, forward, postprocess

    # -- preprocess: tokenize, resolve genes, edit ---------------------------------------------------------------

    def preprocess(
        self,
        source,
        genes=None,
        screen=None,
        mode="mask",
        site="src",
        perturb_time_points=None,
        gene_ids=None,
        layer=None,
        group_key=None,
        method="generate",
        targets=None,
        null_perturbations=DEFAULT_NULL_PERTURBATIONS,
        seed=0,
    ):
        """Tokenize the source cells, resolve the genes and build the perturbed (and sham) variants."""
        adata = read_cells(source, "source")
        check_choice("mode", mode, MODES)
        check_choice("site", site, SITES)
        check_choice("method", method, METHODS)
        perturb_time_points = as_list(perturb_time_points)
        if site == "tgt" and not perturb_time_points:
            raise ValueError("site='tgt' needs perturb_time_points: the predicted time points whose cells are edited.")
        if site == "src" and perturb_time_points:
            raise ValueError("perturb_time_points applies to site='tgt' only; a source edit affects every time point.")
        if method == "generate" and targets is not None:
            raise ValueError("`targets` (observed target cells) are read only by method='teacher_forced'.")
        perturbations = _perturbation_sets(genes, screen)
        to_id = self.tokenizer.target_gene_to_id if site == "tgt" else self.tokenizer.gene_to_id
        ids = {gene: to_id(gene) for names in perturbations for gene in names}
        config = self.model.config
        max_length = getattr(config, "max_source_length", None) or config.encoder.max_position_embeddings
        counts, identifiers = counts_and_gene_ids(adata, gene_ids, layer)
        ranked = self.tokenizer.rank_cells(counts, identifiers, max_length)
        # A model that scales its predicted composition by an observed library size (the original's count head)
        # gets the source cell's: the future cell's is unknown when it is generated.
        library = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        cells = [ranked.cell(i) for i in range(len(ranked))]
        observed = None
        if method == "teacher_forced":
            observed = rank_observed_targets(config, self.tokenizer, targets, adata.n_obs, gene_ids, layer)
            missing = [t for t in perturb_time_points if t not in observed["time_points"]]
            if missing:
                raise ValueError(f"perturb_time_points {missing} are not among the targets {observed['time_points']}.")
        variants, skipped = [], {}
        for names in perturbations:
            gene_tokens = [ids[g] for g in names]
            variant = {
                "label": "+".join(names),
                "names": list(names),
                "genes": gene_tokens,
                "sources": cells,
                "targets": None,
            }
            if site == "src":
                edited = [perturb_tokens(c, gene_tokens, mode, max_length) for c in cells]
                variant["sources"] = [t for t, _ in edited]
                variant["changed"] = np.array([flag for _, flag in edited], dtype=bool)
            elif observed is not None:
                variant["targets"], variant["changed"] = _edit_observed(
                    observed, perturb_time_points, gene_tokens, mode
                )
            else:
                variant["changed"] = None  # known only once the edited time point is generated
            if variant["changed"] is not None and not variant["changed"].any():
                where = "source cell" if site == "src" else f"target cell at {perturb_time_points}"
                message = f"no {where} expresses it among the genes the model reads (mode {mode!r})"
                if site == "src":
                    message += _expressed_but_unread(
                        counts, self.tokenizer.resolve_genes(identifiers), gene_tokens, max_length
                    )
                if screen is None:
                    raise ValueError(
                        f"{variant['label']}: {message}, so a knockout would change nothing. Check the gene, or use "
                        "mode='overexpress'."
                    )
                skipped[variant["label"]] = message  # one silent gene does not end a screen; it is reported
                logger.warning("Screen: skipping %s: %s.", variant["label"], message)
                continue
            variants.append(variant)
        if not variants:
            raise ValueError(f"No gene of the screen changes any cell: {skipped}.")
        if int(null_perturbations) < 0 or 0 < int(null_perturbations) < 3:
            raise ValueError(f"null_perturbations must be 0 (no null) or at least 3, got {null_perturbations}.")
        nulls = self._null_variants(
            variants, cells, int(null_perturbations), seed, mode, site, max_length, observed, perturb_time_points
        )
        groups = None
        if group_key is not None:
            if group_key not in adata.obs.columns:
                raise KeyError(f"group_key {group_key!r} is not an obs column; available: {list(adata.obs.columns)}.")
            groups = adata.obs[group_key].astype(str).to_numpy()
        return {
            "cells": cells,
            "library": library,
            "variants": variants + nulls,
            "observed": observed,
            "mode": mode,
            "perturb_time_points": perturb_time_points,
            "cell_ids": adata.obs_names.astype(str).to_numpy(),
            "groups": groups,
            "summary": {
                "cells": len(cells),
                "mode": mode,
                "site": site,
                "method": method,
                "perturbations_skipped": skipped,
                "null_perturbations": int(null_perturbations),
            },
        }

    def _null_variants(self, variants, cells, num_null, seed, mode, site, max_length, observed, perturb_time_points):
        """
        `num_null` sham perturbations per perturbation (see [`matched_null_genes`]): the same edit of genes the same
        cells express as often and as highly, drawn with `seed`. They run like screen variants (sharing the control)
        and are the null that [`differential_expression_against_null`] judges the perturbation's effects by.
        """
        if num_null == 0:
            return []
        profile = expression_profile(cells, self.model.config.encoder.vocab_size)
        allowed = None
        if site == "tgt":  # a target edit can only touch target genes: the shams are target genes too
            allowed = np.zeros(len(profile[0]), dtype=bool)
            for gene in self.model.config.target_genes or []:
                token = self.tokenizer.vocab.get(gene)
                if token is not None:
                    allowed[token] = True
        rng = np.random.default_rng([int(seed), 7919])
        nulls = []
        for variant in variants:
            source_ids = [self.tokenizer.gene_to_id(g) for g in variant["names"]]
            for index, sham in enumerate(matched_null_genes(source_ids, profile, num_null, rng, allowed)):
                genes = sham
                if site == "tgt":
                    genes = [self.tokenizer.target_gene_to_id(self.tokenizer.id_to_gene(t)) for t in sham]
                null = {
                    "label": f"{variant['label']} null {index}",
                    "genes": genes,
                    "sources": cells,
                    "targets": None,
                    "null_of": variant["label"],
                    "null_genes": [self.tokenizer.id_to_symbol(t) for t in sham],
                }
                if site == "src":
                    edited = [perturb_tokens(c, genes, mode, max_length) for c in cells]
                    null["sources"] = [t for t, _ in edited]
                    null["changed"] = np.array([flag for _, flag in edited], dtype=bool)
                elif observed is not None:
                    null["targets"], null["changed"] = _edit_observed(observed, perturb_time_points, genes, mode)
                else:
                    null["changed"] = None
                nulls.append(null)
        return nulls

    # -- forward: a grid of units (cell batch x chunk of perturbations), shared over processes -------------------

    def _forward(
        self,
        inputs,
        time_points=None,
        num_samples=1,
        iterations=16,
        temperature=1.0,
        seed=0,
        cell_batch_size=None,
        variants_per_batch=8,
        progress=True,
    ):
        batch_size = cell_batch_size or getattr(self, "_batch_size", None) or 32
        for name, value in (
            ("num_samples", num_samples),
            ("batch_size", batch_size),
            ("variants_per_batch", variants_per_batch),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        config = self.model.config
        if inputs["observed"] is not None:
            if time_points is not None:
                raise ValueError("With method='teacher_forced' the time points are those of `targets`.")
            time_points = inputs["observed"]["time_points"]
        elif time_points is not None:
            time_points = [as_time_point(t, config) for t in as_list(time_points)]
        run = {
            "time_points": time_points,
            "num_samples": int(num_samples),
            "seed": int(seed),
            "batch_size": int(batch_size),
            "generate": {"num_iterations": iterations, "temperature": temperature},
        }
        num_cells, num_variants = len(inputs["cells"]), len(inputs["variants"])
        units = [
            (start, chunk)
            for start in range(0, num_cells, batch_size)
            for chunk in range(0, num_variants, variants_per_batch)
        ]
        rank, world = process_grid()
        mine = units[rank * len(units) // world : (rank + 1) * len(units) // world]
        results, control = [], None
        for start, chunk in tqdm(mine, desc="perturbation", unit="unit", disable=not progress or rank != 0):
            rows = np.arange(start, min(start + batch_size, num_cells))
            if control is None or control["start"] != start:
                control = {"start": start, **self._predict(inputs, rows, None, rows - start, run)}
            variants = range(chunk, min(chunk + variants_per_batch, num_variants))
            results.append(
                {
                    "start": start,
                    "control": public_prediction(control) if chunk == 0 else None,
                    "variants": self._run_variants(inputs, variants, rows, control, run),
                }
            )
        if world > 1:
            from accelerate.utils import gather_object

            results = gather_object(results)
        return {**inputs, **assemble(results, num_cells, num_variants, config), "settings": run}

    def _run_variants(self, inputs, indices, rows, control, run):
        """
        Predict the perturbed cells of the perturbations `indices` among `rows` (one cell batch). The cells each
        perturbation changes are stacked over perturbations and run `batch_size` at a time: a knockout of a gene few
        cells express, or each of a screen's sham knockouts, would otherwise fill a model call with a handful of rows.
        A cell keeps its row of random draws (`positions`), so stacking does not change any prediction.
        """
        owner, member = [], []
        for index in indices:
            variant = inputs["variants"][index]
            chosen = rows if variant["changed"] is None else rows[variant["changed"][rows]]
            owner.append(np.full(len(chosen), index))
            member.append(chosen)
        owner, member = np.concatenate(owner), np.concatenate(member)
        if len(member) == 0:
            return {index: {"rows": member} for index in indices}
        positions = member - control["start"]  # each cell's row of random draws and of the control
        out = self._predict(inputs, member, [inputs["variants"][i] for i in owner], positions, run)
        changed = out.pop("changed")
        out.pop("time_values")
        cosine = gene_cosine(
            control["sequences"][positions],
            control["hidden"][positions],
            out.pop("sequences"),
            out.pop("hidden"),
            self.model.config,
        )
        results = {}
        for index in indices:
            keep = (owner == index) & changed
            kept = {key: value[keep] for key, value in out.items()}
            results[index] = {"rows": member[keep], "gene_cosine": cosine[keep], **kept}
        return results

    def _predict(self, inputs, rows, variants, positions, run):
        """
        Control (`variants=None`) or perturbed predictions of `rows` (`variants[i]`: the perturbation of row `i`),
        `batch_size` rows per model call. A teacher-forced call holds one perturbation (each edits its own targets).
        """
        parts = []
        for chunk in model_calls(variants, len(rows), run["batch_size"], one_variant=inputs["observed"] is not None):
            chosen = None if variants is None else variants[chunk]
            if inputs["observed"] is not None:
                parts.append(self._readout(inputs, rows[chunk], None if chosen is None else chosen[0]))
            else:
                parts.append(self._generate(inputs, rows[chunk], chosen, positions[chunk], run))
        return {key: concat_ragged([p[key] for p in parts]) for key in parts[0]}

    def _generate(self, inputs, rows, variants, positions, run):
        config, device = self.model.config, self.model.device
        input_ids, attention_mask = pad_cells(
            [(inputs["cells"] if variants is None else variants[i]["sources"])[r] for i, r in enumerate(rows)], device
        )
        # The unperturbed cell's length (as many genes as it expresses), so control and perturbed runs match.
        lengths = generation_lengths([inputs["cells"][r] for r in rows], config, device)
        edits = {"changed": np.ones(len(rows), dtype=bool)}
        extra = {}
        if variants is not None and inputs["perturb_time_points"]:
            extra = {
                "sequence_editor": _TargetEditor(
                    [v["genes"] for v in variants], inputs["mode"], len(config.condition_tokens), edits
                ),
                "edit_time_points": inputs["perturb_time_points"],
            }
        if config.library_size_source == "observed":
            extra["library_size"] = torch.as_tensor(inputs["library"][rows], dtype=torch.float32, device=device)
        batch_start = int(rows[0] - positions[0])
        samples = []
        for sample in range(run["num_samples"]):
            generator = torch.Generator(device=device).manual_seed(cell_batch_seed(run["seed"], batch_start, sample))
            out = self.model.generate(
                input_ids,
                attention_mask,
                time_points=run["time_points"],
                sequence_length=lengths,
                generator=generator,
                noise_index=torch.as_tensor(positions),
                num_noise_rows=run["batch_size"],
                output_hidden_states=True,
                **run["generate"],
                **extra,
            )
            samples.append(out)
        return {**average_samples(samples), "changed": edits["changed"]}

    def _readout(self, inputs, rows, variant):
        observed = inputs["observed"]
        device = self.model.device
        sources = inputs["cells"] if variant is None else variant["sources"]
        targets = observed["tokens"] if variant is None or variant["targets"] is None else variant["targets"]
        input_ids, attention_mask = pad_cells([sources[r] for r in rows], device)
        decoder_input_ids = pad_targets(targets, rows, device)
        library = torch.as_tensor(observed["library_size"][rows], dtype=torch.float32, device=device)
        extra = {}
        if variant is not None and variant["targets"] is not None and self.model.config.pooling == "non_special":
            extra["exclude_from_pooling"] = variant["genes"]  # as the original's perturbed pass of edited targets
        out = self.model.readout(
            input_ids,
            decoder_input_ids,
            observed["time_points"],
            attention_mask,
            library_size=library,
            output_hidden_states=True,
            **extra,
        )
        if self.model.config.library_size_source == "predicted":
            # As the original's readout: the predicted composition at each observed cell's own library size.
            out.counts = out.counts * (library / out.library_size.clamp(min=1e-8))[..., None]
        return {**average_samples([out]), "changed": np.ones(len(rows), dtype=bool)}

    # -- postprocess: AnnData, statistics, summary ---------------------------------------------------------------

    def postprocess(
        self, outputs, fdr=DEFAULT_FDR, min_abs_log2fc=DEFAULT_MIN_ABS_LOG2FC, bootstrap=DEFAULT_BOOTSTRAP
    ):
        """The predictions as a `PerturbationResult`: AnnData, differential expression against the null, summary."""
        config = self.model.config
        time_values = outputs["time_values"]
        names = [time_point_name(config, v) for v in time_values]
        genes = list(config.target_genes or [f"gene_{i}" for i in range(config.num_target_genes)])
        symbols = [self.tokenizer.gene_symbols.get(g, g) for g in genes]
        control = outputs["control"]
        pairs = list(zip(outputs["variants"], outputs["perturbed"]))
        nulls, null_genes = {}, {}
        for variant, predicted in pairs:
            if "null_of" in variant:
                nulls.setdefault(variant["null_of"], []).append(predicted["counts"])
                null_genes.setdefault(variant["null_of"], []).append(variant["null_genes"])
        thresholds = {"fdr": float(fdr), "min_abs_log2fc": float(min_abs_log2fc), "bootstrap": int(bootstrap)}
        blocks, tables, unaffected = [], [], {}
        for variant, predicted in pairs:
            if "null_of" in variant:
                continue
            label, changed = variant["label"], predicted["changed"]
            unaffected[label] = int((~changed).sum())
            if unaffected[label]:
                logger.info(
                    "%d of %d cells are unaffected by %s: their prediction equals the control.",
                    unaffected[label],
                    len(changed),
                    label,
                )
            if not changed.any():
                logger.warning(
                    "%s changed no cell (not in any edited cell): its prediction equals the control.", label
                )
            for t, (name, value) in enumerate(zip(names, time_values)):
                obs = pd.DataFrame(
                    {
                        "cell_id": outputs["cell_ids"],
                        "time_point": name,
                        "time_value": float(value),
                        "perturbation": label,
                        "group": outputs["groups"] if outputs["groups"] is not None else "all",
                        "changed": changed,
                        "cosine_similarity": cosine(control["embeddings"][:, t], predicted["embeddings"][:, t]),
                    }
                )
                blocks.append(
                    (obs, control["counts"][:, t], predicted["counts"][:, t], predicted["gene_cosine"][:, t])
                )
                null_counts = [n[:, t] for n in nulls.get(label, [])]
                table = de_tables(
                    control["counts"][:, t],
                    predicted["counts"][:, t],
                    null_counts,
                    symbols,
                    obs,
                    label,
                    name,
                    thresholds,
                    outputs["settings"]["seed"],
                )
                tables += with_gene_shift(table, predicted["gene_cosine"][:, t], obs)
        obs = pd.concat([b[0] for b in blocks], ignore_index=True)
        obs.index = obs.index.astype(str)
        adata = ad.AnnData(
            X=np.vstack([b[2] for b in blocks]).astype(np.float32),
            obs=obs,
            var=pd.DataFrame({"gene_symbol": symbols}, index=pd.Index(genes, name="gene_id")),
            layers={
                "control": np.vstack([b[1] for b in blocks]).astype(np.float32),
                "perturbed": np.vstack([b[2] for b in blocks]).astype(np.float32),
                "gene_embedding_cosine": np.vstack([b[3] for b in blocks]).astype(np.float32),
            },
        )
        de = sorted_by_significance(pd.concat(tables, ignore_index=True))
        real = [v["label"] for v in outputs["variants"] if "null_of" not in v]
        summary = {
            **outputs["summary"],
            "cells_unaffected": unaffected,
            "perturbations": real,
            "time_points": names,
            "null_genes": null_genes,
            **thresholds,
            "significant": _significant_calls(de),
        }
        settings = outputs["settings"]
        config_out = {
            "mode": summary["mode"],
            "site": summary["site"],
            "method": summary["method"],
            "genes_to_perturb": summary["perturbations"],
            "perturb_time_points": list(outputs["perturb_time_points"]),
            "time_points": names,
            "num_samples": settings["num_samples"],
            "seed": settings["seed"],
            "batch_size": settings["batch_size"],
            **settings["generate"],
        }
        config_out.update(null_perturbations=summary["null_perturbations"], **thresholds)
        return PerturbationResult(adata=adata, de=de, summary=summary, config=config_out)


class _TargetEditor:
    """`sequence_editor` of `generate`: edits generated target cells and records which ones changed."""

    def __init__(self, gene_ids_per_row, mode, num_conditions, record):
        self.gene_ids_per_row, self.mode, self.num_conditions = gene_ids_per_row, mode, num_conditions
        self.record = record
        record["changed"] = np.zeros(len(gene_ids_per_row), dtype=bool)

    def __call__(self, tokens, time_value):
        edited, changed = edit_target_batch(tokens, self.gene_ids_per_row, self.mode, self.num_conditions)
        self.record["changed"] |= changed
        return edited


def _edit_observed(observed, perturb_time_points, gene_tokens, mode):
    """Edit observed target cells at the perturbed time points; which cells changed."""
    targets, changed = [], np.zeros(len(observed["tokens"][0]), dtype=bool)
    for name, cells in zip(observed["time_points"], observed["tokens"]):
        if name not in perturb_time_points:
            targets.append(cells)
            continue
        edited = [perturb_target_tokens(c, gene_tokens, mode) for c in cells]
        # A deletion leaves trailing pads; drop them so lengths stay the cells' own.
        targets.append([e[0][: len(c) if mode != "delete" else len(c) - int(e[1])] for e, c in zip(edited, cells)])
        changed |= np.array([e[1] for e in edited], dtype=bool)
    return targets, changed


def _perturbation_sets(genes, screen):
    if genes is not None and screen is not None:
        raise ValueError("Give `genes` (perturbed together) or `screen` (one at a time), not both.")
    if screen is not None:
        sets = [[g] for g in as_list(screen)]
    elif genes is not None:
        sets = [as_list(genes)]
    else:
        raise ValueError("Name the genes to perturb: genes=[...] or screen=[...].")
    if not sets or not all(sets):
        raise ValueError("The list of genes to perturb is empty.")
    return sets


def _expressed_but_unread(counts, column_tokens, gene_tokens, max_length) -> str:
    """
    Why a gene that the source cells may well express is not read: the model reads a cell's `max_length`
    top-ranked genes, and a gene expressed highly in every cell ranks low (the rank divides by the gene's median).
    """
    columns = np.flatnonzero(np.isin(column_tokens, gene_tokens))
    if columns.size == 0:
        return "; the data has no column for it"
    expressed = np.asarray((counts[:, columns] > 0).sum(axis=1)).ravel() > 0
    if not expressed.any():
        return f"; none of the {counts.shape[0]} cells has a count for it"
    return (
        f"; {int(expressed.sum())} of {counts.shape[0]} cells have counts for it, but it ranks below the top "
        f"{max_length} genes the model reads (max_source_length): a model trained with a larger "
        "--max_source_length reads it"
    )
