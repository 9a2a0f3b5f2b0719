"""
perturbgen-hf: PerturbGen, a trajectory-aware generative transformer for in silico perturbation of single cells,
as a native Hugging Face transformers model.

Importing this package registers the model with `AutoConfig`, `AutoModel`, `AutoModelForSeq2SeqLM` and
`AutoTokenizer` (and, for
`trust_remote_code` exports, records the classes in `auto_map` when saving).
"""

from importlib.metadata import PackageNotFoundError, version

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

from .modeling import (
    PerturbGenConfig,
    PerturbGenForConditionalGeneration,
    PerturbGenGenerateOutput,
    PerturbGenOutput,
    PerturbGenPreTrainedModel,
)
from .pipelines import PerturbationPipeline, PerturbationResult
from .tokenization import PerturbGenTokenizer


try:
    __version__ = version("perturbgen-hf")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"


def _register_auto_classes():
    AutoConfig.register(PerturbGenConfig.model_type, PerturbGenConfig, exist_ok=True)
    AutoModel.register(PerturbGenConfig, PerturbGenForConditionalGeneration, exist_ok=True)
    AutoModelForSeq2SeqLM.register(PerturbGenConfig, PerturbGenForConditionalGeneration, exist_ok=True)
    AutoTokenizer.register(PerturbGenConfig, tokenizer_class=PerturbGenTokenizer, exist_ok=True)
    # Saved folders then carry the code and an `auto_map`, so they load with `trust_remote_code=True` where this
    # package is not installed.
    PerturbGenConfig.register_for_auto_class("AutoConfig")
    PerturbGenForConditionalGeneration.register_for_auto_class("AutoModel")
    PerturbGenTokenizer.register_for_auto_class("AutoTokenizer")


def _register_pipeline():
    from transformers.pipelines import PIPELINE_REGISTRY

    PIPELINE_REGISTRY.register_pipeline(
        "perturbation", pipeline_class=PerturbationPipeline, pt_model=AutoModel, type="multimodal"
    )


_register_auto_classes()
_register_pipeline()

__all__ = [
    "PerturbGenConfig",
    "PerturbGenForConditionalGeneration",
    "PerturbGenGenerateOutput",
    "PerturbGenOutput",
    "PerturbGenPreTrainedModel",
    "PerturbGenTokenizer",
    "PerturbationPipeline",
    "PerturbationResult",
    "__version__",
]
