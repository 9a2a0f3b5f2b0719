"""AnnData -> tokenized, paired datasets on disk, and the data collator for Trainer."""

from .collator import DataCollatorForPerturbGen
from .pairing import pair_cells
from .tokenize_dataset import load_description, resolve_time_points, select_target_genes, tokenize_anndata


__all__ = [
    "DataCollatorForPerturbGen",
    "load_description",
    "pair_cells",
    "resolve_time_points",
    "select_target_genes",
    "tokenize_anndata",
]
