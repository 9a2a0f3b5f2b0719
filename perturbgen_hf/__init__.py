"""
perturbgen-hf: PerturbGen, a trajectory-aware generative transformer for in silico perturbation of single cells,
as a native Hugging Face transformers model.

Importing this package registers the model with `AutoConfig`, `AutoModel`, `AutoModelForSeq2SeqLM` and
`AutoTokenizer` and the "perturbation" task with `pipeline` (and, for `trust_remote_code` exports, records the
classes in `auto_map` when saving). The public names are imported on first use; the `perturbgen-hf` console
script defers the registration (`register`) until a subcommand runs, so that its `--help` needs no torch.
"""

import sys
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


try:
    __version__ = version("perturbgen-hf")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

# Public names and the subpackage that defines each: imported on first use (PEP 562), so that what does not need
# torch (the `perturbgen-hf` command's --help and --version) does not pay for it.
_PUBLIC = {
    "PerturbGenConfig": ".modeling",
    "PerturbGenForConditionalGeneration": ".modeling",
    "PerturbGenOriginalConfig": ".modeling",
    "PerturbGenOriginalForConditionalGeneration": ".modeling",
    "PerturbGenGenerateOutput": ".modeling",
    "PerturbGenOutput": ".modeling",
    "PerturbGenPreTrainedModel": ".modeling",
    "PerturbGenTokenizer": ".tokenization",
    "PerturbationPipeline": ".pipelines",
    "PerturbationResult": ".pipelines",
    "embed_genes": ".pipelines",
    "GenePrograms": ".analysis",
    "find_gene_programs": ".analysis",
}
_registered = False


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_PUBLIC])


def register() -> None:
    """
    Register the model with `AutoConfig`, `AutoModel`, `AutoModelForSeq2SeqLM` and `AutoTokenizer`, and the
    "perturbation" task with `pipeline`. Importing the package does it; calling it again does nothing.
    """
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.pipelines import PIPELINE_REGISTRY

    from .modeling import (
        PerturbGenConfig,
        PerturbGenForConditionalGeneration,
        PerturbGenOriginalConfig,
        PerturbGenOriginalForConditionalGeneration,
    )
    from .pipelines import PerturbationPipeline
    from .tokenization import PerturbGenTokenizer

    # The package's model type and the original PerturbGen architecture's (what `convert-original` writes).
    for config_class, model_class in (
        (PerturbGenConfig, PerturbGenForConditionalGeneration),
        (PerturbGenOriginalConfig, PerturbGenOriginalForConditionalGeneration),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        AutoModelForSeq2SeqLM.register(config_class, model_class, exist_ok=True)
        AutoTokenizer.register(config_class, tokenizer_class=PerturbGenTokenizer, exist_ok=True)
        # Saved folders then carry the code and an `auto_map`, so they load with `trust_remote_code=True` where this
        # package is not installed.
        config_class.register_for_auto_class("AutoConfig")
        model_class.register_for_auto_class("AutoModel")
    PerturbGenTokenizer.register_for_auto_class("AutoTokenizer")
    PIPELINE_REGISTRY.register_pipeline(
        "perturbation", pipeline_class=PerturbationPipeline, pt_model=AutoModel, type="multimodal"
    )
    _registered = True


def _started_as_command() -> bool:
    # The `perturbgen-hf` console script imports this package before its `main` runs; it registers (through
    # `register`) only once a subcommand is going to work, so that `--help` answers without torch.
    return Path(sys.argv[0]).name in ("perturbgen-hf", "perturbgen-hf.exe") if sys.argv else False


if not _started_as_command():
    register()

__all__ = [*_PUBLIC, "__version__", "register"]
