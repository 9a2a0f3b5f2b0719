"""
The work of `perturbgen-hf evaluate`: hold something out, train (or take) a model that never saw it, predict it by
generation from source cells (`perturbgen_hf.pipelines.prediction`, the perturbation pipeline's own path), and score
the prediction beside baselines (`perturbgen_hf.evaluation`). The model's predicted cells are counts drawn around its
expected counts (as observed cells are draws; see `MODEL_COUNTS`), not the expected counts themselves, unless
`model_counts="mean"`.
"""

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.tokenize_dataset import gene_identifiers, load_description, resolve_time_points
from ..evaluation import metrics
from ..evaluation.scoring import MODEL, score_predictions
from ..evaluation.splits import cell_groups, split_cells
from ..io_utils import check_model_location, load_model_folder, read_anndata
from ..output_folder import check_output_folder, staged_output_folder
from ..pipelines.prediction import generate_cells
from ..settings import MODEL_COUNTS, PROTOCOLS, EvaluationSettings
from ..training import train_on_cpu


logger = logging.getLogger(__name__)


@dataclass
class _Course:
    """The evaluated time course: its cells and how they are read (what every step of a run shares)."""

    adata: object
    time_key: str
    source: str
    order: list
    values: list
    times: np.ndarray
    groups: np.ndarray
    time_value_key: str | None
    gene_id_key: str | None
    pairing_key: str | None

    @property
    def value_of(self) -> dict:
        return dict(zip(self.order, self.values))


def run_evaluation(
    adata,
    out,
    protocol,
    time_key,
    source,
    heldout=None,
    group_key=None,
    time_order=None,
    time_value_key=None,
    gene_id_key=None,
    pairing_key=None,
    model=None,
    settings=None,
    overwrite=False,
    force_overwrite=False,
    progress=True,
) -> dict:
    """
    Run a protocol and write `metrics.json`, `metrics.csv` and `plots/` under `out`.

    Args:
        adata (`str`, `os.PathLike` or `AnnData`): raw counts with every time point (and group).
        out (`str` or `os.PathLike`): output folder (refused if not empty, unless `overwrite`); the trained model
            (`model/`) and its tokenized data (`tokens/`) go there too.
        protocol (`str`): one of `PROTOCOLS`.
        time_key (`str`), source (`str`), time_order, time_value_key, gene_id_key: as for `perturbgen-hf tokenize`.
        heldout (`str`): the held-out time point (`heldout-time`) or group (`heldout-group`).
        group_key (`str`): obs column of groups (`heldout-group`; with the other protocols, metrics are also given
            per group).
        pairing_key (`str`, *optional*): stratify the training pairs by this obs column (default: `group_key`).
        model (`str` or `os.PathLike`, *optional*): a saved model trained without the held-out part (default:
            train one with `settings`).
        settings ([`EvaluationSettings`], *optional*): checked before any work.
        overwrite (`bool`), force_overwrite (`bool`): replace an earlier result in `out`, or any folder; the run is
            built beside `out` and replaces it only once complete.

    Returns:
        `dict`: the contents of `metrics.json`.
    """
    settings = settings or EvaluationSettings()
    started = time.perf_counter()
    # Every option is checked before any work: a bad one leaves neither an output folder nor half of one.
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}.")
    settings.check()
    out = check_output_folder(out, overwrite, force_overwrite)
    if model is not None:
        check_model_location(model)
    adata = _read(adata)
    order, values = resolve_time_points(adata.obs, time_key, time_order, time_value_key)
    if source not in order:
        raise ValueError(f"Source time point {source!r} is not in obs[{time_key!r}]: {order}.")
    times = adata.obs[time_key].astype(str).to_numpy()
    groups = cell_groups(adata, group_key, protocol)
    split = split_cells(protocol, times, groups, order, source, heldout, settings)
    course = _Course(
        adata, time_key, source, order, values, times, groups, time_value_key, gene_id_key, pairing_key or group_key
    )
    with staged_output_folder(out, "evaluate", overwrite, force_overwrite) as work:
        return _evaluate(course, work, out, protocol, split, heldout, model, settings, started, progress)


def _evaluate(course, work, out, protocol, split, heldout, model, settings, started, progress):
    """Train (unless given a model), predict and score, writing into `work` (which becomes `out`)."""
    if model is None:
        model = _train_model(course, split, work, settings, progress)
    model, tokenizer = _load_model(model)
    if protocol == "heldout-time" and heldout in model.config.time_points:
        raise ValueError(f"The model was trained on the held-out time point {heldout!r}; train one without it.")
    adata, order, value_of = course.adata, course.order, course.value_of
    identifiers = gene_identifiers(adata, course.gene_id_key)
    evaluated = sorted({t for t, _ in split.observed}, key=order.index)
    generated = _predict(model, tokenizer, adata, identifiers, split, evaluated, value_of, settings, progress)
    expression = _observed_expression(adata, tokenizer, identifiers)
    rows, details = score_predictions(
        split,
        expression,
        generated,
        tokenizer,
        course.times,
        course.groups,
        order,
        value_of,
        course.source,
        protocol,
        settings,
    )
    table = pd.DataFrame(rows, columns=["metric", "time_point", "group", "method", "value"])
    table.to_csv(work / "metrics.csv", index=False)
    plots = [out / p.relative_to(work) for p in _plot(work / "plots", table, details)]
    result = _summary(table, protocol, heldout, split, evaluated, course.source, settings, model, started, out, plots)
    (work / "metrics.json").write_text(json.dumps(result, indent=2, default=_json_default))
    return result


