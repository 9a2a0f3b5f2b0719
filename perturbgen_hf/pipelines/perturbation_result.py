"""The result of an in silico perturbation: predicted counts, differential expression, a summary; saved atomically."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import yaml
from scipy import stats

from ..tokenization import log_normalize


# Thresholds of a "significant" effect: BH-adjusted p against the null below `DEFAULT_FDR` and |log2 fold change| at
# least `DEFAULT_MIN_ABS_LOG2FC` (a gene that moves by less is not a finding, however consistently it moves).
DEFAULT_FDR = 0.05
DEFAULT_MIN_ABS_LOG2FC = 0.1
DEFAULT_BOOTSTRAP = 200


def check_significance_settings(fdr=DEFAULT_FDR, min_abs_log2fc=DEFAULT_MIN_ABS_LOG2FC, bootstrap=DEFAULT_BOOTSTRAP):
    """The significance settings: an FDR in (0, 1), a finite effect floor >= 0, a whole number of resamples >= 0."""
    if not 0.0 < float(fdr) < 1.0:
        raise ValueError(f"fdr must be a false discovery rate between 0 and 1 (e.g. 0.05), got {fdr}.")
    if not (np.isfinite(float(min_abs_log2fc)) and float(min_abs_log2fc) >= 0):
        raise ValueError(f"min_abs_log2fc must be a finite log2 fold change >= 0, got {min_abs_log2fc}.")
    if int(bootstrap) != float(bootstrap) or int(bootstrap) < 0:
        raise ValueError(f"bootstrap must be a whole number of resamples >= 0, got {bootstrap}.")


def log2_fold_change(control: np.ndarray, perturbed: np.ndarray) -> np.ndarray:
    """log2((mean perturbed CP10k + 1) / (mean control CP10k + 1)) per gene, from counts `(cells, genes)`."""
    cp10k_control = np.expm1(log_normalize(control))
    cp10k_perturbed = np.expm1(log_normalize(perturbed))
    return np.log2((cp10k_perturbed.mean(0) + 1.0) / (cp10k_control.mean(0) + 1.0))


def paired_differential_expression(control: np.ndarray, perturbed: np.ndarray, genes) -> pd.DataFrame:
    """
    Control vs perturbed predictions of the same cells, gene by gene, without a null: the descriptive columns of
    [`differential_expression_against_null`].

    `log2_fold_change` = log2((mean perturbed CP10k + 1) / (mean control CP10k + 1)); `mean_change` = mean over cells
    of the change of log1p CP10k. The paired tests (Wilcoxon signed-rank, normal approximation with zeros split; paired
    t on log1p CP10k) compare two predictions of the same cells made with the same random draws: any consistent
    difference, however small, gets a small p, so they describe consistency, not significance. A gene whose
    predictions do not change in any cell gets statistic 0 and p = 1; `wilcoxon_p_adjusted` is BH within the table.

    Args:
        control, perturbed (`np.ndarray` of shape `(num_cells, num_genes)`): predicted counts.
        genes (`Sequence[str]`): gene names of the columns.
    """
    cp10k_control = np.expm1(log_normalize(control))
    cp10k_perturbed = np.expm1(log_normalize(perturbed))
    difference = log_normalize(perturbed) - log_normalize(control)
    changes = np.abs(difference).max(axis=0) > 0
    wilcoxon_stat, wilcoxon_p = np.zeros(len(genes)), np.ones(len(genes))
    t_stat, t_p = np.zeros(len(genes)), np.ones(len(genes))
    if changes.any() and difference.shape[0] > 1:
        varying = difference[:, changes]
        # The normal approximation (tie-corrected): with ties or zeros on few cells, scipy would otherwise run a
        # permutation test per gene, which takes minutes for a few thousand genes.
        result = stats.wilcoxon(varying, axis=0, zero_method="zsplit", method="approx")
        wilcoxon_stat[changes], wilcoxon_p[changes] = result.statistic, result.pvalue
        with np.errstate(divide="ignore", invalid="ignore"):
            t = stats.ttest_rel(log_normalize(perturbed)[:, changes], log_normalize(control)[:, changes], axis=0)
        t_stat[changes] = np.nan_to_num(t.statistic)
        t_p[changes] = np.where(np.isnan(t.pvalue), 1.0, t.pvalue)
    table = pd.DataFrame(
        {
            "gene": list(genes),
            "log2_fold_change": log2_fold_change(control, perturbed),
            "mean_change": difference.mean(0),
            "mean_control": cp10k_control.mean(0),
            "mean_perturbed": cp10k_perturbed.mean(0),
            "wilcoxon_statistic": wilcoxon_stat,
            "wilcoxon_p": wilcoxon_p,
            "t_statistic": t_stat,
            "t_p": t_p,
        }
    )
    table["wilcoxon_p_adjusted"] = stats.false_discovery_control(np.clip(wilcoxon_p, 0, 1))
    return table


def bootstrap_interval(
    control: np.ndarray, perturbed: np.ndarray, num_resamples: int, seed: int, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """
    A percentile bootstrap interval of each gene's log2 fold change, resampling cells (a cell keeps its control and
    perturbed prediction together, each the mean of its independent generations). `(nan, nan)` per gene without
    resamples or with fewer than 2 cells.

    Returns:
        `(low, high)`, each `np.ndarray` of shape `(num_genes,)`.
    """
    cells, genes = control.shape
    if num_resamples < 1 or cells < 2:
        return np.full(genes, np.nan), np.full(genes, np.nan)
    rng = np.random.default_rng(seed)
    control_cp10k, perturbed_cp10k = np.expm1(log_normalize(control)), np.expm1(log_normalize(perturbed))
    draws = np.empty((num_resamples, genes))
    for b in range(num_resamples):
        rows = rng.integers(0, cells, size=cells)
        draws[b] = np.log2((perturbed_cp10k[rows].mean(0) + 1.0) / (control_cp10k[rows].mean(0) + 1.0))
    tail = (1.0 - level) / 2 * 100
    return np.percentile(draws, tail, axis=0), np.percentile(draws, 100 - tail, axis=0)


def null_p_values(effect: np.ndarray, null_effects: np.ndarray) -> dict:
    """
    Empirical p-values of per-gene effects against the effects of sham perturbations.

    Each gene's effect is standardised by its own null, `z = (effect - mean) / sd` over the shams; each sham's effect
    is standardised the same way by the other shams (leave one out, so a sham is not judged by itself). The p-value of
    a gene is `(1 + #{null |z| >= |z|}) / (1 + #null z)` over the pooled null z of every gene and sham: a gene is
    significant when it moves more than a perturbation of a gene that does not matter moves genes like it.

    Args:
        effect (`np.ndarray` of shape `(num_genes,)`): the perturbation's log2 fold changes.
        null_effects (`np.ndarray` of shape `(num_shams, num_genes)`): the shams' log2 fold changes (>= 3 shams).

    Returns:
        `dict` of `np.ndarray` of shape `(num_genes,)`: `null_mean`, `null_sd`, `z_score`, `p_value`.
    """
    null_effects = np.asarray(null_effects, dtype=np.float64)
    shams = null_effects.shape[0]
    if shams < 3:
        raise ValueError(f"An empirical null needs at least 3 sham perturbations, got {shams}.")
    mean, sd = null_effects.mean(0), null_effects.std(0, ddof=1)
    z = _standardise(effect - mean, sd)
    totals = null_effects.sum(0)
    loo_mean = (totals[None] - null_effects) / (shams - 1)
    # The leave-one-out variance from the full one: sum of squares without the sham, around the other shams' mean.
    squares = (null_effects**2).sum(0)[None] - null_effects**2
    loo_var = np.clip((squares - (shams - 1) * loo_mean**2) / (shams - 2), 0, None)
    null_z = np.sort(np.abs(_standardise(null_effects - loo_mean, np.sqrt(loo_var))).ravel())
    exceed = null_z.size - np.searchsorted(null_z, np.abs(z), side="left")
    return {"null_mean": mean, "null_sd": sd, "z_score": z, "p_value": (1.0 + exceed) / (1.0 + null_z.size)}


def _standardise(difference, sd):
    """`difference / sd`, 0 where both are 0 and a large finite value where only the sd is 0."""
    tiny = np.finfo(np.float64).tiny
    with np.errstate(divide="ignore", invalid="ignore"):
        z = difference / np.maximum(sd, tiny)
    return np.where(np.abs(difference) <= tiny, 0.0, np.nan_to_num(z, posinf=1e300, neginf=-1e300))


def differential_expression_against_null(
    control,
    perturbed,
    null_perturbed,
    genes,
    fdr=DEFAULT_FDR,
    min_abs_log2fc=DEFAULT_MIN_ABS_LOG2FC,
    bootstrap=DEFAULT_BOOTSTRAP,
    seed=0,
) -> pd.DataFrame:
    """
    Per-gene effect of a perturbation, judged against sham perturbations of the same cells.

    Columns: `gene`, `log2_fold_change` (of mean CP10k) with its bootstrap interval `ci_low`/`ci_high` (over cells,
    `bootstrap` resamples), `mean_change` (mean per-cell change of log1p CP10k), `mean_control`, `mean_perturbed`,
    the null's `null_mean` and `null_sd` (log2 fold changes of the shams), `z_score`, the empirical `p_value` (see
    [`null_p_values`]), `p_adjusted` (BH across the table's genes), `significant` (`p_adjusted < fdr` and
    `|log2_fold_change| >= min_abs_log2fc`), then the descriptive paired tests of
    [`paired_differential_expression`]. Without shams (`null_perturbed` empty) the null columns are NaN and nothing is
    significant. Rows are in gene order.

    Args:
        control, perturbed (`np.ndarray` of shape `(num_cells, num_genes)`): predicted counts.
        null_perturbed (`list[np.ndarray]`): predicted counts of each sham perturbation, same shape.
        genes (`Sequence[str]`): gene names of the columns.
    """
    table = paired_differential_expression(control, perturbed, genes)
    low, high = bootstrap_interval(control, perturbed, bootstrap, seed)
    table.insert(2, "ci_low", low)
    table.insert(3, "ci_high", high)
    if len(null_perturbed) >= 3:
        null = null_p_values(
            table["log2_fold_change"].to_numpy(), np.stack([log2_fold_change(control, p) for p in null_perturbed])
        )
        adjusted = stats.false_discovery_control(null["p_value"])
    else:
        null = {key: np.full(len(table), np.nan) for key in ("null_mean", "null_sd", "z_score", "p_value")}
        adjusted = np.full(len(table), np.nan)
    position = table.columns.get_loc("mean_perturbed") + 1
    for offset, (key, values) in enumerate([*null.items(), ("p_adjusted", adjusted)]):
        table.insert(position + offset, key, values)
    significant = (table["p_adjusted"] < fdr) & (table["log2_fold_change"].abs() >= min_abs_log2fc)
    table.insert(position + 5, "significant", significant.to_numpy())
    return table


def gene_cosine(control_sequences, control_hidden, sequences, hidden, config):
    """
    Per-gene embedding shift: for each gene present in both the control and the perturbed prediction of a cell, the
    cosine similarity of its decoder hidden states (mean over samples); NaN where it is absent from either.

    Args:
        control_sequences, sequences (`np.ndarray` of shape `(rows, samples, T, L)`); control_hidden, hidden
            (`np.ndarray` of shape `(rows, samples, T, L, hidden)`).

    Returns:
        `np.ndarray` of shape `(rows, T, num_target_genes)`.
    """
    rows, samples, times, _ = sequences.shape
    first, num_genes = config.first_gene_token_id, config.num_target_genes
    total = np.zeros((rows, times, num_genes))
    seen = np.zeros((rows, times, num_genes))
    for s in range(samples):
        for t in range(times):
            where = _gene_positions(control_sequences[:, s, t], first, num_genes)
            genes = sequences[:, s, t] - first
            valid = (genes >= 0) & (genes < num_genes)
            r, p = np.nonzero(valid)
            q = where[r, genes[r, p]]
            keep = q >= 0
            r, p, q, g = r[keep], p[keep], q[keep], genes[r[keep], p[keep]]
            a, b = hidden[r, s, t, p], control_hidden[r, s, t, q]
            norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            total[r, t, g] += (a * b).sum(1) / np.where(norms > 0, norms, 1.0)
            seen[r, t, g] += 1
    with np.errstate(invalid="ignore"):
        return np.where(seen > 0, total / np.maximum(seen, 1), np.nan).astype(np.float32)


def _gene_positions(sequences, first, num_genes):
    """`(rows, num_genes)`: the position of each gene in each row's sequence, -1 if absent."""
    where = np.full((sequences.shape[0], num_genes), -1, dtype=np.int64)
    genes = sequences - first
    r, p = np.nonzero((genes >= 0) & (genes < num_genes))
    where[r, genes[r, p]] = p
    return where


