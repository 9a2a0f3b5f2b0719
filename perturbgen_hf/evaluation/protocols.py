"""
`perturbgen-hf evaluate`: hold something out, train (or take) a model that never saw it, predict it by generation
from source cells, and score the prediction beside baselines computed the same way.

Protocols:

- `heldout-time`: a whole time point is left out of training (between two trained ones: interpolation; after the
  last: extrapolation); it is predicted from every source cell.
- `heldout-group`: every cell of one group (e.g. a cell type) is left out; its later states are predicted from its
  source cells (Kang et al.: learn ctrl -> stim on the other cell types, predict stimulated CD4 T cells).
- `heldout-cells`: a random fraction of the cells of every time point is left out; their later states are
  predicted from the held-out source cells.

Everything is scored on the model's target genes, as log1p CP10k of the counts of those genes (for observed cells,
predictions and baselines alike). The model's predicted cells are counts drawn around its expected counts (as
observed cells are draws; see `MODEL_COUNTS`), not the expected counts themselves, unless `model_counts="mean"`.
The reference state of every delta is the observed source cells of the evaluated group (so `mse_delta` equals `mse` and `mae_delta` equals
`mae`; they are reported for completeness). Distribution metrics (E-distance, MMD) are computed on principal
components fitted on the observed source and target cells of the evaluated group (the MMD is unbiased, with the
original's six kernel widths divided by the observed cells' median squared distance); the per-gene Wasserstein
distance on the expression itself.
"""

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from ..data.tokenize_dataset import _gene_ids, load_description, resolve_time_points
from ..io_utils import check_model_location, load_model_folder, read_anndata
from ..output_folder import check_output_folder, staged_output_folder
from ..settings import MODEL_COUNTS, PROTOCOLS, EvaluationSettings
from ..training import train_on_cpu
from . import baselines, metrics


logger = logging.getLogger(__name__)
MODEL = "PerturbGen (this model)"


@dataclass
class _Split:
    """Which cells train the model and which are evaluated."""

    train: np.ndarray  # bool per cell
    source: dict  # group -> bool per cell: the source cells predictions start from
    observed: dict  # (time point, group) -> bool per cell: the observed cells to compare with


def run_evaluation(adata, out, protocol, time_key, source, heldout=None, group_key=None, time_order=None,
                   time_value_key=None, gene_id_key=None, pairing_key=None, model=None, settings=None,
                   overwrite=False, force_overwrite=False, progress=True) -> dict:  # fmt: skip
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
    groups = _groups(adata, group_key, protocol)
    split = _split(protocol, times, groups, order, source, heldout, settings)
    value_of = dict(zip(order, values))
    with staged_output_folder(out, "evaluate", overwrite, force_overwrite) as work:
        return _evaluate(adata, work, out, protocol, split, model, time_key, source, order, values, value_of, times,
                         groups, heldout, time_value_key, gene_id_key, pairing_key or group_key, settings, started,
                         progress)  # fmt: skip


def _evaluate(adata, work, out, protocol, split, model, time_key, source, order, values, value_of, times, groups,
              heldout, time_value_key, gene_id_key, pairing_key, settings, started, progress):  # fmt: skip
    """Train (unless given a model), predict and score, writing into `work` (which becomes `out`)."""
    if model is None:
        model = _train_model(adata, split, work, time_key, source, order, values, time_value_key, gene_id_key,
                             pairing_key, settings, progress)  # fmt: skip
    model, tokenizer = _load_model(model)
    if protocol == "heldout-time" and heldout in model.config.time_points:
        raise ValueError(f"The model was trained on the held-out time point {heldout!r}; train one without it.")
    identifiers = _gene_ids(adata, gene_id_key)
    evaluated = sorted({t for t, _ in split.observed}, key=order.index)
    generated = _predict(model, tokenizer, adata, identifiers, split, evaluated, value_of, settings, progress)
    expression = _observed_expression(adata, tokenizer, identifiers)
    rows, details = _score_all(split, expression, generated, tokenizer, times, groups, order, value_of, source,
                               protocol, settings)  # fmt: skip
    table = pd.DataFrame(rows, columns=["metric", "time_point", "group", "method", "value"])
    table.to_csv(work / "metrics.csv", index=False)
    plots = [out / p.relative_to(work) for p in _plot(work / "plots", table, details)]
    result = _summary(table, protocol, heldout, split, evaluated, source, settings, model, started, out, plots)
    (work / "metrics.json").write_text(json.dumps(result, indent=2, default=_json_default))
    return result


