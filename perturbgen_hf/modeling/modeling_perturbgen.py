"""
PyTorch PerturbGen: a trajectory-aware generative transformer for single-cell perturbation.

A cell is a sequence of gene tokens ranked by normalised expression (Geneformer's rank-value encoding; Theodoris et
al., Nature 2023). A Geneformer-style BERT encoder reads the *source* cell (`input_ids`). A bidirectional decoder
cross-attends to the encoded source and to decoder embeddings of the other time points (*context*) and predicts the
*target* cell's gene tokens at a given time point (`decoder_input_ids`, `labels`) by MaskGIT iterative unmasking
(Chang et al., CVPR 2022); a count head maps the decoder's pooled embedding to expression counts with a (zero-inflated)
negative binomial likelihood. PerturbGen itself: Lotfollahi lab, bioRxiv 2026.03.04.709254.

Glossary: source = encoder side (`input_ids`, `attention_mask`); target = decoder side (`decoder_input_ids`,
`decoder_attention_mask`, `labels`, `target_counts`); context = other time points of the same example
(`context_input_ids`, ...). Time points are numbers (e.g. hours), embedded sinusoidally.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertForMaskedLM, BertModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.bert.modeling_bert import BertEmbeddings
from transformers.utils import ModelOutput, logging

from .configuration_perturbgen import PerturbGenConfig
from .generation_perturbgen import PerturbGenGenerateOutput, PerturbGenGenerationMixin, _summary
from .likelihoods_perturbgen import (
    negative_binomial_log_prob,
    zero_inflated_negative_binomial_log_prob,
    zero_inflated_negative_binomial_mean,
)


logger = logging.get_logger(__name__)

# Count-head outputs that `forward` returns (all None when it cannot run the head).
_COUNT_KEYS = ("mu", "theta", "zi_logits", "library_size")
# Counts are normalised to this many per cell for the "mse" likelihood (log1p of counts per 10,000).
# The tokenizer's normalisation total, repeated here because this folder exports as remote code on its own.
NORMALIZED_TOTAL = 1e4


@dataclass
class PerturbGenOutput(ModelOutput):
    r"""
    Output of [`PerturbGenForConditionalGeneration.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            `token_loss_weight * token_loss + count_loss_weight * count_loss`, over the terms that were computed.
        token_loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is given):
            Cross entropy of the masked target tokens, averaged per cell, then over cells (see `token_loss`).
        count_loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `target_counts` is given):
            Mean negative log-likelihood per gene and cell (or the mean squared error for `count_likelihood="mse"`).
        logits (`torch.FloatTensor` of shape `(batch_size, target_len, decoder_vocab_size)`):
            Token logits at every target position.
        count_mu (`torch.FloatTensor` of shape `(batch_size, num_target_genes)`):
            Predicted mean counts of the target genes (for "zinb", of the negative-binomial component).
        count_theta (`torch.FloatTensor` of shape `(num_target_genes,)`):
            Inverse dispersion per gene.
        count_zi_logits (`torch.FloatTensor` of shape `(batch_size, num_target_genes)`, *optional*):
            Zero-inflation logits ("zinb" only).
        library_size (`torch.FloatTensor` of shape `(batch_size,)`):
            Library size used to scale the predicted proportions.
        cell_embeddings (`torch.FloatTensor` of shape `(batch_size, decoder_hidden_size)`):
            Mean of the decoder's final hidden states over gene-token positions (the count head's input).
        decoder_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, target_len, decoder_hidden_size)`):
            Final decoder hidden states of `decoder_input_ids`.
        encoder_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, source_len, decoder_hidden_size)`):
            Encoded source, projected to the decoder's width.
    """

    loss: torch.FloatTensor | None = None
    token_loss: torch.FloatTensor | None = None
    count_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    count_mu: torch.FloatTensor | None = None
    count_theta: torch.FloatTensor | None = None
    count_zi_logits: torch.FloatTensor | None = None
    library_size: torch.FloatTensor | None = None
    cell_embeddings: torch.FloatTensor | None = None
    decoder_last_hidden_state: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None


def sinusoidal_embedding(values: torch.Tensor, dim: int, layout: str = "halves") -> torch.Tensor:
    """
    Transformer sinusoidal embedding of real-valued positions or times.

    Args:
        values (`torch.Tensor` of any shape `S`): positions or (scaled) time values; need not be integers.
        dim (`int`): embedding width.
        layout (`str`, *optional*, defaults to `"halves"`): `"halves"` puts `sin(v * w_i)` in the first half and
            `cos(v * w_i)` in the second; `"interleaved"` alternates them (`sin` at even, `cos` at odd columns) and
            computes the frequencies as the original PerturbGen does, `exp(2i * (-ln(10000) / dim))` in float32, so
            that its stored tables are reproduced bit for bit.

    Returns:
        `torch.FloatTensor` of shape `S + (dim,)`, with `w_i = 10000^(-i / (dim // 2))`.
    """
    half = dim // 2
    if layout == "interleaved":
        frequencies = torch.exp(
            torch.arange(0, 2 * half, 2, device=values.device, dtype=torch.float32) * (-math.log(10_000.0) / dim)
        )
        angles = values.float().unsqueeze(-1) * frequencies
        embedding = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)
    else:
        frequencies = torch.exp(
            -math.log(10_000.0) * torch.arange(half, device=values.device, dtype=torch.float32) / max(half, 1)
        )
        angles = values.float().unsqueeze(-1) * frequencies
        embedding = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def _attention_key_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Boolean SDPA mask `(batch, 1, 1, key_len)`; a row with no valid key attends to all (its output is unused)."""
    valid = key_padding_mask.bool()
    valid = valid | ~valid.any(dim=-1, keepdim=True)
    return valid[:, None, None, :]


class PerturbGenAttention(nn.Module):
    """Multi-head attention, never causal; the attention width `heads * head_dim` may differ from the hidden size."""

    def __init__(self, config: PerturbGenConfig, hidden_size=None, num_heads=None, head_dim=None, dropout=None):
        super().__init__()
        # transformers' sdpa integration treats a module without `is_causal` as causal; this one never is.
        self.is_causal = False
        hidden_size = hidden_size or config.decoder_hidden_size
        self.num_heads = num_heads or config.decoder_num_heads
        self.head_dim = head_dim or config.decoder_head_dim
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, hidden_size)
        self.dropout = config.decoder_attention_dropout if dropout is None else dropout

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch_size, length, _ = states.shape
        return states.view(batch_size, length, self.num_heads, self.head_dim).transpose(1, 2)  # (b, h, len, d)

    def project_key_value(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `states`, each `(batch, heads, len, head_dim)`; cached for a fixed memory."""
        return self._split_heads(self.k_proj(states)), self._split_heads(self.v_proj(states))

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_padding_mask: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.FloatTensor` of shape `(batch, query_len, hidden)`): queries.
            key_padding_mask (`torch.BoolTensor` of shape `(batch, key_len)`): `True` for keys to attend to.
            key_value_states (`torch.FloatTensor` of shape `(batch, key_len, hidden)`, *optional*): cross-attention
                memory; self-attention when neither this nor `key_value` is given.
            key_value (`tuple`, *optional*): precomputed `project_key_value(memory)`.
        """
        batch_size, query_len, _ = hidden_states.shape
        query = self._split_heads(self.q_proj(hidden_states))
        if key_value is None:
            key_value = self.project_key_value(hidden_states if key_value_states is None else key_value_states)
        key, value = key_value
        attended = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=_attention_key_mask(key_padding_mask),
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=False,
        )
        attended = attended.transpose(1, 2).reshape(batch_size, query_len, -1)  # (b, q, h * d)
        return self.o_proj(attended)


class PerturbGenFeedForward(nn.Module):
    def __init__(self, config: PerturbGenConfig, hidden_size=None, intermediate_size=None):
        super().__init__()
        hidden_size = hidden_size or config.decoder_hidden_size
        intermediate_size = intermediate_size or config.decoder_intermediate_size
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states)))


