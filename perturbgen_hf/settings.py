"""
The settings that the commands' parsers show and the code that runs them reads: training presets and argument
dataclasses, the CPU training of the demo and `evaluate`, the demo's and the evaluation's settings, pairing modes.
Standard library only, so that `perturbgen-hf ... --help` answers without importing torch (about 2 s on its own).
"""

from dataclasses import dataclass, field


PAIRING_MODES = ("random", "stratified", "mapping", "transport")

# The perturbation pipeline's call arguments, by the step that reads them (`PerturbationPipeline`); `batch_size` is
# the number of cells per batch (the pipeline's `cell_batch_size`). The `perturb` command's options and YAML keys
# are these names.
PERTURBATION_ARGUMENTS = {
    "preprocess": (
        "genes",
        "screen",
        "mode",
        "site",
        "perturb_time_points",
        "gene_ids",
        "layer",
        "group_key",
        "method",
        "targets",
        "null_perturbations",
        "seed",
    ),
    "forward": (
        "time_points",
        "num_samples",
        "iterations",
        "temperature",
        "seed",
        "batch_size",
        "variants_per_batch",
        "progress",
    ),
    "postprocess": ("fdr", "min_abs_log2fc", "bootstrap"),
}
# How time values are scaled before the time embedding (see `perturbgen_hf.training.time_embedding_scale`).
TIME_SCALES = ("gap", "span")

# Encoder and decoder sizes of models built from scratch. "tiny" trains 20 steps in about 11 s on 2 CPU cores
# (README: Training); "base" has the Geneformer V2 encoder shape.
PRESETS = {
    "tiny": {
        "encoder": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64},
        "decoder": {
            "decoder_hidden_size": 32,
            "decoder_num_layers": 2,
            "decoder_num_heads": 4,
            "decoder_intermediate_size": 64,
        },
    },
    "compact": {
        "encoder": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128},
        "decoder": {
            "decoder_hidden_size": 64,
            "decoder_num_layers": 3,
            "decoder_num_heads": 4,
            "decoder_intermediate_size": 256,
        },
    },
    "small": {
        "encoder": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 256},
        "decoder": {
            "decoder_hidden_size": 128,
            "decoder_num_layers": 4,
            "decoder_num_heads": 4,
            "decoder_intermediate_size": 512,
        },
    },
    "base": {
        "encoder": {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8, "intermediate_size": 1024},
        "decoder": {
            "decoder_hidden_size": 512,
            "decoder_num_layers": 6,
            "decoder_num_heads": 8,
            "decoder_intermediate_size": 2048,
        },
    },
}
OBJECTIVES = ("joint", "tokens", "counts")


@dataclass
class ModelArguments:
    """Which model to train."""

    preset: str = field(
        default="tiny", metadata={"help": "size of a model built from scratch: tiny, compact, small or base"}
    )
    geneformer: str | None = field(
        default=None, metadata={"help": "local Geneformer BertForMaskedLM folder to use as the encoder"}
    )
    model: str | None = field(default=None, metadata={"help": "saved PerturbGen model to continue training"})
    freeze_encoder: bool = field(
        default=True,
        metadata={"help": "whether the encoder's weights stay fixed (true; --no_freeze_encoder trains them)"},
    )
    count_likelihood: str = field(default="zinb", metadata={"help": "zinb, nb or mse"})
    library_size_source: str = field(
        default="predicted", metadata={"help": "library size of the count head: predicted (by a head) or observed"}
    )
    context_mode: str = field(
        default="previous",
        metadata={"help": "previous, all or none (a new model; converted original models keep their own)"},
    )
    source_path: str = field(
        default="presence",
        metadata={
            "help": "undiluted source summary added to the decoder: presence, rank (presence + rank-weighted) "
            "or none (cross-attention only, as the original)"
        },
    )
    source_path_injection: str = field(default="add", metadata={"help": "add or film"})
    source_path_map: str = field(
        default="linear",
        metadata={
            "help": "normalized (LayerNorm + linear map of the sum) or linear (the sum of zero-initialised "
            "gene embeddings itself)"
        },
    )
    count_head_reads_source: bool = field(
        default=True, metadata={"help": "the count head also reads the source path's summary"}
    )
    count_readout: str = field(
        default="per_gene", metadata={"help": "per_gene (each gene's own decoder state) or pooled (the original's)"}
    )
    mask_schedule: str = field(default="cosine", metadata={"help": "cosine, pow or linear"})
    time_scale: str = field(
        default="gap",
        metadata={
            "help": "the time values' scale before the time embedding's sinusoids: gap (the smallest gap between "
            "time points is 1) or span (source to last time point is 1: slow, smooth sinusoids)"
        },
    )


