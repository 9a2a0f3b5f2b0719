"""Analyses built on a trained model's outputs: gene programs from time-resolved gene embeddings."""

from .gene_programs import (
    GenePrograms,
    find_gene_programs,
    gene_set_enrichment,
    observed_expression,
    read_gmt,
)
from .program_plots import plot_gene_programs


__all__ = [
    "GenePrograms",
    "find_gene_programs",
    "gene_set_enrichment",
    "observed_expression",
    "plot_gene_programs",
    "read_gmt",
]