# -- data and splits --------------------------------------------------------------------------------------------------


def _read(adata):
    adata = read_anndata(adata)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"The input is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    return adata


def _groups(adata, group_key, protocol):
    if group_key is None:
        if protocol == "heldout-group":
            raise ValueError("--protocol heldout-group needs --group-key (the obs column of the groups).")
        return np.full(adata.n_obs, "all", dtype=object)
    if group_key not in adata.obs.columns:
        raise KeyError(f"group_key {group_key!r} is not an obs column; available: {list(adata.obs.columns)}.")
    return adata.obs[group_key].astype(str).to_numpy()


def _split(protocol, times, groups, order, source, heldout, settings) -> _Split:
    targets = order[order.index(source) + 1 :]
    if not targets:
        raise ValueError(f"No time point after the source {source!r} to predict.")
    in_course = np.isin(times, [source, *targets])
    if protocol == "heldout-time":
        if heldout not in targets:
            raise ValueError(f"--heldout {heldout!r} must be a time point after the source {source!r}: {targets}.")
        if len(targets) < 2:
            raise ValueError("Holding out the only target time point leaves nothing to train on.")
        return _Split(train=in_course & (times != heldout), source={"all": times == source},
                      observed={(heldout, "all"): times == heldout})  # fmt: skip
    if protocol == "heldout-group":
        if heldout not in set(groups):
            raise ValueError(f"--heldout {heldout!r} is not a group; groups: {sorted(set(groups))}.")
        held = groups == heldout
        if not (held & (times == source)).any():
            raise ValueError(f"Group {heldout!r} has no cells at the source time point {source!r} to predict from.")
        observed = {(t, heldout): held & (times == t) for t in targets if (held & (times == t)).any()}
        if not observed:
            raise ValueError(f"Group {heldout!r} has no cells after the source time point: nothing to compare with.")
        return _Split(train=in_course & ~held, source={heldout: held & (times == source)}, observed=observed)
    if not 0 < settings.heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {settings.heldout_fraction}.")
    rng = np.random.default_rng(settings.seed)
    held = np.zeros(len(times), dtype=bool)
    for t in [source, *targets]:
        cells = np.flatnonzero(times == t)
        count = round(settings.heldout_fraction * len(cells))
        if count < 2 or count > len(cells) - 2:
            raise ValueError(f"Time point {t!r} has {len(cells)} cells: too few to hold out a fraction of them.")
        held[rng.choice(cells, count, replace=False)] = True
    names = sorted(set(groups))
    return _Split(
        train=in_course & ~held,
        source={g: held & (times == source) & (groups == g) for g in names},
        observed={(t, g): held & (times == t) & (groups == g) for t in targets for g in names
                  if (held & (times == t) & (groups == g)).sum() >= 2},
    )  # fmt: skip


# -- the model ----------------------------------------------------------------------------------------------------------


def _pairing_mode(pairing, pairing_key):
    if pairing == "transport":
        return "transport"
    if pairing != "stratified":
        raise ValueError(f"Unknown evaluation pairing {pairing!r}; choose 'stratified' or 'transport'.")
    return "stratified" if pairing_key else "random"


