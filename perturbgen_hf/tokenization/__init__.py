"""Rank-value tokenizer of single cells (stands alone: no other part of the package is imported)."""

from .safe_pickle import load_dictionary_pickle
from .tokenization_perturbgen import (
    PerturbGenTokenizer,
    RankedCells,
    check_raw_counts,
    counts_and_genes,
    warn_duplicate_gene_ids,
)


__all__ = [
    "PerturbGenTokenizer",
    "RankedCells",
    "check_raw_counts",
    "counts_and_genes",
    "load_dictionary_pickle",
    "warn_duplicate_gene_ids",
]
