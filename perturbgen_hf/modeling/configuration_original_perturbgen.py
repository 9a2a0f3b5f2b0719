"""
Configuration of the original PerturbGen architecture (Lotfollahi lab), model type `perturbgen_original`: what
`perturbgen-hf convert-original` writes, so that the authors' checkpoints run with their own encoder, time encoding,
context chain, pooling, count head and generation loop. The package's own model (`perturbgen`) has none of these
switches.
"""

from .configuration_perturbgen import PerturbGenConfig, _check_choice, _check_positive_int, _check_probability


# The switches of this model type and the value the package's own model type has for each (its fixed architecture,
# class attributes of `PerturbGenConfig`). A config saved as `perturbgen` that sets one of them to another value was
# converted before the model type existed and loads as `perturbgen_original` (see `PerturbGenConfig.from_dict`).
ORIGINAL_SWITCHES = {
    "encoder_type": "bert",
    "encoder_head_dim": None,
    "encoder_chain_blocks": True,
    "encoder_time_index": 1,
    "time_encoding": "value",
    "time_index_offset": 1,
    "sinusoid_layout": "halves",
    "pooling": "genes",
    "decoder_vocab_reserve": 0,
    "count_head_norm": "layernorm",
    "num_dispersion_conditions": 1,
    "count_prediction": "mean",
    "generation_mode": "maskgit",
    "original_filter_threshold": 0.9,
}
# Arguments of `PerturbGenConfig` whose default differs here (the original's).
_ORIGINAL_DEFAULTS = {
    "decoder_norm": "post",
    "context_mode": "chained",
    "source_path": "none",
    "count_readout": "pooled",
}
_CHOICES = {
    "encoder_type": ("bert", "original"),
    "time_encoding": ("value", "ordinal"),
    "sinusoid_layout": ("halves", "interleaved"),
    "pooling": ("genes", "non_special"),
    "count_head_norm": ("layernorm", "l2"),
    "count_prediction": ("mean", "mu"),
    "generation_mode": ("maskgit", "original"),
}


