"""The result of an in silico perturbation: predicted counts, differential expression, a summary; saved atomically."""

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import yaml
from scipy import stats


NORMALIZED_TOTAL = 1e4


def log_normalize(counts: np.ndarray) -> np.ndarray:
    """log1p of counts per 10,000 of each row."""
    totals = counts.sum(axis=1, keepdims=True)
    return np.log1p(counts / np.where(totals > 0, totals, 1.0) * NORMALIZED_TOTAL)


def paired_differential_expression(control: np.ndarray, perturbed: np.ndarray, genes) -> pd.DataFrame:
    """
    Control vs perturbed predictions of the same cells, gene by gene.

    `log2_fold_change` = log2((mean perturbed CP10k + 1) / (mean control CP10k + 1)); the tests are paired (the same
    cell, predicted with the same random draws): Wilcoxon signed-rank (normal approximation, zeros split) and paired t
    on log1p CP10k. A gene whose
    predictions do not change in any cell gets statistic 0 and p = 1. `p_adjusted` is Benjamini-Hochberg within the
    table passed in.

    Args:
        control, perturbed (`np.ndarray` of shape `(num_cells, num_genes)`): predicted counts.
        genes (`Sequence[str]`): gene names of the columns.
    """
    cp10k_control = np.expm1(log_normalize(control))
    cp10k_perturbed = np.expm1(log_normalize(perturbed))
    log2fc = np.log2((cp10k_perturbed.mean(0) + 1.0) / (cp10k_control.mean(0) + 1.0))
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
    table = pd.DataFrame({
        "gene": list(genes), "log2_fold_change": log2fc, "mean_control": cp10k_control.mean(0),
        "mean_perturbed": cp10k_perturbed.mean(0), "wilcoxon_statistic": wilcoxon_stat, "wilcoxon_p": wilcoxon_p,
        "t_statistic": t_stat, "t_p": t_p,
    })  # fmt: skip
    table["p_adjusted"] = stats.false_discovery_control(np.clip(table["wilcoxon_p"].to_numpy(), 0, 1))
    return table


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

    def save(self, path, overwrite: bool = False) -> Path:
        """Write `result.h5ad`, `de.csv`, `summary.json` and `config.yaml` into `path`, atomically."""
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{str(path)!r} exists and is not empty; pass overwrite=True to replace it.")
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.adata.write_h5ad(staging / "result.h5ad")
            self.de.to_csv(staging / "de.csv", index=False)
            (staging / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str))
            (staging / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
            if path.exists():
                shutil.rmtree(path)
            staging.rename(path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return path

    def plot(self, folder, fdr: float = 0.05, top: int = 6) -> list:
        """
        Write PNG plots into `folder`: a volcano per perturbation and time point, the number of significant genes
        (BH-adjusted p below `fdr`) per time point and group, and the `top` responders' mean control and perturbed
        expression over time. Returns the written paths.
        """
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        table = self.de[self.de["group"] == "all"]
        for label, part in table.groupby("perturbation", sort=False):
            paths.append(_volcano(part, label, fdr, folder / f"volcano_{_safe(label)}.png", plt))
            paths.append(_responders(part, self.adata, label, top, folder / f"responders_{_safe(label)}.png", plt))
        paths.append(_significant_counts(self.de, fdr, folder / "significant_genes.png", plt))
        return paths

    @classmethod
    def load(cls, path) -> "PerturbationResult":
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


def _volcano(part, label, fdr, path, plt):
    times = list(dict.fromkeys(part["time_point"]))
    figure, axes = plt.subplots(1, len(times), figsize=(4 * len(times), 3.6), squeeze=False)
    for axis, time_point in zip(axes[0], times):
        rows = part[part["time_point"] == time_point]
        significance = -np.log10(np.clip(rows["p_adjusted"].to_numpy(), 1e-300, 1.0))
        hit = rows["p_adjusted"].to_numpy() < fdr
        axis.scatter(rows["log2_fold_change"], significance, s=6, c=np.where(hit, "tab:red", "tab:gray"))
        for _, row in rows[hit].nsmallest(5, "p_adjusted").iterrows():  # label significant genes only
            axis.annotate(
                row["gene"], (row["log2_fold_change"], -np.log10(max(row["p_adjusted"], 1e-300))), fontsize=7
            )
        axis.set_title(f"{label}: {time_point}")
        axis.set_xlabel("log2 fold change (perturbed / control)")
        axis.set_ylabel("-log10 BH-adjusted p")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _significant_counts(de, fdr, path, plt):
    counts = (de.assign(hit=de["p_adjusted"] < fdr)
              .groupby(["perturbation", "group", "time_point"], sort=False)["hit"].sum().unstack("time_point"))  # fmt: skip
    figure, axis = plt.subplots(figsize=(max(4, 1.2 * counts.shape[1] + 2), 3.6))
    counts.T.plot(kind="bar", ax=axis)
    axis.set_ylabel(f"genes with BH-adjusted p < {fdr}")
    axis.set_xlabel("time point")
    axis.legend(fontsize=7, title="perturbation, group")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _responders(part, adata, label, top, path, plt):
    best = part.assign(size=part["log2_fold_change"].abs()).groupby("gene")["size"].max().nlargest(top).index
    rows = (adata.obs["perturbation"] == label).to_numpy()
    obs = adata.obs[rows]
    times = list(dict.fromkeys(obs["time_point"]))
    symbols = list(adata.var["gene_symbol"]) if "gene_symbol" in adata.var else list(adata.var_names)
    figure, axes = plt.subplots(1, len(best), figsize=(2.6 * max(len(best), 1), 2.8), squeeze=False)
    for axis, gene in zip(axes[0], best):
        column = symbols.index(gene)
        for layer, style in (("control", "-o"), ("perturbed", "--s")):
            values = adata.layers[layer][rows]
            normalized = np.expm1(log_normalize(values))[:, column]
            means = [normalized[(obs["time_point"] == t).to_numpy()].mean() for t in times]
            axis.plot(times, means, style, label=layer, markersize=3)
        axis.set_title(gene, fontsize=9)
        axis.set_ylabel("mean CP10k", fontsize=8)
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"{label}: top responders", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