def _read(adata):
    adata = read_anndata(adata)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"The input is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    return adata


def _pairing_mode(pairing, pairing_key):
    if pairing == "transport":
        return "transport"
    if pairing != "stratified":
        raise ValueError(f"Unknown evaluation pairing {pairing!r}; choose 'stratified' or 'transport'.")
    return "stratified" if pairing_key else "random"


def _train_model(course, split, out, settings, progress):
    """Tokenize the training cells of `split` and train a model on them (`settings`); returns its folder."""
    from ..data import tokenize_anndata

    train_data = course.adata[split.train].copy()
    kept = [t for t in course.order if t in set(train_data.obs[course.time_key].astype(str))]
    tokenize_anndata(
        train_data,
        out / "tokens",
        time_key=course.time_key,
        source=course.source,
        time_order=kept,
        time_value_key=course.time_value_key,
        gene_id_key=course.gene_id_key,
        n_hvg=min(settings.n_hvg, course.adata.n_vars),
        pairing=_pairing_mode(settings.pairing, course.pairing_key),
        pairing_key=course.pairing_key,
        seed=settings.seed,
        max_length=settings.max_source_length,
        progress=progress,
    )
    if course.time_value_key is None:
        # The tokenizer derives values from the kept names alone; keep the full course's values instead.
        description_path = out / "tokens" / "perturbgen_data.json"
        description = json.loads(description_path.read_text())
        value_of = course.value_of
        description["source_time_value"] = value_of[course.source]
        description["time_values"] = [value_of[t] for t in description["time_points"]]
        description_path.write_text(json.dumps(description, indent=2))
    train_on_cpu(
        out / "tokens", out / "model", settings, log_every=max(1, settings.max_steps // 20), progress=progress
    )
    return out / "model"


def _load_model(path):
    return load_model_folder(Path(path))


def _predict(model, tokenizer, adata, identifiers, split, evaluated, value_of, settings, progress):
    """Generated counts and token sequences per (time point, group), from the source cells of each group."""
    config = model.config
    wanted = {value_of[t]: t for t in evaluated}
    # Generate every time point the model knows plus the evaluated ones, so that each one has the context of the
    # earlier ones, as in training.
    time_values = sorted(set(config.time_values) | set(wanted))
    max_length = config.max_source_length or config.encoder.max_position_embeddings
    if config.condition_tokens:
        raise ValueError("evaluate does not handle models with condition tokens yet.")
    if settings.model_counts not in MODEL_COUNTS:
        raise ValueError(f"model_counts must be one of {list(MODEL_COUNTS)}, got {settings.model_counts!r}.")
    gene_ids = set(range(config.first_gene_token_id, config.first_gene_token_id + config.num_target_genes))
    predictions = {}
    for group, mask in split.source.items():
        rows = np.flatnonzero(mask)
        ranked = tokenizer.rank_cells(adata.X[rows], identifiers, max_length)
        cells = [ranked.cell(i) for i in range(len(ranked))]
        library = np.asarray(adata.X[rows].sum(axis=1), dtype=np.float64).ravel()
        counts, sequences = [], []
        for _, _, generator, out in generate_cells(
            model,
            cells,
            time_values,
            settings.generation_batch_size,
            iterations=settings.iterations,
            seed=settings.seed,
            library_size=library,
            progress=progress,
            desc=f"generating ({group})",
        ):
            counts.append(_model_cells(out, config, generator, settings.model_counts))
            sequences += [[s.tolist() for s in row] for row in out.sequences.cpu()]
        counts = np.concatenate(counts)
        order = [float(v) for v in out.time_values.cpu()]
        for value, name in wanted.items():
            t = order.index(float(value))
            tokens = [[i for i in row[t] if i in gene_ids] for row in sequences]
            predictions[(name, group)] = {"counts": counts[:, t], "tokens": tokens}
    return predictions


def _model_cells(out, config, generator, model_counts):
    """The model's predicted cells, as counts `(batch, time points, genes)` (see `MODEL_COUNTS`)."""
    from ..modeling.likelihoods_perturbgen import sample_negative_binomial, sample_poisson

    if model_counts == "mean" or config.count_likelihood == "mse":
        return out.counts.float().cpu().numpy()
    if model_counts == "poisson":
        return sample_poisson(out.counts.float(), generator=generator).cpu().numpy()
    draws = sample_negative_binomial(
        out.count_mu.float(), out.count_theta.float(), out.count_zi_logits, generator=generator
    )
    return draws.cpu().numpy()


def _observed_expression(adata, tokenizer, identifiers):
    """log1p CP10k of every cell on the model's target genes, and those counts."""
    counts = tokenizer.target_counts(adata.X, identifiers)
    counts = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    return {"counts": counts, "expression": metrics.log_normalize(counts)}


def _summary(table, protocol, heldout, split, evaluated, source, settings, model, started, out, plots):
    wins = {}
    for (metric, time_point, group), part in table.groupby(["metric", "time_point", "group"], sort=False):
        values = part.set_index("method")["value"].dropna()
        if MODEL not in values or len(values) < 2:
            continue
        best = values.idxmax() if metrics.higher_is_better(metric) else values.idxmin()
        wins.setdefault(f"{time_point} / {group}", {})[metric] = best
    nested = {}
    for row in table.itertuples(index=False):
        nested.setdefault(row.time_point, {}).setdefault(row.group, {}).setdefault(row.method, {})[row.metric] = (
            row.value
        )
    return {
        "protocol": protocol,
        "heldout": heldout,
        "source": source,
        "time_points": evaluated,
        "cells": {
            "train": int(split.train.sum()),
            "source": {g: int(m.sum()) for g, m in split.source.items()},
            "observed": {f"{t} / {g}": int(m.sum()) for (t, g), m in split.observed.items()},
        },
        "model": str(getattr(model, "name_or_path", "")),
        "metrics": nested,
        "best_method": wins,
        "seconds": round(time.perf_counter() - started, 1),
        "settings": asdict(settings),
        "files": {"metrics_csv": str(out / "metrics.csv"), "plots": [str(p) for p in plots]},
    }


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"Cannot write {type(value).__name__} to JSON.")