class PerturbGenDecoderLayer(GradientCheckpointingLayer):
    """Bidirectional self-attention, cross-attention to the memory, feed-forward; pre- or post-norm."""

    def __init__(self, config: PerturbGenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.pre_norm = config.decoder_norm == "pre"
        self.self_attn = PerturbGenAttention(config)
        self.cross_attn = PerturbGenAttention(config)
        self.mlp = PerturbGenFeedForward(config)
        self.self_attn_norm = nn.LayerNorm(config.decoder_hidden_size, eps=config.layer_norm_eps)
        self.cross_attn_norm = nn.LayerNorm(config.decoder_hidden_size, eps=config.layer_norm_eps)
        self.mlp_norm = nn.LayerNorm(config.decoder_hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.decoder_dropout)

    def _residual(self, hidden_states, norm, block):
        if self.pre_norm:
            return hidden_states + self.dropout(block(norm(hidden_states)))
        return norm(hidden_states + self.dropout(block(hidden_states)))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        memory_key_value: tuple[torch.Tensor, torch.Tensor],
        memory_mask: torch.Tensor,
    ) -> torch.Tensor:
        hidden_states = self._residual(
            hidden_states, self.self_attn_norm, lambda h: self.self_attn(h, key_padding_mask=attention_mask)
        )
        hidden_states = self._residual(
            hidden_states,
            self.cross_attn_norm,
            lambda h: self.cross_attn(h, key_padding_mask=memory_mask, key_value=memory_key_value),
        )
        return self._residual(hidden_states, self.mlp_norm, self.mlp)


def source_rank_weights(input_ids: torch.Tensor, first_gene_id: int, mask_token_id: int) -> tuple:
    """
    Presence and rank weights of the genes of rank-value encoded source cells.

    A gene token gets presence 1 and rank weight `1 / log2(rank + 1)`, its rank counting gene and `<mask>` tokens
    from the top (1 = the highest expressed); `<pad>`, `<cls>`, `<eos>` and `<mask>` get 0. A deleted gene thus
    drops out and the genes after it move up one rank, a masked or padded one drops out alone, an overexpressed one
    (moved to the top) gets weight 1.

    Args:
        input_ids (`torch.LongTensor` of shape `(batch, source_len)`): source tokens (encoder vocabulary).

    Returns:
        `(presence, rank_weight)`, two `torch.FloatTensor`s of shape `(batch, source_len)`.
    """
    is_gene = input_ids >= first_gene_id
    ranked = is_gene | (input_ids == mask_token_id)
    rank = ranked.long().cumsum(dim=1).clamp(min=1)
    presence = is_gene.float()
    return presence, presence / torch.log2(rank.float() + 1.0)


def _zero_initialised(module: nn.Module) -> nn.Module:
    """Mark a layer for zero initialisation (see `PerturbGenPreTrainedModel._init_weights`)."""
    module.zero_init = True
    return module


@dataclass
class SourceCondition:
    """
    What the source path gives the decoder and the count head for a batch of source cells.

    Args:
        summary (`torch.FloatTensor` of shape `(batch, hidden)`): the normalised sum of the source's gene embeddings.
        shift (`torch.FloatTensor` of shape `(batch, hidden)`): added to every decoder input embedding.
        scale (`torch.FloatTensor` of shape `(batch, hidden)`, *optional*): with `"film"`, the input embeddings are
            multiplied by `1 + scale` first.
    """

    summary: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor | None = None

    def repeat_interleave(self, repeats: int) -> "SourceCondition":
        """The same condition for each row repeated `repeats` times (as `Tensor.repeat_interleave(dim=0)`)."""
        return SourceCondition(
            *(
                None if t is None else t.repeat_interleave(repeats, dim=0)
                for t in (self.summary, self.shift, self.scale)
            )
        )