@dataclass
class DataArguments:
    """Where the data come from and how they are used."""

    data: str = field(default=None, metadata={"help": "output folder of `perturbgen-hf tokenize`"})
    out: str | None = field(default=None, metadata={"help": "where the trained model goes (sets --output_dir)"})
    config: str | None = field(
        default=None, metadata={"help": "YAML file of any of these options; the command line wins"}
    )
    objective: str = field(
        default="joint",
        metadata={"help": "joint (tokens + counts), tokens (stage 1) or counts (stage 2: only the count head trains)"},
    )
    count_loss_weight: float = field(default=1.0, metadata={"help": "weight of the count loss in the joint objective"})
    target_time_points: str = field(default="random", metadata={"help": "random (one per example and step) or all"})
    heldout_time_point: str | None = field(
        default=None,
        metadata={"help": "leave this time point out of training and validate on it (interpolation or extrapolation)"},
    )
    eval_fraction: float = field(
        default=0.1, metadata={"help": "fraction of source cells held out for validation, per group (0: none)"}
    )
    max_source_length: int | None = field(default=1024, metadata={"help": "keep the top-ranked source genes"})
    max_target_length: int | None = field(default=512, metadata={"help": "keep the top-ranked target genes"})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "stop after this many evaluations without improvement"}
    )
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "train into the folder of an earlier perturbgen-hf run (its model files are replaced at the end)"
        },
    )
    force_overwrite: bool = field(
        default=False, metadata={"help": "train into a non-empty folder even if perturbgen-hf did not write it"}
    )


@dataclass
class CpuTrainingSettings:
    """The training of a small model on a CPU (the demo's and `evaluate`'s; see [`train_on_cpu`])."""

    preset: str = "compact"
    max_steps: int = 400
    batch_size: int = 16
    learning_rate: float = 2e-3
    freeze_encoder: bool = True
    max_source_length: int = 256
    max_target_length: int = 128
    context_mode: str = "previous"
    source_path: str = "presence"
    source_path_injection: str = "add"
    source_path_map: str = "linear"
    count_head_reads_source: bool = True
    count_readout: str = "per_gene"
    time_scale: str = "gap"
    seed: int = 0

    def check(self) -> None:
        """Raise a `ValueError` naming the first bad setting, before any work starts."""
        if self.preset not in PRESETS:
            raise ValueError(f"Unknown preset {self.preset!r}; choose one of {list(PRESETS)}.")
        _check_positive(self, "max_steps", "batch_size", "max_source_length", "max_target_length")
        if self.time_scale not in TIME_SCALES:
            raise ValueError(f"Unknown time_scale {self.time_scale!r}; choose one of {list(TIME_SCALES)}.")
        if not 0.0 < self.learning_rate < float("inf"):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}.")


PROTOCOLS = ("heldout-time", "heldout-group", "heldout-cells")


