"""The "perturbation" pipeline (duck-types the model and tokenizer, so it also runs as remote code)."""

from .perturbation_edits import MODES, perturb_tokens
from .perturbation_result import PerturbationResult, paired_differential_expression
from .pipeline_perturbation import PerturbationPipeline


__all__ = ["MODES", "PerturbationPipeline", "PerturbationResult", "paired_differential_expression", "perturb_tokens"]
