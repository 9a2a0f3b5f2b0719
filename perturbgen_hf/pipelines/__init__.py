"""The "perturbation" pipeline (duck-types the model and tokenizer, so it also runs as remote code)."""

from .perturbation_edits import MODES, edit_genes, perturb_target_tokens, perturb_tokens
from .perturbation_result import PerturbationResult, paired_differential_expression
from .pipeline_perturbation import PerturbationPipeline


__all__ = [
    "MODES",
    "PerturbationPipeline",
    "PerturbationResult",
    "edit_genes",
    "paired_differential_expression",
    "perturb_target_tokens",
    "perturb_tokens",
]
