"""PerturbGen model configuration."""

import math

from transformers import BertConfig, PreTrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Geneformer V2 (gf-12L-95M-i4096) shape: the default encoder when none is given.
GENEFORMER_V2_ENCODER_DEFAULTS = {
    "vocab_size": 20275,
    "hidden_size": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "intermediate_size": 1024,
    "max_position_embeddings": 4096,
    "hidden_act": "relu",
    "hidden_dropout_prob": 0.02,
    "attention_probs_dropout_prob": 0.02,
    "pad_token_id": 0,
}

_NORMS = ("pre", "post")
_LIKELIHOODS = ("zinb", "nb", "mse")
_LIBRARY_SIZES = ("predicted", "observed")
_SCHEDULES = ("cosine", "pow", "linear")
_SOURCE_PATHS = ("rank", "presence", "none")
_SOURCE_PATH_INJECTIONS = ("add", "film")
_SOURCE_PATH_MAPS = ("normalized", "linear")
NUM_SPECIAL_TOKENS = 4
# log(10,000): a typical 10x library size, the starting point of the library-size head.
DEFAULT_LOG_LIBRARY_SIZE = math.log(10_000)


def _check_positive_int(name, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        bound = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"`{name}` must be {bound} integer, got {value!r}.")


def _check_probability(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1), got {value!r}.")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


