"""
The original PerturbGen's MaskGIT generation (`generation_mode="original"`), kept apart from this package's own
loop so that each reads as one algorithm. Reproduces the original's generated ids exactly (at temperature 0, and at
temperature > 0 given the same random stream).

Per time point, with `S` the generated length of a row:

- start: `<mask>` at every open slot (a position of the reference target cell, or any position below `S`);
  positions `>= S` are never attended to as keys and never re-masked (an open slot there is filled once, at the
  first step);
- step `i` of `I` (`r = linspace(0, 1, I)[i]`, `gamma = clamp(schedule(r), 1e-6, 1)` in float32): with `u` the number of
  positions that held `<mask>` at the previous step (all `S` at the first), re-mask the `trunc(u * gamma)` positions
  of highest score (so the count shrinks multiplicatively); forward; ban, at every position of a row, every id the
  row keeps (re-masked positions count as `<pad>`); keep the `ceil((1 - threshold) * vocab)` largest logits; sample
  `argmax(logits / max(T * (I - 1 - i) / I, 1e-10) + Gumbel)` with one uniform per (row, position, vocabulary id),
  drawn in time-point then step order; fill the masked positions; their new score is `1 - (p1 - p2)` of the banned,
  untempered softmax (every other position scores `-float32 max`);
- the result is the filled ids and the last forward, whose cell embedding pools that forward's *input* (positions
  still holding `<mask>` there are left out).

Context: with `reference_input_ids` (observed cells at every generated time point), each time point's memory is
the source and the reference cells of every *other* time point, in ascending time, each decoded on the memory so
far, as the original does. Without them, the cells generated for earlier time points take that role.
"""

import math

import torch

from .masking_perturbgen import mask_ratio


FLOAT32_MAX = torch.finfo(torch.float32).max