class PerturbGenSourcePath(nn.Module):
    """
    The undiluted source path (`config.source_path`): a sum over the source's genes of learned gene embeddings (a
    presence embedding, plus a rank-weighted one for `"rank"`), mapped to a shift (`"add"`) or a scale and shift
    (`"film"`) of every decoder input embedding. `config.source_path_map` `"normalized"`: LayerNorm of the sum, then a
    linear map that starts at zero; `"linear"`: the sum itself, of embeddings that start at zero. Either way a new path
    starts as a no-op and a model saved without one loads unchanged.
    """

    def __init__(self, config: PerturbGenConfig):
        super().__init__()
        self.config = config
        vocab, hidden = config.encoder.vocab_size, config.decoder_hidden_size
        film = config.source_path_injection == "film"
        linear = config.source_path_map == "linear"
        width = 2 * hidden if film and linear else hidden

        def bag():
            embeddings = nn.EmbeddingBag(vocab, width, mode="sum")
            return _zero_initialised(embeddings) if linear else embeddings

        self.presence_embeddings = bag()
        self.rank_embeddings = bag() if config.source_path == "rank" else None
        self.norm = None if linear else nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.output = None if linear else _zero_initialised(nn.Linear(hidden, 2 * hidden if film else hidden))

    def forward(self, input_ids: torch.Tensor) -> SourceCondition:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, source_len)`): source tokens (encoder vocabulary).

        Returns:
            [`SourceCondition`]; the decoder's inputs become `embeddings * (1 + scale) + shift`.
        """
        presence, rank_weight = source_rank_weights(
            input_ids, self.config.first_gene_token_id, self.config.mask_token_id
        )
        dtype = self.presence_embeddings.weight.dtype
        summed = self.presence_embeddings(input_ids, per_sample_weights=presence.to(dtype))
        if self.rank_embeddings is not None:
            summed = summed + self.rank_embeddings(input_ids, per_sample_weights=rank_weight.to(dtype))
        if self.output is None:
            projected, summary = summed, summed[..., : self.config.decoder_hidden_size]
        else:
            # The sum is normalised as a whole (LayerNorm rescales, it does not average): one gene's embedding still
            # moves it by its own size relative to the others', whatever the number of genes.
            summary = self.norm(summed)
            projected = self.output(summary)
        if self.config.source_path_injection == "film":
            shift, scale = projected.chunk(2, dim=-1)
            return SourceCondition(summary, shift, scale)
        return SourceCondition(summary, projected)


class PerturbGenDecoder(nn.Module):
    """Token + position + time embeddings and a stack of [`PerturbGenDecoderLayer`]."""

    def __init__(self, config: PerturbGenConfig):
        super().__init__()
        self.config = config
        self.hidden_size = config.decoder_hidden_size
        self.embed_tokens = nn.Embedding(config.decoder_vocab_size, config.decoder_hidden_size, config.pad_token_id)
        # The sinusoid of the (real-valued) time goes through a learned map so the model can use it freely while any
        # time value, seen in training or not, still has an embedding. The original's ordinal encoding has no map.
        self.time_proj = (
            nn.Linear(config.decoder_hidden_size, config.decoder_hidden_size)
            if config.time_encoding == "value"
            else None
        )
        self.layers = nn.ModuleList(
            [PerturbGenDecoderLayer(config, layer_idx) for layer_idx in range(config.decoder_num_layers)]
        )
        self.final_norm = (
            nn.LayerNorm(config.decoder_hidden_size, eps=config.layer_norm_eps)
            if config.decoder_norm == "pre"
            else nn.Identity()
        )
        self.dropout = nn.Dropout(config.decoder_dropout)

    def embed(self, input_ids: torch.Tensor, time_values: torch.Tensor, source_condition=None) -> torch.Tensor:
        """
        Input embeddings `(batch, len, hidden)` of tokens at time `time_values` `(batch,)`, shifted (and scaled) by
        the source path's [`SourceCondition`] when given.
        """
        seq_len = input_ids.shape[1]
        if seq_len > self.config.decoder_max_position_embeddings:
            raise ValueError(
                f"Target sequence of length {seq_len} exceeds decoder_max_position_embeddings="
                f"{self.config.decoder_max_position_embeddings}."
            )
        layout = self.config.sinusoid_layout
        positions = sinusoidal_embedding(torch.arange(seq_len, device=input_ids.device), self.hidden_size, layout)
        if self.time_proj is None:
            times = sinusoidal_embedding(self.ordinal_time_rows(time_values), self.hidden_size, layout)
        else:
            times = sinusoidal_embedding(time_values * self.config.time_embedding_scale, self.hidden_size, layout)
            times = self.time_proj(times.to(self.time_proj.weight.dtype))
        embeddings = self.embed_tokens(input_ids) + positions.to(times.dtype) + times[:, None, :]
        if source_condition is not None:
            if source_condition.scale is not None:
                embeddings = embeddings * (1.0 + source_condition.scale[:, None, :])
            embeddings = embeddings + source_condition.shift[:, None, :]
        return self.dropout(embeddings)

    def ordinal_time_rows(self, time_values: torch.Tensor) -> torch.Tensor:
        """The original's time rows: 1-based index of each value among `config.time_values` + `time_index_offset`."""
        known = torch.tensor(self.config.time_values, dtype=torch.float64, device=time_values.device)
        matches = torch.isclose(time_values.double()[:, None], known[None, :], rtol=0.0, atol=1e-6)
        if not matches.any(dim=1).all():
            unknown = sorted(
                {float(v) for v, hit in zip(time_values.tolist(), matches.any(dim=1).tolist()) if not hit}
            )
            raise ValueError(
                f"Time value(s) {unknown} are not among this model's time points {self.config.time_points} "
                f"({self.config.time_values}); its ordinal time encoding (the original PerturbGen's) has no others."
            )
        return (matches.float().argmax(dim=1) + 1 + self.config.time_index_offset).float()

    def project_memory(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys and values of a fixed memory, one pair per layer (computed once, reused)."""
        return [layer.cross_attn.project_key_value(memory) for layer in self.layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        time_values: torch.Tensor,
        memory_key_values: list[tuple[torch.Tensor, torch.Tensor]],
        memory_mask: torch.Tensor,
        source_condition=None,
    ) -> torch.Tensor:
        """
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, target_len)`): target tokens (may contain `<mask>`).
            attention_mask (`torch.BoolTensor` of shape `(batch, target_len)`): `True` for non-padding.
            time_values (`torch.FloatTensor` of shape `(batch,)`): time of each target.
            memory_key_values (`list`): from [`project_memory`].
            memory_mask (`torch.BoolTensor` of shape `(batch, memory_len)`): `True` for valid memory positions.
            source_condition (`tuple`, *optional*): [`SourceCondition`] of the source path.

        Returns:
            `torch.FloatTensor` of shape `(batch, target_len, hidden)`.
        """
        hidden_states = self.embed(input_ids, time_values, source_condition)
        for layer, key_value in zip(self.layers, memory_key_values):
            hidden_states = layer(hidden_states, attention_mask, key_value, memory_mask)
        return self.final_norm(hidden_states)


class PerturbGenCountHead(nn.Module):
    """
    Maps a pooled cell embedding to count-distribution parameters: proportions over the target genes times a library
    size, a trained per-gene inverse dispersion and (ZINB) zero-inflation logits.
    """

    def __init__(self, config: PerturbGenConfig):
        super().__init__()
        self.likelihood = config.count_likelihood
        self.library_mode = config.library_size_source
        self.prediction = config.count_prediction
        hidden, genes = config.count_hidden_size, config.num_target_genes
        layers = [nn.Linear(config.decoder_hidden_size, hidden), nn.GELU(), nn.Linear(hidden, hidden)]
        # The original L2-normalises the MLP's output instead (`count_head_norm="l2"`).
        self.l2_normalize = config.count_head_norm == "l2"
        if not self.l2_normalize:
            layers.append(nn.LayerNorm(hidden, eps=config.layer_norm_eps))
        self.mlp = nn.Sequential(*layers)
        # The source path's summary, read directly: a knockout changes the counts through it, not only through
        # which (sampled) genes the decoder generated. Zero-initialised, like the path itself.
        self.source_proj = (
            _zero_initialised(nn.Linear(config.decoder_hidden_size, config.decoder_hidden_size))
            if config.count_head_reads_source and config.source_path != "none"
            else None
        )
        self.proportion_logits = nn.Linear(hidden, genes)
        self.zi_logits = nn.Linear(hidden, genes) if self.likelihood == "zinb" else None
        # Per-gene readout: each generated gene's own decoder state corrects that gene's logits (proportion and, for
        # "zinb", zero inflation), so a gene's predicted expression follows its source-conditioned state instead of
        # one mean-pooled vector. The last layer starts at zero: the head starts as the pooled one.
        self.gene_readout = None
        if config.count_readout == "per_gene":
            width = config.decoder_hidden_size
            outputs = 2 if self.likelihood == "zinb" else 1
            self.gene_readout = nn.Sequential(
                nn.Linear(width, width), nn.GELU(), _zero_initialised(nn.Linear(width, outputs))
            )
        self.log_library_size = nn.Linear(hidden, 1) if self.library_mode == "predicted" else None
        # Trained, unlike the original's `theta` (which its optimiser never received). One column per dispersion
        # condition when there are several (the original's per-batch `theta`).
        conditions = config.num_dispersion_conditions
        self.log_theta = nn.Parameter(torch.zeros(genes) if conditions == 1 else torch.zeros(genes, conditions))

    def forward(
        self,
        cell_embeddings: torch.Tensor,
        library_size: torch.Tensor | None = None,
        dispersion_condition: torch.Tensor | None = None,
        source_summary: torch.Tensor | None = None,
        gene_states: torch.Tensor | None = None,
        gene_index: torch.Tensor | None = None,
    ) -> dict:
        """
        Args:
            cell_embeddings (`torch.FloatTensor` of shape `(batch, decoder_hidden_size)`).
            library_size (`torch.FloatTensor` of shape `(batch,)`, *optional*): observed library sizes; required
                when `config.library_size_source == "observed"`, ignored otherwise.
            dispersion_condition (`torch.LongTensor` of shape `(batch,)`, *optional*): each cell's column of
                `log_theta`, with `num_dispersion_conditions > 1`; without it `theta` is `None` (the means do not
                depend on it, the likelihood does).
            source_summary (`torch.FloatTensor` of shape `(batch, decoder_hidden_size)`, *optional*): the source
                path's [`SourceCondition`] summary, read by a head with `config.count_head_reads_source`.
            gene_states (`torch.FloatTensor` of shape `(batch, len, decoder_hidden_size)`, *optional*): the decoder's
                final states, read per gene with `config.count_readout == "per_gene"`.
            gene_index (`torch.LongTensor` of shape `(batch, len)`, *optional*): the target-gene column of each
                position of `gene_states` (-1 where it is not a gene).

        Returns:
            `dict` with `mu` `(batch, genes)`, `theta` (`(genes,)` or `(batch, genes)`, or None), `zi_logits`
            `(batch, genes)` or None, `library_size` `(batch,)`, `normalized_hidden` `(batch, hidden)` and, for
            "mse", `log_normalized` `(batch, genes)`.
        """
        if self.source_proj is not None and source_summary is not None:
            cell_embeddings = cell_embeddings + self.source_proj(source_summary.to(cell_embeddings.dtype))
        hidden = self.mlp(cell_embeddings)
        if self.l2_normalize:
            hidden = F.normalize(hidden, p=2.0, dim=-1, eps=1e-12)
        if self.library_mode == "predicted":
            library = self.log_library_size(hidden).squeeze(-1).exp()
        elif library_size is None:
            raise ValueError(
                "This model uses the observed library size (`library_size_source='observed'`): pass `library_size`."
            )
        else:
            library = library_size.to(hidden.dtype)
        logits = self.proportion_logits(hidden)
        zi_logits = self.zi_logits(hidden) if self.zi_logits is not None else None
        if self.gene_readout is not None and gene_states is not None:
            logits, zi_logits = self._read_genes(logits, zi_logits, gene_states, gene_index)
        out = {
            "theta": self._theta(dispersion_condition),
            "zi_logits": None,
            "library_size": library,
            "log_normalized": None,
            "normalized_hidden": hidden,
        }
        if self.likelihood == "mse":
            # Non-negative log1p(counts per 10k), mapped back to counts at the cell's library size.
            out["log_normalized"] = F.softplus(logits)
            out["mu"] = torch.expm1(out["log_normalized"]) * (library[:, None] / NORMALIZED_TOTAL)
        else:
            out["mu"] = logits.softmax(dim=-1) * library[:, None]
            out["zi_logits"] = zi_logits
        return out

    def _read_genes(self, logits, zi_logits, gene_states, gene_index):
        """Add each present gene's own readout to its logits (a gene at several positions: the sum)."""
        corrections = self.gene_readout(gene_states).to(logits.dtype)  # (batch, len, 1 or 2)
        present = gene_index >= 0
        columns = gene_index.clamp(min=0)
        corrections = corrections * present[..., None].to(corrections.dtype)
        logits = logits.scatter_add(1, columns, corrections[..., 0])
        if zi_logits is not None:
            zi_logits = zi_logits.scatter_add(1, columns, corrections[..., 1])
        return logits, zi_logits

    def _theta(self, dispersion_condition):
        if self.log_theta.dim() == 1:
            return self.log_theta.exp()
        if dispersion_condition is None:
            return None
        condition = torch.as_tensor(dispersion_condition, dtype=torch.long, device=self.log_theta.device)
        if condition.numel() and (condition.min() < 0 or condition.max() >= self.log_theta.shape[1]):
            raise ValueError(
                f"`dispersion_condition` must lie in [0, {self.log_theta.shape[1]}); got values in "
                f"[{int(condition.min())}, {int(condition.max())}]."
            )
        return self.log_theta[:, condition].T.exp()

    def loss(self, params: dict, target_counts: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per gene and cell (mean squared error of log1p CP10k for "mse")."""
        target_counts = target_counts.to(params["mu"].dtype)
        if params["theta"] is None and self.likelihood != "mse":
            raise ValueError(
                "This count head has one dispersion per condition: pass each cell's `dispersion_condition`."
            )
        if self.likelihood == "mse":
            totals = target_counts.sum(dim=-1, keepdim=True).clamp(min=1.0)
            target = torch.log1p(target_counts / totals * NORMALIZED_TOTAL)
            return F.mse_loss(params["log_normalized"], target)
        if self.likelihood == "nb":
            log_prob = negative_binomial_log_prob(target_counts, params["mu"], params["theta"])
        else:
            log_prob = zero_inflated_negative_binomial_log_prob(
                target_counts, params["mu"], params["theta"], params["zi_logits"]
            )
        return -log_prob.mean()

    def expected_counts(self, params: dict) -> torch.Tensor:
        """Expected counts: `mu`, times the probability of no structural zero for "zinb" (or `mu` itself when
        `config.count_prediction == "mu"`, as the original reports).
        """
        if params["zi_logits"] is not None and self.prediction == "mean":
            return zero_inflated_negative_binomial_mean(params["mu"], params["zi_logits"])
        return params["mu"]


class PerturbGenPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the `PreTrainedModel` attributes shared by PerturbGen models."""

    config: PerturbGenConfig
    config_class = PerturbGenConfig
    base_model_prefix = "perturbgen"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PerturbGenDecoderLayer", "BertLayer", "BertEmbeddings"]
    _supports_sdpa = True
    # `forward` returns a mean loss and takes no `num_items_in_batch`: Trainer must divide by accumulation steps.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BertEmbeddings):
            # Non-persistent buffers are re-created here when weights load onto the meta device.
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)
        elif getattr(module, "zero_init", False):
            # The source path's and the per-gene readout's output maps: no-ops at first (and for a model saved before
            # they existed, whose missing weights transformers initialises leaf by leaf); they learn from there.
            init.zeros_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.EmbeddingBag):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, PerturbGenCountHead):
            init.zeros_(module.log_theta)
            if module.log_library_size is not None:
                init.constant_(module.log_library_size.bias, self.config.log_library_size_init)