@dataclass
class EvaluationSettings(CpuTrainingSettings):
    """Every number an evaluation run uses (generation, metric depths; training: the base class)."""

    n_hvg: int = 500
    iterations: int = 8
    generation_batch_size: int = 32
    heldout_fraction: float = 0.2
    top_de: int = 20
    top_r2: int = 100
    overlap_k: int = 50
    token_k: int = 25
    n_pcs: int = 50
    linear_components: int = 10
    linear_ridge: float = 0.1
    # The OT interpolation baseline: the exact plan up to this many cell pairs (a 2,000 x 2,000 plan solves in
    # seconds), entropic beyond, with this epsilon relative to the median squared distance.
    ot_exact_max_pairs: int = 4_000_000
    ot_epsilon: float = 0.05
    fdr: float = 0.05
    # How the model's cells become counts (`MODEL_COUNTS`). "poisson": measured on Kang (every cell type's stimulated
    # cells predicted from its control cells, validation model without CD8 T cells), draws from the fitted (ZI)NB
    # had 7-9 points more zeros than the observed cells and 1.4-2.0 times their variance, which biased every gene's
    # mean log1p CP10k by -0.18 to -0.22 and doubled the mse on trained cell types (0.060-0.104 against 0.029-0.067
    # with Poisson draws): the generated genes already vary from cell to cell as the cells do, and the NB's extra
    # dispersion, fitted in training, counts that variation twice.
    model_counts: str = "poisson"
    # "transport" (optimal-transport pairs, within the pairing key's groups; see `perturbgen_hf.data.pair_cells`): a
    # source then carries information about its own future, which stratified pairs (by the key, random without one)
    # do not; "stratified" is the original's.
    pairing: str = "transport"

    def check(self) -> None:
        """Raise a `ValueError` naming the first bad setting (training's, then evaluation's), before any work."""
        super().check()
        _check_positive(
            self,
            "n_hvg",
            "iterations",
            "generation_batch_size",
            "top_de",
            "top_r2",
            "overlap_k",
            "token_k",
            "n_pcs",
            "linear_components",
            "ot_exact_max_pairs",
        )
        if not self.ot_epsilon > 0:
            raise ValueError(f"ot_epsilon must be > 0, got {self.ot_epsilon}.")
        if self.model_counts not in MODEL_COUNTS:
            raise ValueError(f"Unknown model_counts {self.model_counts!r}; choose one of {list(MODEL_COUNTS)}.")
        if self.pairing not in ("stratified", "transport"):
            raise ValueError(f"Unknown pairing {self.pairing!r}; choose stratified or transport.")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be between 0 and 1, got {self.heldout_fraction}.")
        if not 0.0 < self.fdr < 1.0:
            raise ValueError(f"fdr must be between 0 and 1, got {self.fdr}.")


# How `evaluate` turns the model's output into cells: Poisson draws around the expected counts (the default),
# draws from the model's own (ZI)NB ("sample"), or the expected counts themselves ("mean", which collapse every
# distribution metric).
MODEL_COUNTS = ("poisson", "sample", "mean")


def _check_positive(settings, *names) -> None:
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value}.")


@dataclass
class DemoSettings(CpuTrainingSettings):
    """Sizes and settings of a demo run (every number the demo uses lives here; training: the base class)."""

    num_clones: int = 300
    cells_per_clone: int = 2
    heldout_fraction: float = 0.25
    regulator: str = "REG1"
    # Chosen on validation seeds 2 and 3 of this simulator (benchmarks/README.md): training on each target's top 32
    # genes instead of 128 cut spurious effects on unaffected genes (seed 2, 800 steps: Pearson 0.58-0.68 at 128
    # genes, 0.80-0.88 at 32); with 1,600 steps AUROC 0.98-1.00 and Pearson 0.84-0.95 at seeds 2 and 3.
    max_steps: int = 1600
    max_target_length: int = 32
    context_mode: str = "none"
    iterations: int = 4
    # Independent generations pooled per cell (MaskGIT sampling is chaotic: one sample alone is noisy).
    num_samples: int = 2
    temperature: float = 1.0
    # Sham knockouts of genes expressed like the regulator: the null its effects are called significant against.
    null_perturbations: int = 10
    target_auroc: float = 0.95
    target_pearson: float = 0.8
    responder_threshold: float = 0.5
    unaffected_threshold: float = 0.1
    ridge: float = 10.0
    max_cells: int = 400


# A tiny variant for the test suite (well under a minute); its scores mean nothing.
FAST = DemoSettings(
    num_clones=40,
    preset="tiny",
    max_steps=8,
    iterations=2,
    num_samples=1,
    max_source_length=64,
    max_target_length=64,
    null_perturbations=3,
)