class OriginalGenerationMixin:
    """`_generate_original` for [`PerturbGenOriginalForConditionalGeneration`] (see the module docstring)."""

    def _generate_original(
        self,
        input_ids,
        attention_mask,
        times,
        lengths,
        reference_input_ids,
        num_iterations,
        temperature,
        schedule,
        library_size,
        generator,
        output_hidden_states,
        noise,
        sequence_editor=None,
        edit_values=(),
    ):
        config = self.config
        batch_size = input_ids.shape[0]
        source = self.encode(input_ids, attention_mask)
        source_mask = attention_mask.bool()
        condition = self.condition_on_source(input_ids)
        device = source.device
        if reference_input_ids is not None:
            if reference_input_ids.dim() != 3 or reference_input_ids.shape[:2] != (batch_size, len(times)):
                raise ValueError(
                    f"`reference_input_ids` must be (batch, {len(times)} time points, length); got shape "
                    f"{tuple(reference_input_ids.shape)}."
                )
            self._check_target_ids(reference_input_ids, "reference_input_ids")
            width = reference_input_ids.shape[2]
            limits = lengths.clamp(max=width)
        else:
            width = int(lengths.max())
            limits = lengths
        positions = torch.arange(width, device=device).expand(batch_size, width)
        generation_pad = positions >= limits[:, None]
        generated, sequences = [], []
        for index, time_value in enumerate(times):
            time_tensor = torch.full((batch_size,), time_value, dtype=source.dtype, device=device)
            if reference_input_ids is not None:
                others = [k for k in range(len(times)) if k != index]
                context = [(reference_input_ids[:, k], times[k]) for k in others]
                open_slots = (reference_input_ids[:, index] != config.pad_token_id) | ~generation_pad
            else:
                context = [(tokens, times[k]) for k, tokens in enumerate(sequences)]
                open_slots = ~generation_pad
            memory, memory_mask = self._original_memory(source, source_mask, context, condition)
            memory_key_values = self.decoder.project_memory(memory)
            tokens, last_input, hidden = self._original_maskgit(
                open_slots,
                generation_pad,
                time_tensor,
                memory_key_values,
                memory_mask,
                num_iterations,
                temperature,
                schedule,
                generator,
                noise,
                condition,
            )
            if time_value in edit_values:
                tokens = sequence_editor(tokens, time_value)
                last_input = tokens
                hidden = self._decode(tokens, time_tensor, memory_key_values, memory_mask, source_condition=condition)
            sequences.append(tokens)
            generated.append((tokens, hidden, last_input))
        return self._generate_output(generated, times, library_size, output_hidden_states, condition)

    def _original_memory(self, source, source_mask, context, source_condition=None):
        """The source, then each context cell decoded on the memory so far (`context_mode` "none": the source)."""
        memory, memory_mask = source, source_mask
        if self.config.context_mode == "none":
            return memory, memory_mask
        for tokens, time_value in sorted(context, key=lambda item: item[1]):
            mask = tokens != self.config.pad_token_id
            time_tensor = torch.full((tokens.shape[0],), time_value, dtype=source.dtype, device=source.device)
            states = self._decode(
                tokens, time_tensor, self.decoder.project_memory(memory), memory_mask, mask, source_condition
            )
            memory, memory_mask = torch.cat([memory, states], dim=1), torch.cat([memory_mask, mask], dim=1)
        return memory, memory_mask

    def _original_maskgit(
        self,
        open_slots,
        generation_pad,
        time_values,
        memory_key_values,
        memory_mask,
        num_iterations,
        temperature,
        schedule,
        generator,
        noise,
        source_condition=None,
    ):
        config = self.config
        batch_size, width = open_slots.shape
        vocab = config.decoder_vocab_size
        mask_id, pad_id = config.mask_token_id, config.pad_token_id
        tokens = torch.where(open_slots, mask_id, pad_id)
        scores = torch.zeros(batch_size, width, dtype=torch.float32, device=tokens.device)
        keep_top = math.ceil((1.0 - config.original_filter_threshold) * vocab)
        progress = torch.linspace(0.0, 1.0, num_iterations, dtype=torch.float32)
        rows = torch.arange(width, device=tokens.device)
        for step in range(num_iterations):
            gamma = mask_ratio(progress[step], schedule, config.mask_schedule_exponent, torch.float32).clamp(1e-6, 1.0)
            scores = scores.masked_fill(generation_pad, -FLOAT32_MAX)
            candidates = (scores != -FLOAT32_MAX).sum(dim=-1)
            count = (candidates.to(torch.float32) * gamma.to(scores.device)).long()
            order = scores.argsort(dim=-1, descending=True, stable=True)
            rank = torch.empty_like(order).scatter_(1, order, rows.expand(batch_size, width))
            remask = rank < count[:, None]
            tokens = tokens.masked_fill(remask, mask_id)
            keep = tokens.masked_fill(remask, pad_id)
            step_input = tokens
            hidden = self._decode(
                tokens, time_values, memory_key_values, memory_mask, ~generation_pad, source_condition
            )
            logits = self.lm_head(hidden).float()
            banned = torch.zeros(batch_size, vocab, dtype=torch.bool, device=tokens.device).scatter_(1, keep, True)
            logits = logits.masked_fill(banned[:, None, :], -FLOAT32_MAX)
            values, indices = logits.topk(keep_top, dim=-1)
            filtered = torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)
            step_temperature = temperature * (num_iterations - 1 - step) / num_iterations
            uniform = self._original_uniforms((batch_size, width, vocab), generator, noise, logits.device)
            gumbel = -torch.log((-torch.log(uniform.clamp(min=1e-20))).clamp(min=1e-20))
            proposal = (filtered / max(step_temperature, 1e-10) + gumbel).argmax(dim=-1)
            is_mask = tokens == mask_id
            tokens = torch.where(is_mask, proposal, tokens)
            top_two = logits.softmax(dim=-1).topk(2, dim=-1).values
            scores = torch.where(is_mask, 1.0 - (top_two[..., 0] - top_two[..., 1]), -FLOAT32_MAX)
        return tokens, step_input, hidden

    @staticmethod
    def _original_uniforms(shape, generator, noise, device):
        """One uniform per (row, position, id), from `generator` (the global stream when None), as the original.
        With `noise_index`, rows come from a draw for `num_noise_rows` rows (see `generate`).
        """
        index, num_rows = noise
        if index is None:
            return torch.rand(shape, generator=generator, device=device)
        draws = torch.rand((num_rows, *shape[1:]), generator=generator, device=device)
        return draws[index.to(device)]