def _is_original_folder(path, kwargs) -> bool:
    """Whether a saved model (or the `config` passed with it) is of the original architecture's model type."""
    config = kwargs.get("config")
    if config is None or isinstance(config, (str, Path)):
        location = {
            k: kwargs[k] for k in ("cache_dir", "local_files_only", "revision", "token", "subfolder") if k in kwargs
        }
        config_dict, _ = PerturbGenConfig.get_config_dict(config or path, **location)
        config = PerturbGenConfig.from_dict(config_dict)
    return config.model_type == "perturbgen_original"


class PerturbGenForConditionalGeneration(PerturbGenGenerationMixin, PerturbGenPreTrainedModel):
    r"""
    PerturbGen: encoder (Geneformer BERT) + MaskGIT decoder + count head. `forward` computes the masked-token and count
    losses for training; `generate` predicts the target cells of one or more time points from source cells.

    Example:
    ```python
    >>> import torch
    >>> from perturbgen_hf import PerturbGenConfig, PerturbGenForConditionalGeneration
    >>> config = PerturbGenConfig(
    ...     encoder={"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    ...              "intermediate_size": 64, "max_position_embeddings": 64},
    ...     decoder_hidden_size=32, decoder_num_layers=2, decoder_num_heads=4, decoder_intermediate_size=64,
    ...     time_points=["2h", "6h"], time_values=[2.0, 6.0], num_target_genes=50,
    ... )
    >>> model = PerturbGenForConditionalGeneration(config).eval()
    >>> source = torch.tensor([[2, 10, 11, 12, 3]])
    >>> out = model.generate(source, sequence_length=8, generator=torch.Generator().manual_seed(0))
    >>> out.sequences.shape, out.counts.shape
    (torch.Size([1, 2, 8]), torch.Size([1, 2, 50]))
    ```
    """

    def __init__(self, config: PerturbGenConfig):
        super().__init__(config)
        self.encoder = self._build_encoder(config)
        encoder_width = config.encoder.hidden_size
        self.encoder_to_decoder = (
            nn.Linear(encoder_width, config.decoder_hidden_size)
            if encoder_width != config.decoder_hidden_size
            else None
        )
        self.source_path = PerturbGenSourcePath(config) if config.source_path != "none" else None
        self.decoder = PerturbGenDecoder(config)
        self.lm_head = nn.Linear(config.decoder_hidden_size, config.decoder_vocab_size)
        self.count_head = PerturbGenCountHead(config)
        self.post_init()
        if config.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    @staticmethod
    def _build_encoder(config) -> nn.Module:
        """The source encoder: a Geneformer BERT (the original architecture's model type has its own)."""
        return BertModel(config.encoder, add_pooling_layer=False)

    # -- modes and saving -------------------------------------------------------------------------------------------

    def train(self, mode: bool = True):
        """Like `nn.Module.train`, but a frozen encoder stays in eval mode (no dropout on a fixed feature map)."""
        super().train(mode)
        if self.config.freeze_encoder:
            self.encoder.eval()
        return self

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, recording this class for `AutoModelForSeq2SeqLM` too in `auto_map`."""
        if type(self)._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            module = type(self).__module__.rsplit(".", 1)[-1]
            auto_map.setdefault("AutoModelForSeq2SeqLM", f"{module}.{type(self).__name__}")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """
        `PreTrainedModel.from_pretrained`; a folder of the original PerturbGen architecture (model type
        `perturbgen_original`, or converted before that model type existed) loads as a
        [`PerturbGenOriginalForConditionalGeneration`], as `AutoModel.from_pretrained` does.
        """
        if cls is PerturbGenForConditionalGeneration and _is_original_folder(pretrained_model_name_or_path, kwargs):
            from .modeling_original_perturbgen import PerturbGenOriginalForConditionalGeneration

            return PerturbGenOriginalForConditionalGeneration.from_pretrained(
                pretrained_model_name_or_path, *args, **kwargs
            )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_geneformer(cls, path, **config_overrides) -> "PerturbGenForConditionalGeneration":
        """
        Build a PerturbGen model around a local Geneformer `BertForMaskedLM` checkpoint.

        Args:
            path (`str` or `os.PathLike`):
                Folder with the Geneformer `config.json` and `model.safetensors` (or legacy `pytorch_model.bin`, read
                with `torch.load(weights_only=True)`).
            config_overrides:
                Any other [`PerturbGenConfig`] field (decoder size, time points, target genes, ...).

        Returns:
            [`PerturbGenForConditionalGeneration`] whose encoder holds the Geneformer weights (the MLM head is
            dropped) and whose decoder and heads are freshly initialised.

        Example:
        ```python
        >>> model = PerturbGenForConditionalGeneration.from_geneformer(
        ...     "Geneformer/gf-12L-95M-i4096", time_points=["6h", "10h"], time_values=[6, 10], num_target_genes=2000
        ... )  # doctest: +SKIP
        ```
        """
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"Geneformer checkpoint folder not found: {str(path)!r}")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"No config.json in the Geneformer checkpoint folder {str(path)!r}")
        if "encoder" in config_overrides:
            raise ValueError("`encoder` comes from the Geneformer checkpoint; do not pass it to from_geneformer.")
        masked_lm = BertForMaskedLM.from_pretrained(folder)
        encoder_config = masked_lm.config.to_dict()
        encoder_config.pop("architectures", None)
        model = cls(PerturbGenConfig(encoder=encoder_config, **config_overrides))
        model.encoder.load_state_dict(masked_lm.bert.state_dict(), strict=True)
        return model

    # -- building blocks --------------------------------------------------------------------------------------------

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Encode source cells and project them to the decoder's width.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, source_len)`): source tokens in the encoder vocabulary.
            attention_mask (`torch.LongTensor` of shape `(batch, source_len)`, *optional*): 1 for real tokens.
                Defaults to `input_ids != pad_token_id`.

        Returns:
            `torch.FloatTensor` of shape `(batch, source_len, decoder_hidden_size)`.
        """
        self._check_source_ids(input_ids)
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_encoder):
            encoded = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.encoder_to_decoder is not None:
            encoded = self.encoder_to_decoder(encoded)
        return encoded

    def condition_on_source(self, input_ids: torch.Tensor):
        """
        The source path's [`SourceCondition`] (see [`PerturbGenSourcePath`]), or None for
        `config.source_path == "none"`.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, source_len)`): source tokens (encoder vocabulary).
        """
        return None if self.source_path is None else self.source_path(input_ids)

    def encode_context(
        self,
        source_memory: torch.Tensor,
        source_mask: torch.Tensor,
        context_input_ids: torch.Tensor,
        context_time_values: torch.Tensor,
        context_attention_mask: torch.Tensor | None = None,
        source_condition=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Decoder embeddings of the context time points (complete, unmasked sequences), each decoded with the source as
        its only memory, all in one batched pass.

        Args:
            source_memory (`torch.FloatTensor` of shape `(batch, source_len, hidden)`), source_mask (`(batch,
                source_len)`): the encoded source.
            context_input_ids (`torch.LongTensor` of shape `(batch, num_context, context_len)`): context sequences;
                an all-`<pad>` slot is an absent time point.
            context_time_values (`torch.FloatTensor` of shape `(batch, num_context)`).
            context_attention_mask (`torch.BoolTensor` of shape `(batch, num_context, context_len)`, *optional*).
            source_condition (`tuple`, *optional*): from [`condition_on_source`].

        Returns:
            `(states, mask)`: `(batch, num_context * context_len, hidden)` and `(batch, num_context * context_len)`.
        """
        batch_size, num_context, context_len = context_input_ids.shape
        if context_attention_mask is None:
            context_attention_mask = context_input_ids != self.config.pad_token_id
        if self.config.context_mode == "chained":
            return self._chained_context(
                source_memory,
                source_mask,
                context_input_ids,
                context_time_values,
                context_attention_mask,
                source_condition,
            )
        flat_ids = context_input_ids.reshape(batch_size * num_context, context_len)
        flat_mask = context_attention_mask.reshape(batch_size * num_context, context_len).bool()
        memory = source_memory.repeat_interleave(num_context, dim=0)
        memory_mask = source_mask.repeat_interleave(num_context, dim=0)
        condition = None if source_condition is None else source_condition.repeat_interleave(num_context)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.context_gradient):
            states = self.decoder(
                flat_ids,
                flat_mask,
                context_time_values.reshape(-1).to(memory.dtype),
                self.decoder.project_memory(memory),
                memory_mask,
                condition,
            )
        hidden = states.shape[-1]
        return states.reshape(batch_size, num_context * context_len, hidden), flat_mask.reshape(batch_size, -1)

    def _chained_context(
        self,
        source_memory,
        source_mask,
        context_input_ids,
        context_time_values,
        context_attention_mask,
        source_condition=None,
    ):
        """
        The original's context: each context time point, in the given (ascending) order, is decoded with the source
        and the context states before it as memory.
        """
        memory, memory_mask = source_memory, source_mask
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.context_gradient):
            for slot in range(context_input_ids.shape[1]):
                mask = context_attention_mask[:, slot].bool()
                states = self.decoder(
                    context_input_ids[:, slot],
                    mask,
                    context_time_values[:, slot].to(memory.dtype),
                    self.decoder.project_memory(memory),
                    memory_mask,
                    source_condition,
                )
                memory, memory_mask = torch.cat([memory, states], dim=1), torch.cat([memory_mask, mask], dim=1)
        length = source_memory.shape[1]
        return memory[:, length:], memory_mask[:, length:]

    def gene_positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        """`True` where a decoder token is a target gene (not special, not a condition token)."""
        first = self.config.first_gene_token_id
        return (token_ids >= first) & (token_ids < first + self.config.num_target_genes)

    def gene_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Target-gene column (count column) of each decoder token, -1 where the token is not a target gene."""
        return torch.where(self.gene_positions(token_ids), token_ids - self.config.first_gene_token_id, -1)

    def pooled_positions(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Positions the cell embedding averages: the target-gene tokens."""
        return self.gene_positions(token_ids)

    def pool(self, hidden_states: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Mean of `hidden_states` `(batch, len, hidden)` over the positions of `pooled_positions` -> `(batch, hidden)`."""
        weights = self.pooled_positions(token_ids).to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def _check_source_ids(self, input_ids):
        vocab = self.config.encoder.vocab_size
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
            raise ValueError(
                f"Source token ids must lie in [0, {vocab}) (the encoder vocabulary); got values in "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]."
            )

    def _check_target_ids(self, token_ids, name):
        vocab = self.config.decoder_vocab_size
        if token_ids.numel() and (token_ids.min() < 0 or token_ids.max() >= vocab):
            raise ValueError(
                f"`{name}` must lie in [0, {vocab}) (the decoder vocabulary); got values in "
                f"[{int(token_ids.min())}, {int(token_ids.max())}]."
            )

    def _memory(self, input_ids, attention_mask, context_input_ids, context_time_values, context_attention_mask):
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        source = self.encode(input_ids, attention_mask)
        source_mask = attention_mask.bool()
        condition = self.condition_on_source(input_ids)
        if context_input_ids is None or self.config.context_mode == "none":
            return source, source_mask, source, condition
        if context_time_values is None:
            raise ValueError("`context_time_values` is required with `context_input_ids`.")
        self._check_target_ids(context_input_ids, "context_input_ids")
        context, context_mask = self.encode_context(
            source, source_mask, context_input_ids, context_time_values, context_attention_mask, condition
        )
        memory, memory_mask = torch.cat([source, context], dim=1), torch.cat([source_mask, context_mask], dim=1)
        return memory, memory_mask, source, condition

    def _decode(
        self, token_ids, time_values, memory_key_values, memory_mask, attention_mask=None, source_condition=None
    ):
        if attention_mask is None:
            attention_mask = token_ids != self.config.pad_token_id
        return self.decoder(
            token_ids, attention_mask.bool(), time_values, memory_key_values, memory_mask, source_condition
        )

    # -- training forward -------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        decoder_time_values: torch.FloatTensor | None = None,
        context_input_ids: torch.LongTensor | None = None,
        context_attention_mask: torch.LongTensor | None = None,
        context_time_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        target_counts: torch.FloatTensor | None = None,
        library_size: torch.FloatTensor | None = None,
        return_dict: bool | None = None,
    ) -> PerturbGenOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, source_len)`):
                Source cells, rank-value encoded in the encoder vocabulary (`<cls>` ... `<eos>`, padded with 0).
            attention_mask (`torch.LongTensor` of shape `(batch_size, source_len)`, *optional*):
                1 for real source tokens, 0 for padding. Defaults to `input_ids != 0`.
            decoder_input_ids (`torch.LongTensor` of shape `(batch_size, target_len)`):
                Target cells in the decoder vocabulary (condition tokens first, then genes by rank), where the
                positions to predict hold `<mask>`.
            decoder_attention_mask (`torch.LongTensor` of shape `(batch_size, target_len)`, *optional*):
                1 for non-padding target positions. Defaults to `decoder_input_ids != 0`.
            decoder_time_values (`torch.FloatTensor` of shape `(batch_size,)`):
                Time value of each target cell (e.g. hours).
            context_input_ids (`torch.LongTensor` of shape `(batch_size, num_context, context_len)`, *optional*):
                Complete sequences of other time points; an all-padding slot is an absent time point.
            context_attention_mask (`torch.LongTensor` of shape `(batch_size, num_context, context_len)`, *optional*).
            context_time_values (`torch.FloatTensor` of shape `(batch_size, num_context)`, *optional*).
            labels (`torch.LongTensor` of shape `(batch_size, target_len)`, *optional*):
                True tokens at masked positions and -100 elsewhere; gives `token_loss`.
            target_counts (`torch.FloatTensor` of shape `(batch_size, num_target_genes)`, *optional*):
                Observed counts of the target genes; gives `count_loss`. The count head then reads the complete
                target sequence (masked positions filled from `labels`), as at inference.
            library_size (`torch.FloatTensor` of shape `(batch_size,)`, *optional*):
                Observed library sizes, for `config.library_size_source == "observed"`. Defaults to the sum of
                `target_counts`; without either, such a model's count outputs are None.
            return_dict (`bool`, *optional*): return a [`PerturbGenOutput`] (default) or a tuple.

        Returns:
            [`PerturbGenOutput`].
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if decoder_input_ids is None or decoder_time_values is None:
            raise ValueError("`decoder_input_ids` and `decoder_time_values` are required; use `generate` to predict.")
        self._check_target_ids(decoder_input_ids, "decoder_input_ids")
        memory, memory_mask, source, condition = self._memory(
            input_ids, attention_mask, context_input_ids, context_time_values, context_attention_mask
        )
        time_values = decoder_time_values.to(memory.dtype)
        memory_key_values = self.decoder.project_memory(memory)
        hidden_states = self._decode(
            decoder_input_ids, time_values, memory_key_values, memory_mask, decoder_attention_mask, condition
        )
        logits = self.lm_head(hidden_states)

        token_loss = self.token_loss(logits, labels) if labels is not None else None

        # The count head reads a complete sequence: the input itself, or the input with its masks filled in.
        count_ids, count_hidden = decoder_input_ids, hidden_states
        if labels is not None and target_counts is not None:
            count_ids = torch.where(labels != -100, labels, decoder_input_ids)
            count_hidden = self._decode(
                count_ids, time_values, memory_key_values, memory_mask, decoder_attention_mask, condition
            )
        cell_embeddings = self.pool(count_hidden, count_ids)
        if library_size is None and target_counts is not None and self.config.library_size_source == "observed":
            library_size = target_counts.sum(dim=-1)
        # A head scaled by the observed library size has nothing to scale without one: its outputs are then None.
        readable = self.config.library_size_source != "observed" or library_size is not None
        count_params = (
            self.count_head(
                cell_embeddings,
                library_size,
                source_summary=_summary(condition),
                gene_states=count_hidden,
                gene_index=self.gene_index(count_ids),
            )
            if readable
            else dict.fromkeys(_COUNT_KEYS)
        )
        count_loss = self.count_head.loss(count_params, target_counts) if target_counts is not None else None

        loss = self._combine_losses(token_loss, count_loss)
        output = PerturbGenOutput(
            loss=loss,
            token_loss=token_loss,
            count_loss=count_loss,
            logits=logits,
            count_mu=count_params["mu"],
            count_theta=count_params["theta"],
            count_zi_logits=count_params["zi_logits"],
            library_size=count_params["library_size"],
            cell_embeddings=cell_embeddings,
            decoder_last_hidden_state=hidden_states,
            encoder_last_hidden_state=source,
        )
        return output if return_dict else output.to_tuple()

    @staticmethod
    def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        Cross entropy of the masked tokens, averaged within each cell, then over the cells that have masked tokens.

        Each cell weighs the same whatever its (random, MaskGIT) masking ratio, and a mean over equal-sized
        micro-batches equals the mean over their union, so gradient accumulation matches a larger batch.
        """
        per_token = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=-100, reduction="none")
        masked = labels != -100
        cells = masked.any(dim=1)
        per_cell = per_token.sum(dim=1) / masked.sum(dim=1).clamp(min=1)
        return per_cell[cells].sum() / cells.sum().clamp(min=1)

    def _combine_losses(self, token_loss, count_loss):
        terms = []
        if token_loss is not None and self.config.token_loss_weight > 0:
            terms.append(self.config.token_loss_weight * token_loss)
        if count_loss is not None and self.config.count_loss_weight > 0:
            terms.append(self.config.count_loss_weight * count_loss)
        return torch.stack(terms).sum() if terms else None


__all__ = [
    "PerturbGenForConditionalGeneration",
    "PerturbGenGenerateOutput",
    "PerturbGenOutput",
    "PerturbGenPreTrainedModel",
]
