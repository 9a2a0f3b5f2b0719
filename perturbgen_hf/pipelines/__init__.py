"""The "perturbation" pipeline and gene embeddings (duck-type the model and tokenizer, so they also run as remote code)."""

from .gene_embeddings import embed_genes
from .perturbation_edits import MODES, edit_genes, perturb_target_tokens, perturb_tokens
from .perturbation_result import PerturbationResult, paired_differential_expression
from .pipeline_perturbation import PerturbationPipeline


__all__ = [
    "MODES",
    "PerturbationPipeline",
    "PerturbationResult",
    "edit_genes",
    "embed_genes",
    "paired_differential_expression",
    "perturb_target_tokens",
    "perturb_tokens",
]
