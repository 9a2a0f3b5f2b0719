"""
MaskGIT generation and the teacher-forced readout of [`PerturbGenForConditionalGeneration`], as a mixin: the
model's layers, heads and `forward` live in `modeling_perturbgen.py`; what turns a source cell into generated target
cells lives here (the original's generation loop in `generation_original_perturbgen.py`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput

from .masking_perturbgen import (
    first_occurrence,
    margin_confidence,
    num_masked_after_step,
    sample_categorical,
    top_k_filter,
)


@dataclass
class PerturbGenGenerateOutput(ModelOutput):
    r"""
    Output of [`PerturbGenForConditionalGeneration.generate`]; the time axis follows `time_values`.

    Args:
        sequences (`torch.LongTensor` of shape `(batch_size, num_time_points, target_len)`):
            Generated target tokens (condition tokens first, then genes, then `<pad>`).
        time_values (`torch.FloatTensor` of shape `(num_time_points,)`):
            Time value of each generated time point, ascending.
        cell_embeddings (`torch.FloatTensor` of shape `(batch_size, num_time_points, decoder_hidden_size)`):
            Pooled decoder embedding of each generated cell.
        counts (`torch.FloatTensor` of shape `(batch_size, num_time_points, num_target_genes)`):
            Predicted expected counts (the zero-inflated mean for "zinb").
        count_mu, count_zi_logits, library_size: the count head's parameters per time point (see
            [`PerturbGenOutput`]); `count_theta` of shape `(num_target_genes,)`.
        decoder_hidden_states (`torch.FloatTensor` of shape `(batch_size, num_time_points, target_len, hidden)`,
            *optional*): final hidden states (only with `output_hidden_states=True`).
    """

    sequences: torch.LongTensor | None = None
    time_values: torch.FloatTensor | None = None
    cell_embeddings: torch.FloatTensor | None = None
    counts: torch.FloatTensor | None = None
    count_mu: torch.FloatTensor | None = None
    count_theta: torch.FloatTensor | None = None
    count_zi_logits: torch.FloatTensor | None = None
    library_size: torch.FloatTensor | None = None
    decoder_hidden_states: torch.FloatTensor | None = None


@dataclass
class GenerationRequest:
    """`generate`'s checked arguments, with their defaults resolved (see `_prepare_generation`)."""

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    times: list
    lengths: torch.LongTensor
    condition_ids: torch.LongTensor
    num_iterations: int
    temperature: float
    top_k: int | None
    schedule: str
    noise: tuple
    sequence_editor: object
    edit_values: set


def _summary(source_condition):
    """The source path's summary vector, or None for a model without a source path."""
    return None if source_condition is None else source_condition.summary


