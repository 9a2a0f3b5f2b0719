"""AnnData -> tokenized, paired datasets on disk, the data collator for Trainer, and a ground-truth simulator."""

from .collator import DataCollatorForPerturbGen
from .pairing import pair_cells
from .simulate import simulate_trajectory, true_effects
from .tokenize_dataset import load_description, resolve_time_points, select_target_genes, tokenize_anndata


__all__ = [
    "DataCollatorForPerturbGen",
    "load_description",
    "pair_cells",
    "resolve_time_points",
    "select_target_genes",
    "simulate_trajectory",
    "tokenize_anndata",
    "true_effects",
]