def _train_model(adata, split, out, time_key, source, order, values, time_value_key, gene_id_key, pairing_key,
                 settings, progress):  # fmt: skip
    from ..data import tokenize_anndata

    train_data = adata[split.train].copy()
    kept = [t for t in order if t in set(train_data.obs[time_key].astype(str))]
    tokenize_anndata(
        train_data, out / "tokens", time_key=time_key, source=source, time_order=kept,
        time_value_key=time_value_key, gene_id_key=gene_id_key, n_hvg=min(settings.n_hvg, adata.n_vars),
        pairing=_pairing_mode(settings.pairing, pairing_key), pairing_key=pairing_key, seed=settings.seed,
        max_length=settings.max_source_length, progress=progress,
    )  # fmt: skip
    if time_value_key is None:
        # The tokenizer derives values from the kept names alone; keep the full course's values instead.
        description_path = out / "tokens" / "perturbgen_data.json"
        description = json.loads(description_path.read_text())
        value_of = dict(zip(order, values))
        description["source_time_value"] = value_of[source]
        description["time_values"] = [value_of[t] for t in description["time_points"]]
        description_path.write_text(json.dumps(description, indent=2))
    train_on_cpu(out / "tokens", out / "model", settings, log_every=max(1, settings.max_steps // 20),
                 progress=progress)  # fmt: skip
    return out / "model"


def _load_model(path):
    return load_model_folder(Path(path))


def _predict(model, tokenizer, adata, identifiers, split, evaluated, value_of, settings, progress):
    """Generated counts and token sequences per (time point, group), from the source cells of each group."""
    from ..pipelines.pipeline_perturbation import _pad_rows, cell_batch_seed

    config = model.config
    wanted = {value_of[t]: t for t in evaluated}
    # Generate every time point the model knows plus the evaluated ones, so that each one has the context of the
    # earlier ones, as in training.
    time_values = sorted(set(config.time_values) | set(wanted))
    max_length = config.max_source_length or config.encoder.max_position_embeddings
    capacity = min(config.num_target_genes, config.decoder_max_position_embeddings - len(config.condition_tokens))
    if config.condition_tokens:
        raise ValueError("evaluate does not handle models with condition tokens yet.")
    if settings.model_counts not in MODEL_COUNTS:
        raise ValueError(f"model_counts must be one of {list(MODEL_COUNTS)}, got {settings.model_counts!r}.")
    predictions = {}
    for group, mask in split.source.items():
        rows = np.flatnonzero(mask)
        ranked = tokenizer.rank_cells(adata.X[rows], identifiers, max_length)
        cells = [ranked.cell(i) for i in range(len(ranked))]
        counts, sequences = [], []
        size = settings.generation_batch_size
        for start in tqdm(range(0, len(cells), size), desc=f"generating ({group})", disable=not progress):
            batch = cells[start : start + size]
            input_ids, attention_mask = _pad_rows(batch, model.device)
            lengths = torch.tensor([min(max(len(c) - 2, 1), capacity) for c in batch])
            generator = torch.Generator().manual_seed(cell_batch_seed(settings.seed, start, 0))
            with torch.inference_mode():
                out = model.generate(input_ids, attention_mask, time_points=time_values, sequence_length=lengths,
                                     num_iterations=settings.iterations, generator=generator)  # fmt: skip
            counts.append(_model_cells(out, config, generator, settings.model_counts))
            sequences.append([[s.tolist() for s in row] for row in out.sequences.cpu()])
        counts = np.concatenate(counts)
        order = [float(v) for v in out.time_values.cpu()]
        gene_ids = set(range(config.first_gene_token_id, config.first_gene_token_id + config.num_target_genes))
        for value, name in wanted.items():
            t = order.index(float(value))
            tokens = [[i for i in row[t] if i in gene_ids] for batch in sequences for row in batch]
            predictions[(name, group)] = {"counts": counts[:, t], "tokens": tokens}
    return predictions


def _model_cells(out, config, generator, model_counts):
    """The model's predicted cells, as counts `(batch, time points, genes)` (see `MODEL_COUNTS`)."""
    from ..modeling.likelihoods_perturbgen import sample_negative_binomial, sample_poisson

    if model_counts == "mean" or config.count_likelihood == "mse":
        return out.counts.float().cpu().numpy()
    if model_counts == "poisson":
        return sample_poisson(out.counts.float(), generator=generator).cpu().numpy()
    draws = sample_negative_binomial(out.count_mu.float(), out.count_theta.float(), out.count_zi_logits,
                                     generator=generator)  # fmt: skip
    return draws.cpu().numpy()


# -- scoring ------------------------------------------------------------------------------------------------------------


def _observed_expression(adata, tokenizer, identifiers):
    """log1p CP10k of every cell on the model's target genes, and those counts."""
    counts = tokenizer.target_counts(adata.X, identifiers)
    counts = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    return {"counts": counts, "expression": metrics.log_normalize(counts)}


def _trained_targets(split, times, order, source):
    return [t for t in order[order.index(source) + 1 :] if (split.train & (times == t)).any()]


def _baseline_rows(split, times, value_of, source, trained, protocol, time_point, group) -> dict:
    """The real cells that the cell-carrying baselines predict, as row numbers (`trained`: trained targets)."""
    rows = {"no change": np.flatnonzero(split.source[group])}
    if protocol == "heldout-group":
        rows["training mean"] = np.flatnonzero(split.train & (times == time_point))  # the other groups' state mean
    else:
        rows["training mean"] = np.flatnonzero(split.train & np.isin(times, trained))  # mean over trained times
    if protocol == "heldout-time":
        known = {value_of[t]: t for t in [source, *trained]}
        nearest = known[baselines.nearest_time_value(list(known), value_of[time_point])]
        rows["nearest time point"] = np.flatnonzero(split.train & (times == nearest))
    return rows


def _baselines(split, expression, times, groups, order, value_of, source, protocol, time_point, group, settings):
    """Each baseline's predicted cells (log1p CP10k) for one evaluated (time point, group)."""
    x = expression["expression"]
    trained = _trained_targets(split, times, order, source)
    rows = _baseline_rows(split, times, value_of, source, trained, protocol, time_point, group)
    result = {
        "no change": baselines.no_change(x[rows["no change"]]),
        "training mean": baselines.training_mean([x[rows["training mean"]]]),
    }
    if "nearest time point" in rows:
        result["nearest time point"] = x[rows["nearest time point"]]
        result.update(_time_interpolations(split, x, times, groups, value_of, source, trained, time_point, group,
                                           rows, settings))  # fmt: skip
    conditions, features, source_features, target_features = _linear_design(
        protocol, split.train, times, groups, value_of, source, time_point, trained
    )  # fmt: skip
    result["linear (PCA + ridge)"] = baselines.linear_model(
        [x[c] for c in conditions], features, x[rows["no change"]], source_features, target_features,
        settings.linear_components, settings.linear_ridge,
    )  # fmt: skip
    return result, rows


def _time_interpolations(split, x, times, groups, value_of, source, trained, time_point, group, rows, settings):
    """The neighbour and optimal-transport interpolations of a held-out time point, within its group."""
    known = {value_of[t]: t for t in [source, *trained]}
    t0, t1 = baselines.neighbour_time_values(list(known), value_of[time_point])

    def cells_at(t):
        if known[t] == source:
            return x[rows["no change"]]
        return x[split.train & (times == known[t]) & (groups == group)]

    before, after = cells_at(t0), cells_at(t1)
    target = value_of[time_point]
    return {
        "neighbour interpolation": baselines.neighbour_interpolation(before, after, t0, t1, target,
                                                                     seed=settings.seed),
        "OT interpolation": baselines.transport_interpolation(before, after, t0, t1, target,
                                                              num_components=settings.n_pcs,
                                                              exact_max_pairs=settings.ot_exact_max_pairs,
                                                              epsilon=settings.ot_epsilon, seed=settings.seed),
    }  # fmt: skip


def _linear_design(protocol, train, times, groups, value_of, source, time_point, trained_targets):
    """Training conditions (cell masks) and their features for the linear baseline (see `linear_model`)."""
    course = [source, *trained_targets]
    if protocol == "heldout-time":
        # A linear trend in (standardised) time per component: inter- or extrapolates to the held-out value.
        known = np.array([value_of[t] for t in course])
        centre, scale = known.mean(), known.std() or 1.0

        def feature(t):
            return np.array([1.0, (value_of[t] - centre) / scale])

        return [train & (times == t) for t in course], np.stack([feature(t) for t in course]), feature(source), \
            feature(time_point)  # fmt: skip
    states = {t: i for i, t in enumerate(course if time_point in course else [*course, time_point])}
    if protocol == "heldout-cells":
        conditions = [train & (times == t) for t in course]
        names = list(course)
        group_of = [None] * len(course)
    else:
        # An additive model of group and state, fitted on the other groups; the held-out group's shift is the
        # state effect alone.
        other = sorted(set(groups[train]))
        pairs = [(g, t) for g in other for t in course if (train & (groups == g) & (times == t)).any()]
        conditions = [train & (groups == g) & (times == t) for g, t in pairs]
        names = [t for _, t in pairs]
        group_of = [other.index(g) for g, _ in pairs]
    num_groups = max([g + 1 for g in group_of if g is not None], default=0)

    def feature(t, g=None):
        vector = np.zeros(num_groups + len(states))
        if g is not None:
            vector[g] = 1.0
        vector[num_groups + states[t]] = 1.0
        return vector

    features = np.stack([feature(t, g) for t, g in zip(names, group_of)])
    return conditions, features, feature(source), feature(time_point)


def _score_all(split, expression, generated, tokenizer, times, groups, order, value_of, source, protocol, settings):
    rows, details = [], {}
    genes = list(tokenizer.target_genes)
    symbols = [tokenizer.gene_symbols.get(g, g) for g in genes]
    deltas = {}
    for (time_point, group), mask in split.observed.items():
        observed = expression["expression"][mask]
        reference = expression["expression"][split.source[group]]
        model_cells = metrics.log_normalize(generated[(time_point, group)]["counts"])
        baseline_cells, baseline_rows = _baselines(split, expression, times, groups, order, value_of, source,
                                                   protocol, time_point, group, settings)  # fmt: skip
        methods = {MODEL: model_cells, **baseline_cells}
        observed_de = metrics.differential_expression(observed, reference, symbols)
        context = _Context(observed, reference, observed_de, settings)
        tokens = _token_lists(generated[(time_point, group)]["tokens"], expression["counts"], np.flatnonzero(mask),
                              baseline_rows, tokenizer, settings.seed)  # fmt: skip
        for method, cells in methods.items():
            values = _score(cells, context, symbols, tokens.get(method))
            rows += [(name, time_point, group, method, value) for name, value in values.items()]
            deltas.setdefault(method, {})[(time_point, group)] = cells.mean(0) - reference.mean(0)
        deltas.setdefault("observed", {})[(time_point, group)] = observed.mean(0) - reference.mean(0)
        details[(time_point, group)] = {"methods": methods, "observed": observed, "reference": reference,
                                        "observed_de": observed_de, "symbols": symbols}  # fmt: skip
    rows += _discrimination(deltas)
    return rows, details


@dataclass
class _Context:
    """What every method of one evaluated (time point, group) is compared with."""

    observed: np.ndarray
    reference: np.ndarray
    observed_de: pd.DataFrame
    settings: EvaluationSettings

    def __post_init__(self):
        s = self.settings
        self.top_de = metrics.top_de_genes(self.observed_de, min(s.top_de, len(self.observed_de)))
        self.top_r2 = metrics.top_de_genes(self.observed_de, min(s.top_r2, len(self.observed_de)))
        both = np.vstack([self.observed, self.reference])
        self.centre = both.mean(0)
        components = max(1, min(s.n_pcs, both.shape[0] - 1, both.shape[1]))
        self.axes = np.linalg.svd(both - self.centre, full_matrices=False)[2][:components].T
        # The original's kernel widths, relative to the observed cells' median squared distance.
        self.gammas = metrics.median_scaled_gammas(self.project(self.observed)) if len(self.observed) > 1 else None

    def project(self, cells):
        return (cells - self.centre) @ self.axes


def _score(cells, context, symbols, token_pairs) -> dict:
    s = context.settings
    x_hat, x, r = cells.mean(0), context.observed.mean(0), context.reference.mean(0)
    values = {
        "pearson": metrics.pearson(x_hat, x),
        "pearson_delta": metrics.pearson_delta(x_hat, x, r),
        f"pearson_delta_top{s.top_de}_de": metrics.pearson_delta_top_de(x_hat, x, r, context.top_de),
        "mse": metrics.mse(x_hat, x),
        "mae": metrics.mae(x_hat, x),
        "mse_delta": metrics.mse_delta(x_hat, x, r),
        "mae_delta": metrics.mae_delta(x_hat, x, r),
        "r2_means": metrics.r2_means(x_hat, x),
        f"r2_means_top{s.top_r2}_de": metrics.r2_means(x_hat, x, context.top_r2),
    }
    if len(cells) >= 2 and context.gammas is not None:
        projected, observed = context.project(cells), context.project(context.observed)
        values["e_distance_squared"] = metrics.e_distance(projected, observed, squared=True)
        values["e_distance"] = metrics.e_distance(projected, observed, squared=False)
        values["mmd_rbf"] = metrics.mmd_rbf(projected, observed, context.gammas)
    values["wasserstein_per_gene"] = metrics.wasserstein_per_gene(cells, context.observed)
    de_names = ("overlap_at_N", f"overlap_at_{s.overlap_k}", "de_direction_match", "de_spearman_lfc_sig")
    if len(cells) < 2:  # a single predicted profile has no spread to test: no DE scores
        values.update(dict.fromkeys(de_names, float("nan")))
    else:
        predicted_de = metrics.differential_expression(cells, context.reference, symbols)
        values[de_names[0]] = metrics.overlap_at_k(context.observed_de, predicted_de, None, s.fdr)
        values[de_names[1]] = metrics.overlap_at_k(context.observed_de, predicted_de, s.overlap_k, s.fdr)
        values[de_names[2]] = metrics.direction_match(context.observed_de, predicted_de, s.fdr)
        values[de_names[3]] = metrics.spearman_lfc_sig(context.observed_de, predicted_de, s.fdr)
    if token_pairs is not None:
        values[f"token_top{s.token_k}_overlap"] = metrics.token_topk_overlap(*token_pairs, s.token_k)
    return values


def _token_lists(model_tokens, counts, observed_rows, baseline_rows, tokenizer, seed):
    """
    Rank lists to compare at the token level: each predicted cell (generated, or a real cell a baseline carries
    over) paired with a random observed cell of the evaluated state (seeded). The linear baseline has no counts to
    rank, so it has no token score.
    """
    rng = np.random.default_rng(seed)

    def ranked(rows):
        lists = tokenizer.rank_targets(sp.csr_matrix(counts[rows]), list(tokenizer.target_genes))
        return [list(lists.cell(i)) for i in range(len(rows))]

    observed = ranked(observed_rows)

    def paired(predicted):
        return predicted, [observed[i] for i in rng.integers(0, len(observed), size=len(predicted))]

    return {MODEL: paired(model_tokens), **{name: paired(ranked(rows)) for name, rows in baseline_rows.items()}}


def _discrimination(deltas) -> list:
    """cell-eval's discrimination score (l1) per method, where two or more states were evaluated."""
    observed = deltas.pop("observed")
    keys = list(observed)
    if len(keys) < 2:
        return []
    truth = np.stack([observed[k] for k in keys])
    rows = []
    for method, by_key in deltas.items():
        scores = metrics.discrimination_score(np.stack([by_key[k] for k in keys]), truth, "l1")
        rows += [("discrimination_score_l1", t, g, method, float(s)) for (t, g), s in zip(keys, scores)]
    return rows


# -- outputs --------------------------------------------------------------------------------------------------------


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
    fig, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 3.2 * rows), squeeze=False, sharex=True,
                             sharey=True)  # fmt: skip
    for ax, (method, predicted) in zip(axes.flat, predictions.items()):
        ax.plot([0.0, high], [0.0, high], color="grey", lw=0.8, ls="--", label="predicted = observed")
        ax.scatter(observed, predicted, s=16, color="tab:red" if method == MODEL else "tab:grey", zorder=3)
        for i in named:
            ax.annotate(str(detail["symbols"][top[i]])[-12:], (observed[i], predicted[i]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points")  # fmt: skip
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
    return {"adata": path, "time_key": description["time_key"], "source": description["source"],
            "gene_id_key": description["input"].get("gene_id_key"),
            "pairing_key": description["pairing"].get("key")}  # fmt: skip