def _plot(folder, table, details) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for (time_point, group), part in table.groupby(["time_point", "group"], sort=False):
        names = list(dict.fromkeys(part["metric"]))
        columns = 4
        rows = -(-len(names) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.6 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            values = part[part["metric"] == name].set_index("method")["value"]
            colours = ["tab:red" if m == MODEL else "tab:grey" for m in values.index]
            ax.barh(range(len(values)), values.to_numpy(dtype=float), color=colours)
            ax.set_yticks(range(len(values)), [m.replace(" (this model)", "") for m in values.index], fontsize=7)
            ax.set_title(f"{name} ({'higher' if metrics.higher_is_better(name) else 'lower'} is better)", fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
        for ax in list(axes.flat)[len(names) :]:
            ax.axis("off")
        fig.suptitle(f"{time_point} / {group}: model (red) and baselines")
        fig.tight_layout()
        paths.append(folder / f"metrics_{_safe(time_point)}_{_safe(group)}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    for (time_point, group), detail in details.items():
        paths.append(_plot_means(folder, time_point, group, detail, plt))
    return paths


def _plot_means(folder, time_point, group, detail, plt):
    """
    Predicted against observed mean expression of the top DE genes, one panel per method on shared axes, each
    titled with its error on those genes; the 3 genes that change most from the source are named.
    """
    top = metrics.top_de_genes(detail["observed_de"], min(20, len(detail["observed_de"])))
    observed = detail["observed"].mean(0)[top]
    methods = detail["methods"]
    predictions = {method: cells.mean(0)[top] for method, cells in methods.items()}
    high = float(max(observed.max(), *(p.max() for p in predictions.values()), 1e-6)) * 1.08
    named = np.argsort(-np.abs(observed - detail["reference"].mean(0)[top]))[:3]
    columns = min(4, len(methods))
    rows = -(-len(methods) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(3.3 * columns, 3.2 * rows), squeeze=False, sharex=True, sharey=True
    )
    for ax, (method, predicted) in zip(axes.flat, predictions.items()):
        ax.plot([0.0, high], [0.0, high], color="grey", lw=0.8, ls="--", label="predicted = observed")
        ax.scatter(observed, predicted, s=16, color="tab:red" if method == MODEL else "tab:grey", zorder=3)
        for i in named:
            ax.annotate(
                str(detail["symbols"][top[i]])[-12:],
                (observed[i], predicted[i]),
                fontsize=7,
                xytext=(3, -9),
                textcoords="offset points",
            )
        error = float(np.mean((predicted - observed) ** 2))
        ax.set_title(f"{method.replace(' (this model)', '')}\nmse on these genes {error:.3f}", fontsize=9)
        ax.set_xlim(0.0, high)
        ax.set_ylim(0.0, high)
    for ax in axes[-1]:
        ax.set_xlabel("observed mean log1p CP10k", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("predicted mean log1p CP10k", fontsize=8)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    fig.suptitle(f"{time_point} / {group}: the {len(top)} genes that change most from the source (model in red)")
    fig.tight_layout()
    path = folder / f"means_{_safe(time_point)}_{_safe(group)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _safe(text) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def options_from_tokenized(folder) -> dict:
    """The input h5ad and tokenize options recorded in a `perturbgen-hf tokenize` output folder."""
    description = load_description(folder)
    path = description["input"].get("path")
    if not path:
        raise ValueError(f"{folder} was tokenized from an in-memory AnnData; give the h5ad instead.")
    return {
        "adata": path,
        "time_key": description["time_key"],
        "source": description["source"],
        "gene_id_key": description["input"].get("gene_id_key"),
        "pairing_key": description["pairing"].get("key"),
    }
