"""
A single-cell time course with a known gene regulatory network, for checking perturbation predictions against truth.

Cells come in clones (think of barcoded lineages): the cells of a clone share its regulator states, and each time
point samples new cells of every clone. Genes fall into:

- regulators `REG1..`: each clone is "on" or "off" for each regulator (a bimodal activity that persists over time,
  as a stable cell state does);
- direct targets `T{r}_{i}` of regulator `r`: they respond one time step after the regulator (activated or repressed);
  a few respond only in one cell type;
- second-tier targets `T{r}_{i}_{j}`: they respond one step after their direct target, so two steps after the
  regulator;
- unaffected genes `G{i}`: no regulator, but cell-type offsets and their own drift over time (so that "nothing
  changes over time" is not the right answer either).

Equations, for cell `c` of clone `k` and cell type `y` at time step `s` (0 = source):

    a_reg(c, s)   = level_on  if clone k is on, else level_off;                     (+ noise)
    h_reg(c, s)   = sigmoid(steepness * (a_reg(c, s) - threshold))
    a_tgt(c, s)   = base_tgt + w * h_reg(c, s - 1) * [y in cell types of the edge]  (+ noise)    s >= 1
    a_tgt2(c, s)  = base_tgt2 + w2 * (h_tgt(c, s - 1) - h_tgt_baseline)             (+ noise)    s >= 1
    a_gene(c, s)  = base_gene + offset(y) + drift_gene * s                          (+ noise)
    rate(c, g)    = library(c) * softmax_g(a(c, g, s))
    counts(c, g)  ~ Poisson(rate * Gamma(dispersion, 1 / dispersion))             (negative binomial)

(the Poisson draw is the inverse CDF of a uniform drawn up front, so a perturbed run changes a count only where it
changes the rate).

At `s = 0` targets sit at their baseline (the cascade starts from the source state). `h_tgt = sigmoid(a_tgt - base)`
so a target's own targets follow it. A knockout sets the regulator's activity to -inf (no expression, `h = 0`) at
every time step; an overexpression sets it to `level_on + overexpression_boost`. All random draws (clone states,
noise, library sizes, gamma and Poisson draws) are made in a fixed order before and independently of the
perturbation, so a perturbed simulation is the same cells under the perturbation.
"""

import itertools
import logging

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats


logger = logging.getLogger(__name__)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _build_network(
    rng,
    num_regulators,
    targets_per_regulator,
    second_tier_per_target,
    num_cell_types,
    cell_type_specific_fraction,
    effect_size,
):
    """Gene names and the edges of the network (regulator -> direct target -> second-tier target)."""
    regulators = [f"REG{r + 1}" for r in range(num_regulators)]
    edges, direct, second = [], [], []
    for r, regulator in enumerate(regulators):
        for i in range(targets_per_regulator):
            target = f"T{r + 1}_{i + 1}"
            sign = 1.0 if rng.random() < 0.7 else -1.0
            weight = sign * effect_size * rng.uniform(0.7, 1.3)
            specific = num_cell_types > 1 and rng.random() < cell_type_specific_fraction
            cell_type = int(rng.integers(num_cell_types)) if specific else -1
            edges.append((regulator, target, weight, 1, cell_type))
            direct.append(target)
            for j in range(second_tier_per_target):
                child = f"{target}_{j + 1}"
                child_sign = 1.0 if rng.random() < 0.7 else -1.0
                edges.append((target, child, child_sign * effect_size * rng.uniform(0.7, 1.3), 1, -1))
                second.append(child)
    return regulators, direct, second, edges


