"""PerturbGen configuration, model, MaskGIT masking and count likelihoods (tensors only); the original architecture's model type."""

from .configuration_original_perturbgen import PerturbGenOriginalConfig
from .configuration_perturbgen import PerturbGenConfig
from .likelihoods_perturbgen import (
    negative_binomial_log_prob,
    sample_negative_binomial,
    sample_poisson,
    zero_inflated_negative_binomial_log_prob,
    zero_inflated_negative_binomial_mean,
)
from .masking_perturbgen import mask_ratio, num_masked_after_step, sample_training_mask
from .modeling_original_perturbgen import PerturbGenOriginalForConditionalGeneration
from .modeling_perturbgen import (
    PerturbGenForConditionalGeneration,
    PerturbGenGenerateOutput,
    PerturbGenOutput,
    PerturbGenPreTrainedModel,
)


__all__ = [
    "PerturbGenConfig",
    "PerturbGenForConditionalGeneration",
    "PerturbGenGenerateOutput",
    "PerturbGenOriginalConfig",
    "PerturbGenOriginalForConditionalGeneration",
    "PerturbGenOutput",
    "PerturbGenPreTrainedModel",
    "mask_ratio",
    "negative_binomial_log_prob",
    "num_masked_after_step",
    "sample_negative_binomial",
    "sample_poisson",
    "sample_training_mask",
    "zero_inflated_negative_binomial_log_prob",
    "zero_inflated_negative_binomial_mean",
]