class PerturbGenConfig(PreTrainedConfig):
    r"""
    Configuration of a [`PerturbGenForConditionalGeneration`] model: a Geneformer-style BERT encoder that reads the
    source cell, and a bidirectional decoder that generates the gene-token sequence of the cell at later time points
    (MaskGIT) and maps it to expression counts.

    Vocabulary of the decoder: ids `0..3` are `<pad>`, `<mask>`, `<cls>`, `<eos>`; ids `4 .. 4 + num_target_genes - 1`
    are the target genes in the order of `target_genes` (so count column `g` belongs to token id `4 + g`); the
    condition tokens follow.

    Args:
        encoder (`BertConfig` or `dict`, *optional*):
            Configuration of the encoder, kept verbatim (a Geneformer `config.json` drops in). Defaults to the
            Geneformer V2 shape (12 layers, hidden 512, vocabulary 20,275, 4,096 positions).
        freeze_encoder (`bool`, *optional*, defaults to `True`):
            Keep the encoder's weights fixed and the encoder in eval mode.
        max_source_length (`int`, *optional*):
            Source cells are truncated to their top-ranked genes (then `<eos>`) at this length, in training and in
            perturbation alike. Defaults to the encoder's `max_position_embeddings`.
        decoder_hidden_size (`int`, *optional*, defaults to 512):
            Width of the decoder's residual stream.
        decoder_num_layers (`int`, *optional*, defaults to 6):
            Number of decoder layers (self-attention, cross-attention, feed-forward).
        decoder_num_heads (`int`, *optional*, defaults to 8):
            Attention heads per decoder attention block.
        decoder_head_dim (`int`, *optional*):
            Width of one attention head. The attention width is `decoder_num_heads * decoder_head_dim`, which may
            differ from `decoder_hidden_size` (as in the original PerturbGen). Defaults to
            `decoder_hidden_size // decoder_num_heads`.
        decoder_intermediate_size (`int`, *optional*, defaults to 2048):
            Width of the feed-forward block.
        decoder_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on embeddings and residual branches.
        decoder_attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities.
        decoder_norm (`str`, *optional*, defaults to `"pre"`):
            `"pre"` (LayerNorm before each block, plus a final LayerNorm) or `"post"` (after each residual sum, as in
            the original PerturbGen).
        decoder_max_position_embeddings (`int`, *optional*, defaults to 2048):
            Longest target sequence (condition tokens included).
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the decoder's LayerNorms.
        time_points (`list[str]`, *optional*, defaults to `["t1", "t2"]`):
            Names of the target time points the decoder models, in temporal order.
        time_values (`list[float]`, *optional*):
            Numeric value of each time point (e.g. hours), strictly increasing. The decoder embeds the value, not the
            index, so `generate` accepts values never seen in training. Defaults to `1, 2, ...`.
        source_time_point (`str`, *optional*):
            Name of the source (encoder) state, for the record.
        time_embedding_scale (`float`, *optional*, defaults to 1.0):
            Time values are multiplied by this before the sinusoidal embedding (choose it so that the trained time
            points are a few units apart).
        context_mode (`str`, *optional*, defaults to `"previous"`):
            What the decoder cross-attends to besides the source: `"previous"` (the earlier time points),
            `"all"` (every other time point, as in the original; at inference only those already generated exist)
            or `"none"`.
        context_gradient (`bool`, *optional*, defaults to `False`):
            Back-propagate through the context passes (the original computes them without gradient).
        source_path (`str`, *optional*, defaults to `"presence"`):
            An undiluted summary of the source cell that reaches every decoder position besides cross-attention: a
            sum over the source's genes of learned gene embeddings. `"rank"`: each gene contributes a presence
            embedding plus a second embedding weighted by `1 / log2(rank + 1)` (rank 1 = the top gene), so the sum
            carries expression; `"presence"`: the presence embeddings only; `"none"`: no summary (the original
            PerturbGen, where the source reaches the decoder only through cross-attention). Edits act on it as on
            the tokens: a deleted, masked or padded gene drops out of the sum; an overexpressed one moves to weight 1.
            A *mean* over ~200 source tokens (which uniform cross-attention computes) dilutes one gene 200-fold; the
            sum does not.
        source_path_injection (`str`, *optional*, defaults to `"add"`):
            How the summary enters the decoder: `"add"` (added to every input embedding, like the time embedding)
            or `"film"` (a learned scale and shift of every input embedding).
        source_path_map (`str`, *optional*, defaults to `"linear"`):
            How the sum becomes the decoder's shift: `"normalized"` (LayerNorm of the sum, then a learned linear map
            that starts at zero) or `"linear"` (the sum itself, of gene embeddings that start at zero: a linear map of
            the per-gene weight vector, where each gene's contribution is its own and is not rescaled by the others).
        count_head_reads_source (`bool`, *optional*, defaults to `True`):
            With a source path, the count head reads its summary besides the pooled decoder states, so predicted
            counts follow the source directly and not only through the (sampled) generated genes.
        count_readout (`str`, *optional*, defaults to `"per_gene"`):
            `"per_gene"`: each generated gene's own decoder state adds to that gene's count logits (genes not generated
            keep the pooled head's); `"pooled"`: the count head reads only the mean-pooled cell embedding (the
            original's).
        target_genes (`list[str]`, *optional*):
            Gene identifiers (Ensembl IDs) of the decoder's vocabulary, in token-id order.
        num_target_genes (`int`, *optional*, defaults to 2000):
            Number of target genes when `target_genes` is not given; must match `len(target_genes)` otherwise.
        condition_tokens (`list[str]`, *optional*):
            Names of condition tokens (e.g. `"donor=A"`) that may be prepended to a target sequence.
        count_likelihood (`str`, *optional*, defaults to `"zinb"`):
            `"zinb"`, `"nb"` or `"mse"` (squared error on log1p of counts per 10,000).
        library_size_source (`str`, *optional*, defaults to `"predicted"`):
            Where the count head's library size comes from: `"predicted"` by a head (a perturbation may change total
            expression) or `"observed"` (given by the caller as the `library_size` tensor). Configs saved before this
            name existed call it `library_size`; they load unchanged.
        count_hidden_size (`int`, *optional*):
            Width of the count head's hidden layer. Defaults to `decoder_hidden_size`.
        log_library_size_init (`float`, *optional*, defaults to `log(10_000)`):
            Initial bias of the library-size head (the log of a typical library size of the data).
        token_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the masked-token cross entropy (averaged per cell, then over cells) in `loss`.
        count_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the count loss (mean negative log-likelihood per gene and cell) in `loss`.
        mask_schedule (`str`, *optional*, defaults to `"cosine"`):
            MaskGIT schedule, the fraction still masked as a function of progress `r`: `"cosine"` cos(pi r / 2),
            `"pow"` 1 - r^mask_schedule_exponent, `"linear"` 1 - r. Shared by training masks and `generate`.
        mask_schedule_exponent (`float`, *optional*, defaults to 2.0):
            Exponent of the `"pow"` schedule.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal weight initialisation.
        pad_token_id, mask_token_id, cls_token_id, eos_token_id (`int`, *optional*, defaults to 0, 1, 2, 3):
            Special token ids, shared by encoder and decoder vocabularies (as in Geneformer).

    The original PerturbGen's architecture (its encoder, ordinal time encoding, chained context, pooling, count head
    and generation loop) is a model type of its own, [`PerturbGenOriginalConfig`] (`perturbgen_original`), which
    `perturbgen-hf convert-original` writes; this model type has none of its switches.

    Example:
    ```python
    >>> from perturbgen_hf import PerturbGenConfig, PerturbGenForConditionalGeneration
    >>> config = PerturbGenConfig(
    ...     encoder={"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    ...              "intermediate_size": 64, "max_position_embeddings": 64},
    ...     decoder_hidden_size=32, decoder_num_layers=2, decoder_num_heads=4, decoder_intermediate_size=64,
    ...     time_points=["2h", "6h"], time_values=[2.0, 6.0], num_target_genes=50,
    ... )
    >>> model = PerturbGenForConditionalGeneration(config)
    ```
    """

    model_type = "perturbgen"
    sub_configs_defaults = {"encoder": BertConfig}
    _context_modes = ("previous", "all", "none")
    # This model type's fixed architecture, as class attributes (not saved): the layers read them, and
    # `PerturbGenOriginalConfig` (model type `perturbgen_original`) sets the original's values.
    encoder_type = "bert"
    encoder_head_dim = None
    encoder_chain_blocks = True
    encoder_time_index = 1
    time_encoding = "value"
    time_index_offset = 1
    sinusoid_layout = "halves"
    pooling = "genes"
    decoder_vocab_reserve = 0
    count_head_norm = "layernorm"
    num_dispersion_conditions = 1
    count_prediction = "mean"
    generation_mode = "maskgit"
    original_filter_threshold = 0.9

    def __init__(
        self,
        encoder=None,
        freeze_encoder=True,
        max_source_length=None,
        decoder_hidden_size=512,
        decoder_num_layers=6,
        decoder_num_heads=8,
        decoder_head_dim=None,
        decoder_intermediate_size=2048,
        decoder_dropout=0.0,
        decoder_attention_dropout=0.0,
        decoder_norm="pre",
        decoder_max_position_embeddings=2048,
        layer_norm_eps=1e-5,
        time_points=None,
        time_values=None,
        source_time_point=None,
        time_embedding_scale=1.0,
        context_mode="previous",
        context_gradient=False,
        source_path="presence",
        source_path_injection="add",
        source_path_map="linear",
        count_head_reads_source=True,
        count_readout="per_gene",
        target_genes=None,
        num_target_genes=2000,
        condition_tokens=None,
        count_likelihood="zinb",
        library_size_source="predicted",
        count_hidden_size=None,
        log_library_size_init=DEFAULT_LOG_LIBRARY_SIZE,
        token_loss_weight=1.0,
        count_loss_weight=1.0,
        mask_schedule="cosine",
        mask_schedule_exponent=2.0,
        initializer_range=0.02,
        pad_token_id=0,
        mask_token_id=1,
        cls_token_id=2,
        eos_token_id=3,
        **kwargs,
    ):
        if "library_size" in kwargs:  # the field's name in configs saved before it was renamed
            library_size_source = kwargs.pop("library_size")
        self._refuse_original_switches(kwargs)
        self.encoder = self._build_encoder_config(encoder)
        self.freeze_encoder = freeze_encoder
        self.max_source_length = max_source_length
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_layers = decoder_num_layers
        self.decoder_num_heads = decoder_num_heads
        self.decoder_head_dim = (
            decoder_head_dim
            if decoder_head_dim is not None
            else self._default_head_dim(decoder_hidden_size, decoder_num_heads)
        )
        self.decoder_intermediate_size = decoder_intermediate_size
        self.decoder_dropout = decoder_dropout
        self.decoder_attention_dropout = decoder_attention_dropout
        self.decoder_norm = decoder_norm
        self.decoder_max_position_embeddings = decoder_max_position_embeddings
        self.layer_norm_eps = layer_norm_eps
        self.time_points = [str(t) for t in (time_points if time_points is not None else ["t1", "t2"])]
        self.time_values = (
            [float(v) for v in time_values]
            if time_values is not None
            else [float(i + 1) for i in range(len(self.time_points))]
        )
        self.source_time_point = source_time_point
        self.time_embedding_scale = time_embedding_scale
        self.context_mode = context_mode
        self.context_gradient = context_gradient
        self.source_path = source_path
        self.source_path_injection = source_path_injection
        self.source_path_map = source_path_map
        self.count_head_reads_source = count_head_reads_source
        self.count_readout = count_readout
        self.target_genes = list(target_genes) if target_genes is not None else None
        self.num_target_genes = len(self.target_genes) if self.target_genes is not None else num_target_genes
        if self.target_genes is not None and num_target_genes not in (2000, self.num_target_genes):
            # 2000 is the default, so only an explicit, contradicting value is an error.
            raise ValueError(
                f"`num_target_genes={num_target_genes}` contradicts `target_genes`, which lists "
                f"{self.num_target_genes} genes."
            )
        self.condition_tokens = [str(c) for c in condition_tokens] if condition_tokens else []
        self.count_likelihood = count_likelihood
        self.library_size_source = library_size_source
        self.count_hidden_size = count_hidden_size if count_hidden_size is not None else decoder_hidden_size
        self.log_library_size_init = log_library_size_init
        self.token_loss_weight = token_loss_weight
        self.count_loss_weight = count_loss_weight
        self.mask_schedule = mask_schedule
        self.mask_schedule_exponent = mask_schedule_exponent
        self.initializer_range = initializer_range
        self.mask_token_id = mask_token_id
        self.cls_token_id = cls_token_id
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)
        self.validate_perturbgen()

    def _refuse_original_switches(self, kwargs):
        """
        Drop switches of the original architecture that a config saved before `perturbgen_original` existed wrote
        with this model type's values; refuse any other value (that is the other model type).
        """
        from .configuration_original_perturbgen import ORIGINAL_SWITCHES

        if type(self) is not PerturbGenConfig:
            return
        for name, value in ORIGINAL_SWITCHES.items():
            if name in kwargs and kwargs[name] == value:
                kwargs.pop(name)
            elif name in kwargs:
                raise ValueError(
                    f"`{name}={kwargs[name]!r}` belongs to the original PerturbGen architecture, a model type of its "
                    "own: use `PerturbGenOriginalConfig` (model type 'perturbgen_original')."
                )

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """
        `PreTrainedConfig.from_dict`; a `perturbgen` config that sets a switch of the original architecture (a
        checkpoint converted before the `perturbgen_original` model type existed) loads as a
        [`PerturbGenOriginalConfig`], so its folder keeps loading with `AutoModel.from_pretrained`.
        """
        from .configuration_original_perturbgen import ORIGINAL_SWITCHES, PerturbGenOriginalConfig

        original = any(name in config_dict and config_dict[name] != v for name, v in ORIGINAL_SWITCHES.items())
        if cls is PerturbGenConfig and (original or config_dict.get("context_mode") == "chained"):
            logger.info(
                "A converted original PerturbGen config (saved as 'perturbgen'): loading it as 'perturbgen_original'."
            )
            return PerturbGenOriginalConfig.from_dict({**config_dict, "model_type": "perturbgen_original"}, **kwargs)
        return super().from_dict(config_dict, **kwargs)

    @staticmethod
    def _default_head_dim(hidden_size, num_heads):
        if isinstance(hidden_size, int) and isinstance(num_heads, int) and num_heads > 0:
            if hidden_size % num_heads != 0:
                raise ValueError(
                    f"`decoder_hidden_size={hidden_size}` is not divisible by `decoder_num_heads={num_heads}`; "
                    "set `decoder_head_dim` explicitly."
                )
            return hidden_size // num_heads
        return None

    @staticmethod
    def _build_encoder_config(encoder):
        if encoder is None:
            return BertConfig(**GENEFORMER_V2_ENCODER_DEFAULTS)
        if isinstance(encoder, BertConfig):
            return encoder
        if isinstance(encoder, dict):
            encoder = dict(encoder)
            model_type = encoder.pop("model_type", "bert")
            if model_type != "bert":
                raise ValueError(f"The encoder must be a BERT (Geneformer) config, got model_type={model_type!r}.")
            return BertConfig(**encoder)
        raise ValueError(f"`encoder` must be a BertConfig, a dict or None, got {type(encoder).__name__}.")

    def validate_perturbgen(self):
        """Raise a `ValueError` naming the first invalid hyper-parameter."""
        for name in (
            "decoder_hidden_size",
            "decoder_num_layers",
            "decoder_num_heads",
            "decoder_head_dim",
            "decoder_intermediate_size",
            "decoder_max_position_embeddings",
            "num_target_genes",
            "count_hidden_size",
        ):
            _check_positive_int(name, getattr(self, name))
        if self.max_source_length is not None:
            _check_positive_int("max_source_length", self.max_source_length)
            if self.max_source_length < 3 or self.max_source_length > self.encoder.max_position_embeddings:
                raise ValueError(
                    f"`max_source_length={self.max_source_length}` must lie in [3, {self.encoder.max_position_embeddings}]"
                    " (the encoder's positions)."
                )
        _check_probability("decoder_dropout", self.decoder_dropout)
        _check_probability("decoder_attention_dropout", self.decoder_attention_dropout)
        _check_choice("decoder_norm", self.decoder_norm, _NORMS)
        _check_choice("count_likelihood", self.count_likelihood, _LIKELIHOODS)
        _check_choice("library_size_source", self.library_size_source, _LIBRARY_SIZES)
        _check_choice("mask_schedule", self.mask_schedule, _SCHEDULES)
        _check_choice("context_mode", self.context_mode, self._context_modes)
        _check_choice("source_path", self.source_path, _SOURCE_PATHS)
        _check_choice("source_path_injection", self.source_path_injection, _SOURCE_PATH_INJECTIONS)
        _check_choice("source_path_map", self.source_path_map, _SOURCE_PATH_MAPS)
        _check_choice("count_readout", self.count_readout, ("per_gene", "pooled"))
        if not isinstance(self.count_head_reads_source, bool):
            raise ValueError(f"`count_head_reads_source` must be True or False, got {self.count_head_reads_source!r}.")
        for name in ("token_loss_weight", "count_loss_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite non-negative number, got {value!r}.")
        if not (isinstance(self.mask_schedule_exponent, (int, float)) and self.mask_schedule_exponent > 0):
            raise ValueError(f"`mask_schedule_exponent` must be positive, got {self.mask_schedule_exponent!r}.")
        if not (isinstance(self.time_embedding_scale, (int, float)) and self.time_embedding_scale > 0):
            raise ValueError(f"`time_embedding_scale` must be positive, got {self.time_embedding_scale!r}.")
        self._validate_time_points()
        self._validate_vocabulary()

    def _validate_time_points(self):
        if not self.time_points:
            raise ValueError("`time_points` must name at least one target time point.")
        if len(set(self.time_points)) != len(self.time_points):
            raise ValueError(f"`time_points` has duplicates: {self.time_points}.")
        if len(self.time_values) != len(self.time_points):
            raise ValueError(
                f"`time_values` has {len(self.time_values)} values for {len(self.time_points)} time points "
                f"{self.time_points}."
            )
        if any(not math.isfinite(v) for v in self.time_values):
            raise ValueError(f"`time_values` must be finite, got {self.time_values}.")
        if any(b <= a for a, b in zip(self.time_values, self.time_values[1:])):
            raise ValueError(f"`time_values` must be strictly increasing (temporal order), got {self.time_values}.")

    def _validate_vocabulary(self):
        special_ids = {
            "pad_token_id": self.pad_token_id,
            "mask_token_id": self.mask_token_id,
            "cls_token_id": self.cls_token_id,
            "eos_token_id": self.eos_token_id,
        }
        for expected, (name, value) in enumerate(special_ids.items()):
            if value != expected:
                raise ValueError(f"`{name}` must be {expected} (Geneformer's special-token layout), got {value!r}.")
        if self.target_genes is not None:
            duplicates = sorted({g for g in self.target_genes if self.target_genes.count(g) > 1})
            if duplicates:
                raise ValueError(f"`target_genes` has duplicates: {duplicates[:10]}.")
        if len(set(self.condition_tokens)) != len(self.condition_tokens):
            raise ValueError(f"`condition_tokens` has duplicates: {self.condition_tokens}.")
        if self.decoder_max_position_embeddings <= len(self.condition_tokens):
            raise ValueError(
                f"`decoder_max_position_embeddings={self.decoder_max_position_embeddings}` leaves no room for genes "
                f"after {len(self.condition_tokens)} condition tokens."
            )

    @property
    def first_gene_token_id(self) -> int:
        """Token id of the first target gene in the decoder vocabulary."""
        return NUM_SPECIAL_TOKENS

    @property
    def first_condition_token_id(self) -> int:
        """Token id of the first condition token in the decoder vocabulary."""
        return NUM_SPECIAL_TOKENS + self.num_target_genes

    @property
    def decoder_vocab_size(self) -> int:
        """Size of the decoder vocabulary: special tokens, target genes, condition tokens, reserve ids."""
        return NUM_SPECIAL_TOKENS + self.num_target_genes + len(self.condition_tokens) + self.decoder_vocab_reserve

    def time_value(self, time_point) -> float:
        """
        Numeric value of a time point.

        Args:
            time_point (`str` or `float`):
                A name from `time_points`, or a number (returned as is, so unseen time points can be asked for).
        """
        if isinstance(time_point, bool):
            raise ValueError(f"Invalid time point {time_point!r}.")
        if isinstance(time_point, (int, float)):
            if not math.isfinite(time_point):
                raise ValueError(f"Time value must be finite, got {time_point!r}.")
            return float(time_point)
        if time_point in self.time_points:
            return self.time_values[self.time_points.index(time_point)]
        raise ValueError(f"Unknown time point {time_point!r}; this model knows {self.time_points} (or pass a number).")


__all__ = ["PerturbGenConfig"]