def simulate_trajectory(
    num_clones: int = 400,
    cells_per_clone: int = 2,
    time_values=(0.0, 2.0, 6.0, 12.0),
    num_regulators: int = 3,
    targets_per_regulator: int = 8,
    second_tier_per_target: int = 2,
    num_unaffected: int = 250,
    num_cell_types: int = 2,
    cell_type_specific_fraction: float = 0.25,
    effect_size: float = 2.0,
    fraction_on: float = 0.5,
    level_on: float = 1.5,
    level_off: float = -4.0,
    overexpression_boost: float = 1.5,
    noise: float = 0.3,
    mean_library_size: float = 2000.0,
    dispersion: float = 4.0,
    knockout=(),
    overexpress=(),
    seed: int = 0,
) -> ad.AnnData:
    """
    Simulate raw counts of a time course driven by a known regulatory cascade (see the module docstring).

    Args:
        num_clones (`int`): clones; each has `cells_per_clone` cells at every time point.
        time_values (`Sequence[float]`): ordered time values (hours); the first is the source state.
        num_regulators, targets_per_regulator, second_tier_per_target, num_unaffected (`int`): network size.
        num_cell_types (`int`): cell types (each clone has one).
        cell_type_specific_fraction (`float`): share of regulator -> target edges active in one cell type only.
        effect_size (`float`): typical |weight| of an edge, in natural-log expression units.
        fraction_on (`float`): share of clones in which a regulator is on.
        level_on, level_off (`float`): log activity of an on / off regulator.
        overexpression_boost (`float`): added to `level_on` for an overexpressed regulator.
        noise (`float`): standard deviation of per-cell, per-gene log-activity noise.
        mean_library_size (`float`): mean counts per cell (log-normal spread).
        dispersion (`float`): negative-binomial inverse dispersion.
        knockout, overexpress (`Sequence[str]`): regulator symbols (e.g. `"REG1"`) perturbed at every time step.
        seed (`int`): the random seed; the same seed gives the same cells, perturbed or not.

    Returns:
        `anndata.AnnData` of integer counts (CSR, `float32`), cells x genes. obs: `time` (e.g. "2h"), `time_value`,
        `cell_type`, `clone`. var (index: Ensembl-like ids): `gene_symbol`, `role` (regulator, direct_target,
        second_target, unaffected). uns["network"]: `edges` (regulator, target, weight, delay, cell_type, where -1
        means every type), `regulators`, `knockout`, `overexpress`, and the parameters.
    """
    time_values = [float(t) for t in time_values]
    if len(time_values) < 2 or any(b <= a for a, b in itertools.pairwise(time_values)):
        raise ValueError(f"time_values must be at least two increasing values, got {time_values}.")
    if num_clones < 1 or cells_per_clone < 1:
        raise ValueError("num_clones and cells_per_clone must be >= 1.")
    rng = np.random.default_rng(seed)
    regulators, direct, second, edges = _build_network(
        rng,
        num_regulators,
        targets_per_regulator,
        second_tier_per_target,
        num_cell_types,
        cell_type_specific_fraction,
        effect_size,
    )
    for gene in [*knockout, *overexpress]:
        if gene not in regulators:
            raise ValueError(f"Only regulators can be perturbed here; {gene!r} is not one of {regulators}.")
    unaffected = [f"G{i + 1}" for i in range(num_unaffected)]
    symbols = regulators + direct + second + unaffected
    index = {g: i for i, g in enumerate(symbols)}
    num_genes, num_times = len(symbols), len(time_values)
    # Baselines: a wide spread of expression for most genes (so many are sparse, as in 10x data); the network's
    # genes are moderately expressed, a small share of each cell's counts (so a knockout's compositional effect on
    # the other genes stays small).
    num_network = len(regulators) + len(direct) + len(second)
    base = rng.normal(-1.5, 1.8, num_genes)
    base[:num_network] = rng.normal(-1.0, 0.5, num_network)
    base[: len(regulators)] = 0.0
    cell_type_offset = rng.normal(0.0, 0.5, (num_cell_types, num_genes))
    cell_type_offset[:, : len(regulators)] = 0.0
    drift = np.zeros(num_genes)
    drift[[index[g] for g in unaffected]] = rng.normal(0.0, 0.08, num_unaffected)
    clone_type = rng.integers(num_cell_types, size=num_clones)
    clone_on = rng.random((num_clones, len(regulators))) < fraction_on

    num_cells = num_clones * cells_per_clone
    clone = np.repeat(np.arange(num_clones), cells_per_clone)
    cell_type = clone_type[clone]
    # Every random draw, made up front in a fixed order: perturbed runs reuse them.
    log_noise = rng.normal(0.0, noise, (num_times, num_cells, num_genes))
    log_library = rng.normal(np.log(mean_library_size), 0.35, (num_times, num_cells))
    gamma = rng.gamma(dispersion, 1.0 / dispersion, (num_times, num_cells, num_genes))
    # Poisson draws by inverse CDF of shared uniforms: a gene whose rate a perturbation leaves alone keeps its counts.
    poisson_uniforms = rng.uniform(1e-12, 1.0 - 1e-12, (num_times, num_cells, num_genes))

    regulator_level = np.where(clone_on[clone], level_on, level_off)  # (cells, regulators)
    for gene in overexpress:
        regulator_level[:, regulators.index(gene)] = level_on + overexpression_boost
    knocked_out = np.array([g in set(knockout) for g in regulators])
    steepness, threshold = 2.0, 0.5 * (level_on + level_off)

    blocks, obs = [], []
    previous_h = None
    for step, time_value in enumerate(time_values):
        activity = base + cell_type_offset[cell_type] + drift * step + log_noise[step]
        activity[:, : len(regulators)] += regulator_level
        activity[:, : len(regulators)][:, knocked_out] = -np.inf
        h = {}
        for r, regulator in enumerate(regulators):
            h[regulator] = np.where(knocked_out[r], 0.0, _sigmoid(steepness * (activity[:, r] - threshold)))
        if previous_h is not None:
            for source, target, weight, _, edge_type in edges:
                active = np.ones(num_cells) if edge_type < 0 else (cell_type == edge_type).astype(float)
                signal = previous_h[source]
                activity[:, index[target]] += weight * signal * active
        # Each target's own signal (relative to its baseline) drives its children at the next step.
        for target in direct:
            column = index[target]
            h[target] = _sigmoid(activity[:, column] - base[column] - cell_type_offset[cell_type, column]) - 0.5
        previous_h = h
        proportions = np.exp(activity - activity.max(axis=1, keepdims=True))
        proportions /= proportions.sum(axis=1, keepdims=True)
        rate = np.exp(log_library[step])[:, None] * proportions * gamma[step]
        counts = stats.poisson.ppf(poisson_uniforms[step], rate)
        blocks.append(sp.csr_matrix(counts.astype(np.float32)))
        label = f"{time_value:g}h"
        obs.append(
            pd.DataFrame(
                {
                    "time": label,
                    "time_value": time_value,
                    "cell_type": [f"type_{t + 1}" for t in cell_type],
                    "clone": [f"clone_{k}" for k in clone],
                    "cell": [f"{label}_cell_{c}" for c in range(num_cells)],
                }
            )
        )

    obs = pd.concat(obs, ignore_index=True).set_index("cell")
    obs.index.name = None
    for column in ("time", "cell_type", "clone"):
        obs[column] = pd.Categorical(obs[column], categories=list(dict.fromkeys(obs[column])))
    roles = ["regulator"] * len(regulators) + ["direct_target"] * len(direct) + ["second_target"] * len(second)
    roles += ["unaffected"] * num_unaffected
    var = pd.DataFrame(
        {"gene_symbol": symbols, "role": roles},
        index=pd.Index([f"ENSSIMG{i + 1:011d}" for i in range(num_genes)]),
    )
    adata = ad.AnnData(X=sp.vstack(blocks).tocsr(), obs=obs, var=var)
    adata.uns["network"] = {
        "regulators": regulators,
        "edges": pd.DataFrame(edges, columns=["regulator", "target", "weight", "delay", "cell_type"]).to_dict("list"),
        "knockout": list(knockout),
        "overexpress": list(overexpress),
        "seed": int(seed),
        "time_values": time_values,
    }
    return adata


