"""
The original PerturbGen architecture (Lotfollahi lab) as its own model type, `perturbgen_original`: the model that
`perturbgen-hf convert-original` writes. It is the package's model with the original's encoder, pooling and
generation loop (`generation_original_perturbgen.py`); the switches it reads are those of
[`PerturbGenOriginalConfig`].
"""

import inspect

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from .configuration_original_perturbgen import PerturbGenOriginalConfig
from .generation_original_perturbgen import OriginalGenerationMixin
from .modeling_perturbgen import (
    PerturbGenAttention,
    PerturbGenFeedForward,
    PerturbGenForConditionalGeneration,
    sinusoidal_embedding,
)


class PerturbGenOriginalEncoderLayer(nn.Module):
    """A block of the original PerturbGen encoder: post-norm self-attention and feed-forward, no cross-attention."""

    def __init__(self, config: PerturbGenOriginalConfig):
        super().__init__()
        encoder = config.encoder
        self.self_attn = PerturbGenAttention(
            config, encoder.hidden_size, encoder.num_attention_heads, config.encoder_head_dim, dropout=0.0
        )
        self.self_attn_norm = nn.LayerNorm(encoder.hidden_size, eps=encoder.layer_norm_eps)
        self.mlp = PerturbGenFeedForward(config, encoder.hidden_size, encoder.intermediate_size)
        self.mlp_norm = nn.LayerNorm(encoder.hidden_size, eps=encoder.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden_states = self.self_attn_norm(hidden_states + self.self_attn(hidden_states, attention_mask))
        return self.mlp_norm(hidden_states + self.mlp(hidden_states))


class PerturbGenOriginalEncoder(nn.Module):
    """
    The original PerturbGen's own encoder (`encoder_type="original"`), for converted checkpoints: token embeddings
    plus fixed sinusoids of the position and of time row `encoder_time_index` (no scaling), then post-norm blocks.

    In the original every block reads the embeddings, not the previous block's output, so only the last block
    affects the result; `encoder_chain_blocks=False` (set by the converter) reproduces that, `True` chains them.
    """

    def __init__(self, config: PerturbGenOriginalConfig):
        super().__init__()
        self.config = config
        encoder = config.encoder
        self.embed_tokens = nn.Embedding(encoder.vocab_size, encoder.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([PerturbGenOriginalEncoderLayer(config) for _ in range(encoder.num_hidden_layers)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> BaseModelOutput:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, source_len)`), attention_mask (`(batch, source_len)`).

        Returns:
            `BaseModelOutput` whose `last_hidden_state` is `(batch, source_len, hidden)`, padding rows included.
        """
        width, layout = self.config.encoder.hidden_size, self.config.sinusoid_layout
        positions = sinusoidal_embedding(torch.arange(input_ids.shape[1], device=input_ids.device), width, layout)
        time = sinusoidal_embedding(
            torch.tensor(float(self.config.encoder_time_index), device=input_ids.device), width, layout
        )
        embeddings = self.embed_tokens(input_ids) + time + positions
        mask = attention_mask.bool()
        if self.config.encoder_chain_blocks:
            hidden_states = embeddings
            for layer in self.layers:
                hidden_states = layer(hidden_states, mask)
        else:
            hidden_states = self.layers[-1](embeddings, mask)  # the earlier blocks' outputs are discarded
        return BaseModelOutput(last_hidden_state=hidden_states)


class PerturbGenOriginalForConditionalGeneration(OriginalGenerationMixin, PerturbGenForConditionalGeneration):
    r"""
    The original PerturbGen (encoder, MaskGIT decoder, count head) for converted checkpoints: the layers and heads of
    [`PerturbGenForConditionalGeneration`] configured by a [`PerturbGenOriginalConfig`], with the original's own
    encoder (`encoder_type="original"`), its pooling (`pooling="non_special"`) and its generation loop
    (`generation_mode="original"`). `forward`, `readout` and the training recipe are shared.
    """

    config: PerturbGenOriginalConfig
    config_class = PerturbGenOriginalConfig

    @staticmethod
    def _build_encoder(config) -> nn.Module:
        if config.encoder_type == "original":
            return PerturbGenOriginalEncoder(config)
        return PerturbGenForConditionalGeneration._build_encoder(config)

    def pooled_positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Gene tokens, or (`pooling="non_special"`) every non-special, non-condition id, reserve ids included."""
        if self.config.pooling == "genes":
            return super().pooled_positions(token_ids)
        first_condition = self.config.first_condition_token_id
        is_condition = (token_ids >= first_condition) & (
            token_ids < first_condition + len(self.config.condition_tokens)
        )
        return (token_ids >= self.config.first_gene_token_id) & ~is_condition

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, time_points=None, sequence_length=None, **kwargs):
        r"""
        [`PerturbGenForConditionalGeneration.generate`], or with `config.generation_mode == "original"` the
        original PerturbGen's loop (see `generation_original_perturbgen`): random draws come from `generator` in the
        original's order (from the global torch generator when it is None, as the original), `top_k` is replaced by
        `config.original_filter_threshold`, and condition tokens are not supported.

        Args:
            reference_input_ids (`torch.LongTensor` of shape `(batch_size, num_time_points, length)`, *optional*):
                with `generation_mode == "original"` only: observed target cells at the generated time points
                (ascending), which the original needs: their padding gives the open positions and each time point's
                context is the other reference cells. `sequence_length` is then one length `S` for all rows.
            Every other argument: as [`PerturbGenForConditionalGeneration.generate`].
        """
        reference_input_ids = kwargs.pop("reference_input_ids", None)
        if self.config.generation_mode != "original":
            if reference_input_ids is not None:
                raise ValueError("`reference_input_ids` is read only with generation_mode='original'.")
            return super().generate(input_ids, attention_mask, time_points, sequence_length, **kwargs)
        settings = {**_GENERATE_DEFAULTS, **kwargs}
        unknown = sorted(set(settings) - set(_GENERATE_DEFAULTS))
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments {unknown}.")
        if settings["condition_ids"] is not None or settings["top_k"] is not None:
            raise ValueError("generation_mode='original' takes no condition tokens and no `top_k`.")
        request = self._prepare_generation(
            input_ids,
            attention_mask,
            time_points,
            sequence_length,
            None,
            settings["num_iterations"],
            settings["temperature"],
            None,
            settings["schedule"],
            settings["noise_index"],
            settings["num_noise_rows"],
            settings["sequence_editor"],
            settings["edit_time_points"],
        )
        lengths = request.lengths
        if reference_input_ids is not None and sequence_length is None:
            lengths = torch.full_like(lengths, reference_input_ids.shape[-1])  # S: every reference position
        return self._generate_original(
            request.input_ids,
            request.attention_mask,
            request.times,
            lengths,
            reference_input_ids,
            request.num_iterations,
            request.temperature,
            request.schedule,
            settings["library_size"],
            settings["generator"],
            settings["output_hidden_states"],
            request.noise,
            request.sequence_editor,
            request.edit_values,
        )


def _generate_defaults() -> dict:
    """The keyword arguments of the package's `generate` after `sequence_length`, with its defaults (one source)."""
    parameters = inspect.signature(PerturbGenForConditionalGeneration.generate).parameters
    leading = ("self", "input_ids", "attention_mask", "time_points", "sequence_length")
    return {name: p.default for name, p in parameters.items() if name not in leading}


_GENERATE_DEFAULTS = _generate_defaults()


__all__ = ["PerturbGenOriginalForConditionalGeneration"]