def with_gene_shift(tables, gene_cosine, obs):
    """Add each gene's mean embedding cosine (over cells of the table's group where the gene is predicted)."""
    groups = obs["group"].to_numpy()
    for table in tables:
        group = table["group"].iloc[0]
        rows = np.ones(len(groups), dtype=bool) if group == "all" else groups == group
        values = gene_cosine[rows]
        with np.errstate(invalid="ignore"):
            seen = np.isfinite(values).sum(0)
            table["embedding_cosine"] = np.where(seen > 0, np.nansum(values, 0) / np.maximum(seen, 1), np.nan)
    return tables


def de_tables(control, perturbed, null_counts, symbols, obs, label, time_point, thresholds, seed):
    """Per-gene statistics against the null, for all cells and per group."""
    tables = []
    groups = obs["group"].to_numpy()
    for group in ["all", *sorted(set(groups) - {"all"})]:
        rows = np.ones(len(groups), dtype=bool) if group == "all" else groups == group
        table = differential_expression_against_null(
            control[rows],
            perturbed[rows],
            [n[rows] for n in null_counts],
            symbols,
            thresholds["fdr"],
            thresholds["min_abs_log2fc"],
            thresholds["bootstrap"],
            seed,
        )
        table.insert(0, "group", group)
        table.insert(0, "time_point", time_point)
        table.insert(0, "perturbation", label)
        tables.append(table)
    return tables


