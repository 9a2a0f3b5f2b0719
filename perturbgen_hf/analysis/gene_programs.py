"""
Gene programs from time-resolved gene embeddings: genes whose decoder states are alike, found by scanpy's kNN graph
and Leiden clustering, with their hub genes and their activity over time.

    from perturbgen_hf.analysis import find_gene_programs
    programs = find_gene_programs(embeddings, resolution=1.0, seed=0)    # embeddings: from embed_genes
    programs.summary            # per program: size, hub genes, how much its activity changes over time
    programs.screen_list(3)     # hub genes of the 3 most time-varying programs, for `perturb --screen-file`

A gene's features are its mean decoder hidden states at every embedded time point, side by side (and, with
`use_groups=True`, at every time point and group), so two genes fall together when the model treats them alike at
every time point. Where a gene was predicted in fewer than `min_cells` cells at a time point (a gene that switches on
late), its mean over the time points where it was stands in; genes predicted in too few cells everywhere are left
out (listed in `excluded`).
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse, stats

from ..pipelines.gene_embeddings import UNS_KEY, embedding_layers


logger = logging.getLogger(__name__)


@dataclass
class GenePrograms:
    """
    Gene programs of a set of gene embeddings (see [`find_gene_programs`]).

    Attributes:
        membership (`pd.DataFrame`): one row per clustered gene: `gene_id`, `gene_symbol`, `program`,
            `within_connectivity` (sum of its kNN-graph weights to genes of its program), `hub`, `umap_1`, `umap_2`.
        activity (`pd.DataFrame`): per program and time point: `time_point`, `time_value`, `predicted` (mean
            predicted log1p CP10k of its genes) and `observed` (the same from observed cells, where given).
        summary (`pd.DataFrame`): per program: `size`, `hubs`, `change` (largest minus smallest predicted activity
            over time points), `trend` (`"rises"` or `"falls"` from the first to the last predicted time point).
        excluded (`list[str]`): genes left out (too few cells at every time point).
        settings (`dict`): how the programs were found.
    """

    membership: pd.DataFrame
    activity: pd.DataFrame
    summary: pd.DataFrame
    excluded: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def top_changing(self, num_programs: int = 3) -> list[str]:
        """The `num_programs` programs whose predicted activity changes most over time."""
        return list(self.summary.sort_values(["change", "program"], ascending=[False, True])["program"][:num_programs])

    def screen_list(self, num_programs: int = 3) -> list[str]:
        """Hub genes (symbols) of the `num_programs` most time-varying programs, most central first: a screen."""
        hubs = self.membership[self.membership["hub"]]
        genes = []
        for program in self.top_changing(num_programs):
            rows = hubs[hubs["program"] == program].sort_values("within_connectivity", ascending=False)
            genes += [g for g in rows["gene_symbol"] if g not in genes]
        return genes

    def program_of(self, genes) -> dict:
        """`{gene: program}` for genes given by symbol or id (case-insensitive); None where not clustered."""
        lookup = {}
        for row in self.membership.itertuples():
            lookup[str(row.gene_symbol).upper()] = row.program
            lookup[str(row.gene_id).upper()] = row.program
        return {g: lookup.get(str(g).upper()) for g in genes}


def find_gene_programs(
    embeddings: ad.AnnData,
    resolution: float = 1.0,
    n_neighbors: int = 15,
    n_pcs: int = 30,
    min_cells: int = 5,
    num_hubs: int = 3,
    use_groups: bool = False,
    observed: pd.DataFrame | None = None,
    observed_time_values: dict | None = None,
    seed: int = 0,
) -> GenePrograms:
    """
    Cluster gene embeddings into gene programs (scanpy: PCA, kNN graph, Leiden; a UMAP for plotting).

    Args:
        embeddings (`anndata.AnnData`): the output of [`embed_genes`] (genes x hidden).
        resolution (`float`, defaults to 1.0): Leiden resolution (higher: more, smaller programs).
        n_neighbors (`int`, defaults to 15): neighbours per gene in the kNN graph.
        n_pcs (`int`, defaults to 30): principal components the graph is built on (at most genes - 1).
        min_cells (`int`, defaults to 5): a gene's mean at a time point counts if it was predicted in at least this
            many cells there; elsewhere its mean over the time points where it was is used, and a gene with none is
            left out.
        num_hubs (`int`, defaults to 3): hub genes per program (highest within-program connectivity).
        use_groups (`bool`, defaults to `False`): use the per-group layers (time point x group) as features.
        observed (`pd.DataFrame`, *optional*): observed mean log1p CP10k, indexed by gene id (as `embeddings`),
            one column per time point label (see [`observed_expression`]).
        observed_time_values (`dict`, *optional*): time value of each observed label (to order them with the
            predicted ones); defaults to the embeddings' values, then to the label's position.
        seed (`int`, defaults to 0): seeds PCA, Leiden and UMAP.

    Returns:
        [`GenePrograms`].
    """
    if not resolution > 0:
        raise ValueError(f"resolution must be > 0, got {resolution}.")
    for name, value in (("n_neighbors", n_neighbors), ("n_pcs", n_pcs), ("num_hubs", num_hubs)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}.")
    if int(min_cells) < 1:
        raise ValueError(f"min_cells must be >= 1, got {min_cells}.")
    layers = embedding_layers(embeddings, groups=use_groups)
    features, keep = _features(embeddings, layers, int(min_cells))
    excluded = list(embeddings.obs_names[~keep])
    if keep.sum() <= int(n_neighbors):
        raise ValueError(
            f"Only {int(keep.sum())} genes were predicted in at least {min_cells} cells at some time point: too few "
            f"for a {n_neighbors}-neighbour graph. Embed more cells (or samples), or lower min_cells / n_neighbors."
        )
    genes = ad.AnnData(X=features.astype(np.float32), obs=embeddings.obs.loc[keep, ["gene_symbol"]].copy())
    n_comps = min(int(n_pcs), genes.n_obs - 1, genes.n_vars - 1)
    membership = _cluster(genes, n_comps, int(n_neighbors), float(resolution), seed)
    membership["hub"] = _hubs(membership, int(num_hubs))
    activity = _activity(embeddings, membership, observed, observed_time_values)
    summary = _summary(membership, activity)
    settings = {
        "resolution": float(resolution),
        "n_neighbors": int(n_neighbors),
        "n_pcs": int(n_comps),
        "min_cells": int(min_cells),
        "num_hubs": int(num_hubs),
        "use_groups": bool(use_groups),
        "layers": layers,
        "seed": int(seed),
        "genes_clustered": int(keep.sum()),
        "genes_excluded": len(excluded),
    }
    return GenePrograms(membership, activity, summary, excluded, settings)


def _cluster(genes: ad.AnnData, n_comps: int, n_neighbors: int, resolution: float, seed: int) -> pd.DataFrame:
    """PCA, kNN graph, Leiden and UMAP of the genes (scanpy's); one row per gene: its program, connectivity, UMAP."""
    import scanpy as sc

    sc.pp.pca(genes, n_comps=n_comps, random_state=seed)
    sc.pp.neighbors(genes, n_neighbors=n_neighbors, use_rep="X_pca", random_state=seed)
    sc.tl.leiden(genes, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    sc.tl.umap(genes, random_state=seed)
    programs = _programs_by_size(genes.obs["leiden"].astype(str).to_numpy())
    return pd.DataFrame(
        {
            "gene_id": genes.obs_names.astype(str),
            "gene_symbol": genes.obs["gene_symbol"].astype(str).to_numpy(),
            "program": programs,
            "within_connectivity": _within_connectivity(genes.obsp["connectivities"], programs),
            "umap_1": genes.obsm["X_umap"][:, 0],
            "umap_2": genes.obsm["X_umap"][:, 1],
        }
    )


def _features(embeddings, layers, min_cells):
    """
    Each gene's embeddings at every layer, side by side. Where a gene was predicted in fewer than `min_cells` cells
    at a layer, that layer's mean is unreliable (or absent), so it is replaced by the gene's cell-weighted mean over
    the layers where it has enough: a gene that switches on late (an interferon response gene, not generated at 2h)
    is kept and compared with the others by what the model does with it once it is there. Genes without any such
    layer are left out.

    Returns:
        `(features, keep)`: `np.ndarray` of shape `(genes kept, layers x hidden)` and the boolean mask of kept genes.
    """
    n_cells = embeddings.obsm["n_cells"][layers].to_numpy().astype(np.float64)
    stacked = np.stack([np.asarray(embeddings.layers[name], dtype=np.float64) for name in layers], axis=1)
    enough = n_cells >= min_cells
    keep = enough.any(axis=1)
    weights = np.where(enough, n_cells, 0.0)
    fallback = (stacked * weights[..., None]).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)[:, None]
    filled = np.where(enough[..., None], stacked, fallback[:, None, :])
    return filled[keep].reshape(int(keep.sum()), -1), keep


def _programs_by_size(labels: np.ndarray) -> np.ndarray:
    """Leiden labels renamed P1, P2, ... from the largest cluster down (ties by Leiden's label)."""
    sizes = pd.Series(labels).value_counts()
    order = sorted(sizes.index, key=lambda label: (-sizes[label], int(label) if label.isdigit() else label))
    names = {label: f"P{i + 1}" for i, label in enumerate(order)}
    return np.array([names[label] for label in labels])


def _within_connectivity(connectivities, programs: np.ndarray) -> np.ndarray:
    """Sum of each gene's graph weights to the other genes of its program."""
    graph = sparse.csr_matrix(connectivities)
    rows, cols = graph.nonzero()
    same = programs[rows] == programs[cols]
    weights = np.asarray(graph[rows, cols]).ravel() * same
    return np.bincount(rows, weights=weights, minlength=len(programs))


def _hubs(membership: pd.DataFrame, num_hubs: int) -> np.ndarray:
    ranked = membership.sort_values(["program", "within_connectivity", "gene_symbol"], ascending=[True, False, True])
    hubs = ranked.groupby("program", sort=False).head(num_hubs).index
    return membership.index.isin(hubs)


def _activity(embeddings, membership, observed, observed_time_values):
    record = embeddings.uns[UNS_KEY]
    predicted = embeddings.obsm["predicted_expression"]
    values = dict(zip(record["time_points"], record["time_values"]))
    labels = list(record["time_points"])
    if observed is not None:
        values = {**{str(k): float(v) for k, v in (observed_time_values or {}).items()}, **values}
        labels += [str(c) for c in observed.columns if str(c) not in labels]
    positions = {label: float(i) for i, label in enumerate(labels)}
    rows = []
    for program, members in membership.groupby("program", sort=False)["gene_id"]:
        for label in labels:
            row = {
                "program": program,
                "time_point": label,
                "time_value": values.get(label, positions[label]),
                "predicted": np.nan,
                "observed": np.nan,
            }
            if label in record["time_points"]:
                row["predicted"] = float(predicted.loc[members, label].mean())
            if observed is not None and label in observed.columns:
                row["observed"] = float(observed.reindex(members)[label].mean())
            rows.append(row)
    activity = pd.DataFrame(rows)
    return activity.sort_values(["program", "time_value"], key=_program_order, ignore_index=True)


def _program_order(column):
    if column.name == "program":
        return column.str[1:].astype(int)
    return column


def _summary(membership, activity):
    rows = []
    for program, members in membership.groupby("program", sort=False):
        curve = activity[(activity["program"] == program)].dropna(subset=["predicted"])["predicted"].to_numpy()
        hubs = members[members["hub"]].sort_values("within_connectivity", ascending=False)["gene_symbol"]
        rows.append(
            {
                "program": program,
                "size": len(members),
                "hubs": ", ".join(hubs),
                "change": float(np.ptp(curve)) if len(curve) else 0.0,
                "trend": "rises" if len(curve) > 1 and curve[-1] > curve[0] else "falls",
                "genes": ", ".join(members.sort_values("within_connectivity", ascending=False)["gene_symbol"]),
            }
        )
    summary = pd.DataFrame(rows)
    return summary.sort_values("program", key=_program_order, ignore_index=True)


def observed_expression(adata: ad.AnnData, time_key: str, tokenizer, gene_ids=None, layer=None) -> pd.DataFrame:
    """
    Mean observed log1p counts per 10,000 of the model's target genes per time point, in the model's units (counts
    per 10,000 of the target genes, as its count head predicts them).

    Args:
        adata (`anndata.AnnData`): cells with raw counts. time_key (`str`): obs column of time point labels.
        tokenizer ([`PerturbGenTokenizer`]): the model's tokenizer (maps the data's genes onto the target genes).
        gene_ids (`str` or `list`, *optional*): var column (or list) of gene identifiers. layer (`str`, *optional*).

    Returns:
        `pd.DataFrame` indexed by target gene id, one column per time point label (in the data's order).
    """
    from ..pipelines.inputs import counts_and_gene_ids
    from ..tokenization import log_normalize

    if time_key not in adata.obs.columns:
        raise KeyError(f"time key {time_key!r} is not an obs column; available: {list(adata.obs.columns)}.")
    counts, identifiers = counts_and_gene_ids(adata, gene_ids, layer)
    target = tokenizer.target_counts(counts, identifiers)
    labels = adata.obs[time_key].astype(str).to_numpy()
    order = list(adata.obs[time_key].cat.categories) if hasattr(adata.obs[time_key], "cat") else None
    columns = {}
    for label in [str(x) for x in (order or dict.fromkeys(labels))]:
        rows = np.nonzero(labels == label)[0]
        if len(rows):
            block = target[rows]
            block = block.toarray() if sparse.issparse(block) else np.asarray(block)
            columns[label] = log_normalize(block.astype(np.float64)).mean(axis=0)
    return pd.DataFrame(columns, index=pd.Index(list(tokenizer.target_genes), name="gene_id"))


def read_gmt(path) -> dict[str, list[str]]:
    """
    Gene sets from a GMT file (one set per line: name, description, then genes, tab-separated).

    Returns:
        `dict` of set name -> genes, in the file's order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Gene set file not found: {str(path)!r}")
    gene_sets = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) < 3:
            raise ValueError(
                f"{path}:{number}: a GMT line is name<TAB>description<TAB>gene..., got {len(fields)} field(s)."
            )
        genes = [g.strip() for g in fields[2:] if g.strip()]
        if fields[0] in gene_sets:
            raise ValueError(f"{path}:{number}: gene set {fields[0]!r} appears twice.")
        gene_sets[fields[0]] = genes
    if not gene_sets:
        raise ValueError(f"{path} holds no gene set.")
    return gene_sets


def gene_set_enrichment(programs: GenePrograms, gene_sets: dict) -> pd.DataFrame:
    """
    Overlap of every program with every gene set: a one-sided hypergeometric test against the clustered genes as
    the universe, BH-adjusted over all program x set tests. Genes match by symbol or id, case-insensitively.

    Returns:
        `pd.DataFrame`: `program`, `gene_set`, `overlap`, `program_size`, `set_size` (genes of the set in the
        universe), `universe`, `p_value`, `fdr`, `genes` (the overlap); sorted by p-value.
    """
    membership = programs.membership
    key_of = {}
    for row in membership.itertuples():
        key_of[str(row.gene_symbol).upper()] = row.gene_id
        key_of[str(row.gene_id).upper()] = row.gene_id
    symbol = dict(zip(membership["gene_id"], membership["gene_symbol"]))
    universe = len(membership)
    rows = []
    for name, genes in gene_sets.items():
        members = {key_of[g.upper()] for g in genes if g.upper() in key_of}
        for program, ids in membership.groupby("program", sort=False)["gene_id"]:
            overlap = sorted(set(ids) & members, key=lambda g: symbol[g])
            # P(X >= overlap) for X ~ Hypergeometric(universe, set size, program size).
            p = stats.hypergeom.sf(len(overlap) - 1, universe, len(members), len(ids)) if members else 1.0
            rows.append(
                {
                    "program": program,
                    "gene_set": name,
                    "overlap": len(overlap),
                    "program_size": len(ids),
                    "set_size": len(members),
                    "universe": universe,
                    "p_value": float(p),
                    "genes": ", ".join(symbol[g] for g in overlap),
                }
            )
    table = pd.DataFrame(rows)
    table["fdr"] = stats.false_discovery_control(table["p_value"].to_numpy(), method="bh")
    columns = ["program", "gene_set", "overlap", "program_size", "set_size", "universe", "p_value", "fdr", "genes"]
    return table[columns].sort_values(["p_value", "program", "gene_set"], ignore_index=True)