class PerturbGenOriginalConfig(PerturbGenConfig):
    r"""
    Configuration of a [`PerturbGenOriginalForConditionalGeneration`]: the original PerturbGen's architecture, for
    converted checkpoints. It takes every argument of [`PerturbGenConfig`] plus the switches below, whose defaults are
    the original's (the converter sets them from the checkpoint). Some arguments of [`PerturbGenConfig`] default to
    the original's too: `decoder_norm="post"`, `context_mode="chained"` (each context cell decoded on the memory so
    far; allowed only here), `source_path="none"` and `count_readout="pooled"`.

    Args:
        encoder_type (`str`, *optional*, defaults to `"original"`):
            `"original"`: the original's own encoder (token embedding + fixed sinusoids of position and of time row
            `encoder_time_index`, post-norm blocks of self-attention and feed-forward without cross-attention);
            `encoder` then only carries its shape. `"bert"`: a Geneformer BERT.
        encoder_head_dim (`int`, *optional*):
            Width of one attention head of the original encoder (its attention width is heads x head dim). Defaults
            to the encoder's `hidden_size // num_attention_heads`.
        encoder_chain_blocks (`bool`, *optional*, defaults to `False`):
            `False` reproduces the original, where every encoder block reads the embeddings and only the last block's
            output is used (blocks 0..n-2 have no effect); `True` chains the blocks as a usual transformer.
        encoder_time_index (`int`, *optional*, defaults to 1):
            Row of the time sinusoid added to every source token by the original encoder.
        time_encoding (`str`, *optional*, defaults to `"ordinal"`):
            `"ordinal"`: the original's fixed sinusoid of the time point's 1-based index plus `time_index_offset`
            (only the configured time points exist); `"value"`: a learned map of the sinusoid of the time value.
        time_index_offset (`int`, *optional*, defaults to 1):
            Offset of the ordinal time encoding (the original adds 1).
        sinusoid_layout (`str`, *optional*, defaults to `"interleaved"`):
            `"interleaved"` (sin, cos, sin, ...: the original's layout) or `"halves"` (all sines, then all cosines)
            for the fixed position and time sinusoids.
        pooling (`str`, *optional*, defaults to `"non_special"`):
            Which decoder positions the cell embedding averages: `"non_special"` (every id but `<pad>`, `<mask>`,
            `<cls>`, `<eos>` and condition tokens: the original's rule, which also counts reserve ids) or `"genes"`.
        decoder_vocab_reserve (`int`, *optional*, defaults to 0):
            Unused decoder ids after the genes and condition tokens (the original reserves some).
        count_head_norm (`str`, *optional*, defaults to `"l2"`):
            Last step of the count head's MLP: `"l2"` (L2 normalisation, the original's) or `"layernorm"`.
        num_dispersion_conditions (`int`, *optional*, defaults to 1):
            Per-gene inverse dispersions per condition (the original's `theta` has one column per batch
            condition); with more than 1, the count likelihood needs each cell's `dispersion_condition`.
        count_prediction (`str`, *optional*, defaults to `"mu"`):
            What `counts` reports: `"mu"` (the negative-binomial mean; the original's prediction) or `"mean"` (the
            distribution's mean, the zero-inflated mean for "zinb").
        generation_mode (`str`, *optional*, defaults to `"original"`):
            `"original"`: the original's MaskGIT loop (multiplicative re-mask count, margin confidence, ban of ids
            already in the cell, linear temperature anneal, top-fraction filter, Gumbel noise from one uniform per
            vocabulary entry); `"maskgit"`: this package's. See [`PerturbGenOriginalForConditionalGeneration.generate`].
        original_filter_threshold (`float`, *optional*, defaults to 0.9):
            The original generation keeps the `ceil((1 - threshold) * vocab)` largest logits per position.
    """

    model_type = "perturbgen_original"
    _context_modes = (*PerturbGenConfig._context_modes, "chained")

    def __init__(
        self,
        encoder_type="original",
        encoder_head_dim=None,
        encoder_chain_blocks=False,
        encoder_time_index=1,
        time_encoding="ordinal",
        time_index_offset=1,
        sinusoid_layout="interleaved",
        pooling="non_special",
        decoder_vocab_reserve=0,
        count_head_norm="l2",
        num_dispersion_conditions=1,
        count_prediction="mu",
        generation_mode="original",
        original_filter_threshold=0.9,
        **kwargs,
    ):
        # The rest of the original's architecture, where the package's defaults differ.
        for name, value in _ORIGINAL_DEFAULTS.items():
            kwargs.setdefault(name, value)
        # Set before the base class validates: the vocabulary size reads `decoder_vocab_reserve`.
        self.encoder_type = encoder_type
        self.encoder_head_dim = encoder_head_dim
        self.encoder_chain_blocks = encoder_chain_blocks
        self.encoder_time_index = encoder_time_index
        self.time_encoding = time_encoding
        self.time_index_offset = time_index_offset
        self.sinusoid_layout = sinusoid_layout
        self.pooling = pooling
        self.decoder_vocab_reserve = decoder_vocab_reserve
        self.count_head_norm = count_head_norm
        self.num_dispersion_conditions = num_dispersion_conditions
        self.count_prediction = count_prediction
        self.generation_mode = generation_mode
        self.original_filter_threshold = original_filter_threshold
        super().__init__(**kwargs)

    def validate_perturbgen(self):
        """Raise a `ValueError` naming the first invalid hyper-parameter (the base checks and the switches)."""
        if self.encoder_head_dim is None and self.encoder_type == "original":
            self.encoder_head_dim = self.encoder.hidden_size // self.encoder.num_attention_heads
        super().validate_perturbgen()
        for name, choices in _CHOICES.items():
            _check_choice(name, getattr(self, name), choices)
        _check_positive_int("num_dispersion_conditions", self.num_dispersion_conditions)
        _check_positive_int("decoder_vocab_reserve", self.decoder_vocab_reserve, allow_zero=True)
        _check_positive_int("time_index_offset", self.time_index_offset, allow_zero=True)
        _check_positive_int("encoder_time_index", self.encoder_time_index, allow_zero=True)
        if not isinstance(self.encoder_chain_blocks, bool):
            raise ValueError(f"`encoder_chain_blocks` must be True or False, got {self.encoder_chain_blocks!r}.")
        if self.encoder_type == "original":
            _check_positive_int("encoder_head_dim", self.encoder_head_dim)
        _check_probability("original_filter_threshold", self.original_filter_threshold)


__all__ = ["ORIGINAL_SWITCHES", "PerturbGenOriginalConfig"]