def sorted_by_significance(de):
    """Within each perturbation, time point and group (in their order), the most significant genes first (then the
    largest effects).
    """
    keys = ["perturbation", "time_point", "group"]
    order = {column: {v: i for i, v in enumerate(dict.fromkeys(de[column]))} for column in keys}
    ranked = de.assign(
        **{f"_{c}": de[c].map(order[c]) for c in keys},
        _p=de["p_value"].fillna(2.0),
        _size=-de["log2_fold_change"].abs(),
    )
    ranked = ranked.sort_values([f"_{c}" for c in keys] + ["_p", "_size"], kind="stable")
    return ranked.drop(columns=[f"_{c}" for c in keys] + ["_p", "_size"]).reset_index(drop=True)


def _significant_calls(de):
    """Significant genes per perturbation and time point (all cells)."""
    table = de[de["group"] == "all"]
    return {
        label: {t: int(v) for t, v in part.groupby("time_point", sort=False)["significant"].sum().items()}
        for label, part in table.groupby("perturbation", sort=False)
    }


def cosine(a, b):
    """Row-wise cosine similarity of `(n, d)` arrays (0 where a row is all zeros)."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.where(norms > 0, norms, 1.0)


@dataclass
class PerturbationResult:
    """
    Predictions of an in silico perturbation.

    Attributes:
        adata (`anndata.AnnData`): one row per source cell x time point x perturbation; `layers["control"]` and
            `layers["perturbed"]` hold predicted counts of the model's target genes (`var`); `obs` holds `cell_id`,
            `time_point`, `time_value`, `perturbation`, `group`, `changed` (whether the edit changed the source cell)
            and `cosine_similarity` of the control and perturbed cell embeddings.
        de (`pd.DataFrame`): per perturbation, time point (and group): see [`paired_differential_expression`].
        summary (`dict`): cells used, cells unaffected per perturbation, genes not found.
        config (`dict`): the run's settings.
    """

    adata: ad.AnnData
    de: pd.DataFrame
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def save(self, path, overwrite: bool = False, plots: bool = False, force_overwrite: bool = False) -> Path:
        """
        Write `result.h5ad`, `de.csv`, `summary.json`, `config.yaml` (and with `plots`, `plots/`) into `path`. The
        files are written beside it and moved into place together, so a failure or a kill leaves an earlier result
        whole; `overwrite` replaces only an earlier result of this package, `force_overwrite` any folder.
        """
        from ..output_folder import staged_output_folder

        with staged_output_folder(path, "perturb", overwrite, force_overwrite) as staging:
            self.adata.write_h5ad(staging / "result.h5ad")
            self.de.to_csv(staging / "de.csv", index=False)
            (staging / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str))
            (staging / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
            if plots:
                self.plot(staging / "plots")
        return Path(path)

    def plot(self, folder, top: int = 6) -> list:
        """
        Write PNG plots into `folder`: a volcano per perturbation (BH-adjusted p against the null by log2 fold
        change, with the FDR and effect-floor lines), the number of significant genes per time point and group, and
        the `top` significant responders' mean control and perturbed expression over time. "Significant" is the
        `significant` column of `de` (the thresholds in `summary`). Returns the written paths.
        """
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fdr = float(self.summary.get("fdr", DEFAULT_FDR))
        floor = float(self.summary.get("min_abs_log2fc", DEFAULT_MIN_ABS_LOG2FC))
        paths = []
        table = self.de[self.de["group"] == "all"]
        for label, part in table.groupby("perturbation", sort=False):
            paths.append(_volcano(part, label, fdr, floor, folder / f"volcano_{_safe(label)}.png", plt))
            paths.append(_responders(part, self.adata, label, top, folder / f"responders_{_safe(label)}.png", plt))
        paths.append(_significant_counts(self.de, fdr, floor, folder / "significant_genes.png", plt))
        return paths

    @classmethod
    def load(cls, path) -> "PerturbationResult":
        """Read a result written by `save`."""
        path = Path(path)
        if not (path / "result.h5ad").is_file():
            raise FileNotFoundError(f"{str(path)!r} holds no saved perturbation result (no result.h5ad).")
        return cls(
            adata=ad.read_h5ad(path / "result.h5ad"),
            de=pd.read_csv(path / "de.csv"),
            summary=json.loads((path / "summary.json").read_text()),
            config=yaml.safe_load((path / "config.yaml").read_text()),
        )


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def _volcano(part, label, fdr, floor, path, plt, max_labels=8):
    times = list(dict.fromkeys(part["time_point"]))
    figure, axes = plt.subplots(1, len(times), figsize=(4.2 * len(times), 3.8), squeeze=False)
    for axis, time_point in zip(axes[0], times):
        rows = part[part["time_point"] == time_point]
        adjusted = rows["p_adjusted"].to_numpy(dtype=float)
        lfc = rows["log2_fold_change"].to_numpy(dtype=float)
        height = -np.log10(np.clip(np.nan_to_num(adjusted, nan=1.0), 1e-300, 1.0))
        hit = rows["significant"].to_numpy(dtype=bool)
        axis.scatter(lfc[~hit], height[~hit], s=6, c="tab:gray", label="not significant")
        axis.scatter(lfc[hit], height[hit], s=9, c="tab:red", label="significant")
        # The axes always span the thresholds, so that tiny effects are not blown up into a "volcano" (and no
        # offset text like "1e-6" crowds the title).
        reach = max(3 * floor, np.nanmax(np.abs(lfc)) * 1.1 if len(lfc) else 0)
        # A third more on each side: the labels' column, clear of the points.
        axis.set_xlim(-1.45 * reach, 1.45 * reach)
        axis.set_ylim(0, max(-np.log10(fdr) * 1.6, np.nanmax(height) * 1.15 if len(height) else 0))
        axis.axhline(-np.log10(fdr), color="black", lw=0.6, ls="--")
        for x in (-floor, floor):
            axis.axvline(x, color="black", lw=0.6, ls=":")
        _label_points(axis, rows[hit], lfc[hit], height[hit], max_labels)
        axis.set_title(f"{label}: {time_point} ({int(hit.sum())} significant)", fontsize=9)
        axis.set_xlabel("log2 fold change (perturbed / control)")
        axis.set_ylabel("-log10 BH-adjusted p (vs sham null)")
    handles, names = axes[0][0].get_legend_handles_labels()
    # Below the panels: a legend never covers points or labels.
    figure.legend(handles, [*names], loc="lower left", ncol=2, fontsize=7, frameon=False)
    figure.suptitle(f"dashed: FDR {fdr}; dotted: |log2 fold change| {floor}", fontsize=8, y=0.02, va="bottom")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _label_points(axis, rows, x, y, max_labels):
    """Label the most significant points, texts stacked in the free margin with leader lines so none overlap."""
    if not len(rows):
        return
    order = np.lexsort((-np.abs(x), -y))[:max_labels]
    low, high = axis.get_ylim()
    step = (high - low) / (max_labels + 2)
    for side in (-1, 1):
        chosen = [i for i in order if np.sign(x[i]) == side or (side == 1 and x[i] == 0)]
        chosen.sort(key=lambda i: -y[i])
        left, right = axis.get_xlim()
        text_x = left + 0.03 * (right - left) if side < 0 else right - 0.03 * (right - left)
        for slot, i in enumerate(chosen):
            text_y = high - (slot + 1) * step
            axis.annotate(
                rows["gene"].iloc[i],
                (x[i], y[i]),
                xytext=(text_x, text_y),
                fontsize=7,
                ha="left" if side < 0 else "right",
                va="center",
                arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.4"},
            )


def _significant_counts(de, fdr, floor, path, plt):
    counts = de.groupby(["perturbation", "group", "time_point"], sort=False)["significant"].sum().unstack("time_point")
    counts = counts[list(dict.fromkeys(de["time_point"]))]
    # Legend entries read "IL1B (all cells)" / "IL1B (CD14+ Monocytes)", not a tuple.
    counts.index = [f"{label} ({'all cells' if group == 'all' else group})" for label, group in counts.index]
    figure, axis = plt.subplots(figsize=(max(4.5, 1.2 * counts.shape[1] + 3.5), 3.6))
    counts.T.plot(kind="bar", ax=axis, rot=0)
    axis.set_ylabel("significant genes")
    axis.set_xlabel("time point")
    axis.set_title(f"BH-adjusted p (vs sham null) < {fdr} and |log2 fold change| >= {floor}", fontsize=9)
    # Outside the axes: a legend never covers a bar.
    axis.legend(fontsize=7, title="perturbation (cells)", title_fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _responders(part, adata, label, top, path, plt):
    significant = part[part["significant"].astype(bool)]
    if significant.empty:
        figure, axis = plt.subplots(figsize=(5, 2.2))
        axis.axis("off")
        axis.text(
            0.5,
            0.5,
            f"{label}: no effect beyond the null\n(no gene significant at any time point)",
            ha="center",
            va="center",
            fontsize=10,
        )
        figure.savefig(path, dpi=120)
        plt.close(figure)
        return path
    best = significant.assign(size=significant["log2_fold_change"].abs()).groupby("gene")["size"].max().nlargest(top)
    rows = (adata.obs["perturbation"] == label).to_numpy()
    obs = adata.obs[rows]
    times = list(dict.fromkeys(obs["time_point"]))
    symbols = list(adata.var["gene_symbol"]) if "gene_symbol" in adata.var else list(adata.var_names)
    figure, axes = plt.subplots(1, len(best), figsize=(2.6 * max(len(best), 1), 2.8), squeeze=False)
    for axis, gene in zip(axes[0], best.index):
        column = symbols.index(gene)
        for layer, style in (("control", "-o"), ("perturbed", "--s")):
            values = adata.layers[layer][rows]
            normalized = np.expm1(log_normalize(values))[:, column]
            means = [normalized[(obs["time_point"] == t).to_numpy()].mean() for t in times]
            axis.plot(times, means, style, label=layer, markersize=3)
        axis.set_title(gene, fontsize=9)
        axis.set_ylabel("mean CP10k", fontsize=8)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"{label}: significant responders (largest effects)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