def true_effects(control: ad.AnnData, perturbed: ad.AnnData, time_key: str = "time") -> pd.DataFrame:
    """
    True effect of a perturbation per gene and time point: log2 fold change of mean counts per 10,000
    (`log2((mean CP10k perturbed + 1) / (mean CP10k control + 1))`, the pipeline's definition), between the same
    cells simulated with and without it.

    Returns:
        `pd.DataFrame` with columns `time_point`, `gene_id`, `gene_symbol`, `log2_fold_change`.
    """
    if control.shape != perturbed.shape or not control.obs_names.equals(perturbed.obs_names):
        raise ValueError("control and perturbed must be the same cells (simulated with the same seed).")
    rows = []
    for time_point in dict.fromkeys(control.obs[time_key].astype(str)):
        at = (control.obs[time_key].astype(str) == time_point).to_numpy()
        means = [_mean_cp10k(data.X[at]) for data in (control, perturbed)]
        rows.append(
            pd.DataFrame(
                {
                    "time_point": str(time_point),
                    "gene_id": control.var_names,
                    "gene_symbol": control.var["gene_symbol"].to_numpy(),
                    "log2_fold_change": np.log2((means[1] + 1.0) / (means[0] + 1.0)),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def _mean_cp10k(counts):
    counts = sp.csr_matrix(counts)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scaled = sp.diags(1e4 / np.where(totals > 0, totals, 1.0)) @ counts
    return np.asarray(scaled.mean(axis=0)).ravel()