class PerturbGenGenerationMixin:
    """`generate` (MaskGIT) and `readout` (teacher-forced) for [`PerturbGenForConditionalGeneration`]."""

    def _resolve_time_values(self, time_points) -> list[float]:
        if time_points is None:
            return list(self.config.time_values)
        if isinstance(time_points, (str, int, float)):
            time_points = [time_points]
        values = [self.config.time_value(t) for t in time_points]
        if not values:
            raise ValueError("`time_points` is empty.")
        if len(set(values)) != len(values):
            raise ValueError(f"`time_points` repeats a time point: {list(time_points)}.")
        return sorted(values)

    def _resolve_lengths(self, sequence_length, input_ids, attention_mask, num_conditions) -> torch.Tensor:
        batch_size = input_ids.shape[0]
        max_genes = min(self.config.num_target_genes, self.config.decoder_max_position_embeddings - num_conditions)
        if sequence_length is None:
            # As many genes as the source cell expresses (its tokens minus <cls>/<eos>).
            lengths = attention_mask.long().sum(dim=1) - 2
        elif isinstance(sequence_length, int):
            lengths = torch.full((batch_size,), sequence_length, dtype=torch.long, device=input_ids.device)
        else:
            lengths = torch.as_tensor(sequence_length, dtype=torch.long, device=input_ids.device).reshape(-1)
            if lengths.shape[0] != batch_size:
                raise ValueError(f"`sequence_length` has {lengths.shape[0]} entries for {batch_size} cells.")
        if (lengths < 1).any():
            raise ValueError(f"`sequence_length` must be >= 1, got minimum {int(lengths.min())}.")
        if sequence_length is not None and (lengths > max_genes).any():
            raise ValueError(
                f"`sequence_length` {int(lengths.max())} exceeds the {max_genes} genes this decoder can emit "
                "(num_target_genes, or decoder_max_position_embeddings minus condition tokens)."
            )
        return lengths.clamp(max=max_genes)

    def _initial_target(self, lengths, condition_ids):
        batch_size = lengths.shape[0]
        num_conditions = condition_ids.shape[1]
        width = num_conditions + int(lengths.max())
        positions = torch.arange(width, device=lengths.device).expand(batch_size, width)
        is_gene = (positions >= num_conditions) & (positions < num_conditions + lengths[:, None])
        tokens = torch.full((batch_size, width), self.config.pad_token_id, dtype=torch.long, device=lengths.device)
        tokens = tokens.masked_fill(is_gene, self.config.mask_token_id)
        tokens[:, :num_conditions] = condition_ids
        return tokens, is_gene

    def _banned_ids(self, tokens, is_gene):
        """`(batch, vocab)` mask of ids a gene position may not take: non-genes and genes already in the cell."""
        vocab = self.config.decoder_vocab_size
        banned = torch.ones(vocab, dtype=torch.bool, device=tokens.device)
        first = self.config.first_gene_token_id
        banned[first : first + self.config.num_target_genes] = False
        banned = banned.expand(tokens.shape[0], vocab).clone()
        committed = is_gene & (tokens != self.config.mask_token_id)
        return banned.scatter(1, tokens.masked_fill(~committed, 0), committed) | banned

    def _unmask_step(self, logits, tokens, is_gene, keep_masked, temperature, top_k, generator, noise=(None, None)):
        """One MaskGIT step: sample masked positions, commit the most confident unique genes, re-mask the rest."""
        masked = is_gene & (tokens == self.config.mask_token_id)
        logits = logits.float().masked_fill(self._banned_ids(tokens, is_gene)[:, None, :], float("-inf"))
        logits = top_k_filter(logits, top_k)
        proposal = sample_categorical(logits, temperature, generator, *noise)
        confidence = margin_confidence(logits)
        unique = first_occurrence(proposal, confidence, masked, self.config.decoder_vocab_size)
        # Commit the `num_masked - keep_masked` most confident unique proposals of each cell.
        num_commit = (masked.sum(dim=1) - keep_masked).clamp(min=0)
        ranked = confidence.masked_fill(~unique, float("-inf")).argsort(dim=1, descending=True).argsort(dim=1)
        commit = unique & (ranked < num_commit[:, None])
        return torch.where(commit, proposal, tokens)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        time_points=None,
        sequence_length=None,
        condition_ids: torch.LongTensor | None = None,
        num_iterations: int = 16,
        temperature: float = 1.0,
        top_k: int | None = None,
        schedule: str | None = None,
        library_size: torch.FloatTensor | None = None,
        generator: torch.Generator | None = None,
        output_hidden_states: bool = False,
        noise_index: torch.LongTensor | None = None,
        num_noise_rows: int | None = None,
        sequence_editor=None,
        edit_time_points=None,
    ) -> PerturbGenGenerateOutput:
        r"""
        Predict target cells at one or more time points from source cells by MaskGIT iterative decoding.

        Time points are generated in increasing time; each one's context is the already generated earlier ones
        (`context_mode` "previous" or "all"). Per time point: start from all-`<mask>` gene positions; at step `i` of
        `num_iterations` sample every masked position at temperature `temperature * (1 - (i + 1) / num_iterations)`
        (greedy at the last step) after banning non-gene ids and genes already committed in the cell and keeping the
        `top_k` logits; commit the proposals with the largest probability margin `p1 - p2` so that
        `floor(L * gamma((i + 1) / num_iterations))` positions stay masked; a gene proposed at two positions is
        committed only at the more confident one. Extra greedy steps resolve any masks left by such collisions. The
        complete sequence is then read out once more for embeddings and counts. The encoder runs once per call and
        the cross-attention keys/values of the fixed memory once per time point.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, source_len)`): source cells.
            attention_mask (`torch.LongTensor` of shape `(batch_size, source_len)`, *optional*).
            time_points (`list` of `str` or `float`, *optional*): names from `config.time_points` or time values
                (unseen values are allowed). Defaults to all of `config.time_points`.
            sequence_length (`int` or `torch.LongTensor` of shape `(batch_size,)`, *optional*): genes to generate per
                cell. Defaults to the number of genes in each source cell (capped at `num_target_genes`).
            condition_ids (`torch.LongTensor` of shape `(batch_size, num_conditions)`, *optional*): decoder ids of
                condition tokens, kept in front of every generated sequence.
            num_iterations (`int`, *optional*, defaults to 16): MaskGIT steps.
            temperature (`float`, *optional*, defaults to 1.0): initial sampling temperature (0 = greedy).
            top_k (`int`, *optional*): keep only the `top_k` largest logits when sampling.
            schedule (`str`, *optional*): `"cosine"`, `"pow"` or `"linear"`; defaults to `config.mask_schedule`.
            library_size (`torch.FloatTensor` of shape `(batch_size,)`, *optional*): required when
                `config.library_size_source == "observed"`.
            generator (`torch.Generator`, *optional*): makes the sampling reproducible.
            output_hidden_states (`bool`, *optional*, defaults to `False`): also return the final hidden states.
            noise_index (`torch.LongTensor` of shape `(batch_size,)`, *optional*): cell `i` takes the random draws
                of row `noise_index[i]` of a draw made for `num_noise_rows` rows, so that variants of one cell (its
                control and its perturbations) share their draws wherever they sit in a batch. A batch of the
                unedited cells with `noise_index=arange(n)` draws exactly as a call without it.
            num_noise_rows (`int`, *optional*): rows of each draw; defaults to `noise_index.max() + 1`.
            sequence_editor (`Callable[[torch.LongTensor, float], torch.LongTensor]`, *optional*): applied to the
                generated `(batch_size, length)` sequences of the time points in `edit_time_points` (with the time
                value) before they are read out and used as context by later time points: an in silico
                perturbation of a target state.
            edit_time_points (`list`, *optional*): names or values of the time points `sequence_editor` edits.

        Returns:
            [`PerturbGenGenerateOutput`].
        """
        request = self._prepare_generation(
            input_ids,
            attention_mask,
            time_points,
            sequence_length,
            condition_ids,
            num_iterations,
            temperature,
            top_k,
            schedule,
            noise_index,
            num_noise_rows,
            sequence_editor,
            edit_time_points,
        )
        return self._generate_maskgit(request, library_size, generator, output_hidden_states)

    def _prepare_generation(
        self,
        input_ids,
        attention_mask,
        time_points,
        sequence_length,
        condition_ids,
        num_iterations,
        temperature,
        top_k,
        schedule,
        noise_index,
        num_noise_rows,
        sequence_editor,
        edit_time_points,
    ) -> "GenerationRequest":
        """Check `generate`'s arguments and resolve its defaults (time values, lengths, masks, noise rows)."""
        if num_iterations < 1:
            raise ValueError(f"`num_iterations` must be >= 1, got {num_iterations}.")
        if temperature < 0:
            raise ValueError(f"`temperature` must be >= 0, got {temperature}.")
        if top_k is not None and top_k < 1:
            raise ValueError(f"`top_k` must be >= 1, got {top_k}.")
        times = self._resolve_time_values(time_points)
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        batch_size = input_ids.shape[0]
        if condition_ids is None:
            condition_ids = torch.zeros(batch_size, 0, dtype=torch.long, device=input_ids.device)
        self._check_conditions(condition_ids, batch_size)
        edit_values = set()
        if sequence_editor is not None:
            edit_values = set(self._resolve_time_values(edit_time_points)) if edit_time_points is not None else set()
            if not edit_values <= set(times):
                raise ValueError(f"`edit_time_points` {edit_time_points} must be among the generated time points.")
        return GenerationRequest(
            input_ids=input_ids,
            attention_mask=attention_mask,
            times=times,
            lengths=self._resolve_lengths(sequence_length, input_ids, attention_mask, condition_ids.shape[1]),
            condition_ids=condition_ids,
            num_iterations=num_iterations,
            temperature=temperature,
            top_k=top_k,
            schedule=schedule or self.config.mask_schedule,
            noise=self._check_noise_index(noise_index, num_noise_rows, batch_size),
            sequence_editor=sequence_editor,
            edit_values=edit_values,
        )

    def _generate_maskgit(self, request, library_size, generator, output_hidden_states) -> PerturbGenGenerateOutput:
        """This package's MaskGIT generation of every requested time point (see `generate`)."""
        input_ids, attention_mask, times = request.input_ids, request.attention_mask, request.times
        batch_size, lengths = input_ids.shape[0], request.lengths
        source = self.encode(input_ids, attention_mask)  # once per call
        source_mask = attention_mask.bool()
        condition = self.condition_on_source(input_ids)
        generators = self._time_point_generators(generator, len(times))
        generated, contexts = [], []
        for time_value, generator in zip(times, generators):
            time_tensor = torch.full((batch_size,), time_value, dtype=source.dtype, device=source.device)
            memory = torch.cat([source, *[c[0] for c in contexts]], dim=1)
            memory_mask = torch.cat([source_mask, *[c[1] for c in contexts]], dim=1)
            memory_key_values = self.decoder.project_memory(memory)  # once per time point, reused every step
            tokens, is_gene = self._initial_target(lengths, request.condition_ids)
            tokens = self._maskgit_loop(
                tokens,
                is_gene,
                lengths,
                time_tensor,
                memory_key_values,
                memory_mask,
                request.num_iterations,
                request.temperature,
                request.top_k,
                request.schedule,
                generator,
                request.noise,
                condition,
            )
            if time_value in request.edit_values:
                tokens = request.sequence_editor(tokens, time_value)
            hidden = self._decode(tokens, time_tensor, memory_key_values, memory_mask, source_condition=condition)
            generated.append((tokens, hidden))
            if self.config.context_mode != "none" and time_value != times[-1]:
                if self.config.context_mode == "chained":
                    context = hidden  # the same decoding: the memory so far
                else:
                    source_kv = self.decoder.project_memory(source)
                    context = self._decode(tokens, time_tensor, source_kv, source_mask, source_condition=condition)
                contexts.append((context, tokens != self.config.pad_token_id))
        return self._generate_output(generated, times, library_size, output_hidden_states, condition)

    @torch.no_grad()
    def readout(
        self,
        input_ids: torch.LongTensor,
        decoder_input_ids: torch.LongTensor,
        time_points,
        attention_mask: torch.LongTensor | None = None,
        library_size: torch.FloatTensor | None = None,
        output_hidden_states: bool = False,
        exclude_from_pooling=None,
    ) -> PerturbGenGenerateOutput:
        r"""
        Teacher-forced readout of observed (complete) target cells, as the original PerturbGen's perturbation
        "inference" mode: no generation; each time point is decoded from the source and, as context, the other given
        time points (`context_mode` "previous": the earlier ones; "all": all others), then pooled and read out by the
        count head.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, source_len)`): source cells.
            decoder_input_ids (`torch.LongTensor` of shape `(batch_size, num_time_points, target_len)`): observed
                target cells in the decoder vocabulary (condition tokens, then genes by rank, padded with 0).
            time_points (`list`): names or values of the `num_time_points` time points, in that order.
            attention_mask (`torch.LongTensor` of shape `(batch_size, source_len)`, *optional*).
            library_size (`torch.FloatTensor` of shape `(batch_size, num_time_points)`, *optional*): observed
                library sizes of the targets (required when `config.library_size_source == "observed"`).
            output_hidden_states (`bool`, *optional*, defaults to `False`).
            exclude_from_pooling (`Sequence[int]`, *optional*): decoder ids left out of the cell embeddings (the
                original leaves the perturbed genes out of its perturbed pass when it edits target cells).

        Returns:
            [`PerturbGenGenerateOutput`] whose `sequences` are the given targets.
        """
        if decoder_input_ids.dim() != 3:
            raise ValueError(
                f"`decoder_input_ids` must be (batch, time points, length); got shape {tuple(decoder_input_ids.shape)}."
            )
        if isinstance(time_points, (str, int, float)):
            time_points = [time_points]
        times = [self.config.time_value(t) for t in time_points]
        if len(times) != decoder_input_ids.shape[1] or len(set(times)) != len(times):
            raise ValueError(
                f"`time_points` {list(time_points)} must name {decoder_input_ids.shape[1]} distinct time points."
            )
        self._check_target_ids(decoder_input_ids, "decoder_input_ids")
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        batch_size, num_times, length = decoder_input_ids.shape
        source = self.encode(input_ids, attention_mask)
        source_mask = attention_mask.bool()
        condition = self.condition_on_source(input_ids)
        time_tensor = torch.tensor(times, dtype=source.dtype, device=source.device)
        use_context = self.config.context_mode != "none" and num_times > 1
        chained = self.config.context_mode == "chained"
        if use_context and not chained:
            # Every slot's context states depend only on the source and the slot, so they are computed once.
            context, context_mask = self.encode_context(
                source,
                source_mask,
                decoder_input_ids,
                time_tensor.expand(batch_size, num_times),
                source_condition=condition,
            )
        generated = []
        for index in range(num_times):
            memory, memory_mask = source, source_mask
            if use_context and chained:
                # The original: every other time point, in ascending time, each decoded on the memory so far.
                others = sorted((k for k in range(num_times) if k != index), key=lambda k: times[k])
                states, mask = self._chained_context(
                    source,
                    source_mask,
                    decoder_input_ids[:, others],
                    time_tensor[others].expand(batch_size, -1),
                    decoder_input_ids[:, others] != self.config.pad_token_id,
                    condition,
                )
                memory, memory_mask = torch.cat([source, states], dim=1), torch.cat([source_mask, mask], dim=1)
            elif use_context:
                used = [
                    other != index and (self.config.context_mode == "all" or times[other] < times[index])
                    for other in range(num_times)
                ]
                slots = torch.tensor(used, device=source.device).repeat_interleave(length)
                memory = torch.cat([source, context], dim=1)
                memory_mask = torch.cat([source_mask, context_mask & slots], dim=1)
            tokens = decoder_input_ids[:, index]
            hidden = self._decode(
                tokens,
                time_tensor[index].expand(batch_size),
                self.decoder.project_memory(memory),
                memory_mask,
                source_condition=condition,
            )
            pooled_input = tokens
            if exclude_from_pooling is not None:
                excluded = torch.as_tensor(list(exclude_from_pooling), dtype=tokens.dtype, device=tokens.device)
                pooled_input = tokens.masked_fill(torch.isin(tokens, excluded), self.config.pad_token_id)
            generated.append((tokens, hidden, pooled_input))
        return self._generate_output(generated, times, library_size, output_hidden_states, condition)

    @staticmethod
    def _time_point_generators(generator, num_times):
        """
        One generator per time point, seeded from `generator` up front, so that the draws of a time point do not
        depend on how many steps earlier time points took (a batch stops early once every position is committed).
        """
        if generator is None:
            return [None] * num_times
        seeds = torch.randint(0, 2**62, (num_times,), generator=generator, device=generator.device).tolist()
        return [torch.Generator(device=generator.device).manual_seed(int(seed)) for seed in seeds]

    @staticmethod
    def _check_noise_index(noise_index, num_noise_rows, batch_size):
        if noise_index is None:
            if num_noise_rows is not None:
                raise ValueError("`num_noise_rows` needs `noise_index`.")
            return None, None
        noise_index = torch.as_tensor(noise_index, dtype=torch.long).reshape(-1)
        if noise_index.shape[0] != batch_size:
            raise ValueError(f"`noise_index` has {noise_index.shape[0]} entries for {batch_size} cells.")
        rows = int(noise_index.max()) + 1 if num_noise_rows is None else int(num_noise_rows)
        if int(noise_index.min()) < 0 or int(noise_index.max()) >= rows:
            raise ValueError(f"`noise_index` must lie in [0, {rows}) (num_noise_rows).")
        return noise_index, rows

    def _check_conditions(self, condition_ids, batch_size):
        if condition_ids.shape[0] != batch_size:
            raise ValueError(f"`condition_ids` has {condition_ids.shape[0]} rows for {batch_size} cells.")
        first = self.config.first_condition_token_id
        if condition_ids.numel() and (
            (condition_ids < first).any() or (condition_ids >= self.config.decoder_vocab_size).any()
        ):
            raise ValueError(
                f"`condition_ids` must be condition-token ids in [{first}, {self.config.decoder_vocab_size})."
            )

    def _maskgit_loop(
        self,
        tokens,
        is_gene,
        lengths,
        time_values,
        memory_key_values,
        memory_mask,
        num_iterations,
        temperature,
        top_k,
        schedule,
        generator,
        noise=(None, None),
        source_condition=None,
    ):
        exponent = self.config.mask_schedule_exponent
        step = 0
        # The scheduled steps, then greedy steps for positions left masked by duplicate proposals (bounded: each
        # step commits at least one position of every cell that still has masks).
        max_steps = num_iterations + int(lengths.max())
        while step < max_steps:
            if not (is_gene & (tokens == self.config.mask_token_id)).any():
                break
            scheduled = step < num_iterations
            keep = (
                num_masked_after_step(step, num_iterations, lengths, schedule, exponent).to(tokens.device)
                if scheduled
                else torch.zeros_like(lengths)
            )
            step_temperature = temperature * (1.0 - (step + 1) / num_iterations) if scheduled else 0.0
            hidden = self._decode(
                tokens, time_values, memory_key_values, memory_mask, source_condition=source_condition
            )
            logits = self.lm_head(hidden)
            tokens = self._unmask_step(logits, tokens, is_gene, keep, step_temperature, top_k, generator, noise)
            step += 1
        return tokens

    def _generate_output(self, generated, times, library_size, output_hidden_states, source_condition=None):
        """`generated`: per time point `(tokens, hidden)` or `(tokens, hidden, pooled_input)` when the hidden states
        were computed from another input than the final tokens (the original generation's last step).
        """
        width = max(item[0].shape[1] for item in generated)
        sequences, embeddings, params = [], [], []
        for index, (tokens, hidden, *pooled_input) in enumerate(generated):
            sequences.append(F.pad(tokens, (0, width - tokens.shape[1]), value=self.config.pad_token_id))
            pooled = self.pool(hidden, pooled_input[0] if pooled_input else tokens)
            embeddings.append(pooled)
            library = library_size[:, index] if library_size is not None and library_size.dim() == 2 else library_size
            pooled_ids = pooled_input[0] if pooled_input else tokens
            params.append(
                self.count_head(
                    pooled,
                    library,
                    source_summary=_summary(source_condition),
                    gene_states=hidden,
                    gene_index=self.gene_index(pooled_ids),
                )
            )
        stacked = {key: [p[key] for p in params] for key in ("mu", "zi_logits", "library_size")}
        counts = torch.stack([self.count_head.expected_counts(p) for p in params], dim=1)
        hidden_states = None
        if output_hidden_states:
            hidden_states = torch.stack(
                [F.pad(item[1], (0, 0, 0, width - item[1].shape[1])) for item in generated], dim=1
            )
        return PerturbGenGenerateOutput(
            sequences=torch.stack(sequences, dim=1),
            time_values=torch.tensor(times, dtype=torch.float32),
            cell_embeddings=torch.stack(embeddings, dim=1),
            counts=counts,
            count_mu=torch.stack(stacked["mu"], dim=1),
            count_theta=params[0]["theta"],
            count_zi_logits=None if stacked["zi_logits"][0] is None else torch.stack(stacked["zi_logits"], dim=1),
            library_size=torch.stack(stacked["library_size"], dim=1),
            decoder_hidden_states=hidden_states,
        )
