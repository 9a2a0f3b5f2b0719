"""Rank-value tokenizer of single cells (stands alone: no other part of the package is imported)."""

from .ranking import NORMALIZED_TOTAL, RankedCells, check_raw_counts, log_normalize
from .safe_pickle import load_dictionary_pickle
from .tokenization_perturbgen import PerturbGenTokenizer, counts_and_genes, warn_duplicate_gene_ids


__all__ = [
    "NORMALIZED_TOTAL",
    "PerturbGenTokenizer",
    "RankedCells",
    "check_raw_counts",
    "counts_and_genes",
    "load_dictionary_pickle",
    "log_normalize",
    "warn_duplicate_gene_ids",
]
