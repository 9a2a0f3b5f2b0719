"""Batches of tokenized pairs for `Trainer`: padding, MaskGIT training masks, context and counts."""

from dataclasses import dataclass, field

import numpy as np
import torch

from ..modeling.masking_perturbgen import sample_training_mask, training_mask_from_uniforms


PAD_TOKEN_ID = 0
MASK_TOKEN_ID = 1
EOS_TOKEN_ID = 3


def _pad(sequences, value=PAD_TOKEN_ID) -> torch.Tensor:
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), max(width, 1)), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            out[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return out


@dataclass
class DataCollatorForPerturbGen:
    """
    Collate rows of a `perturbgen-hf tokenize` dataset into model inputs.

    For each example a target time point is chosen at random among the usable ones (or every one, or a fixed one);
    its tokens, with the condition tokens in front, are MaskGIT-masked (`decoder_input_ids`, `labels`); the other
    usable time points become the context (`"previous"`: only earlier ones; `"all"`: every other one; absent slots
    are all padding); its counts over the target genes are stacked densely (`target_counts`, `library_size`).

    Randomness: when examples carry an `example_id`, each example's time point and mask come from its own generator,
    seeded by `(seed, epoch, example_id)`. The draws then depend neither on batch composition nor on how far a data
    loader has prefetched, so a run resumed from a checkpoint draws exactly what an uninterrupted one draws (set
    `epoch` at each epoch, as [`perturbgen_hf.training`] does). Otherwise the collator's seeded generator, or the
    global torch RNG, is used.

    Args:
        time_values (`list[float]`): time value of each used target time point.
        num_target_genes (`int`): width of `target_counts`.
        time_indices (`list[int]`, *optional*): the dataset's time-point columns that `time_values` describe (default:
            the first `len(time_values)`); leaving one out holds that time point out of training.
        context_mode (`str`, *optional*, defaults to `"previous"`): `"previous"`, `"all"`, `"chained"` (as `"all"`;
            the model chains them) or `"none"`.
        mask_schedule (`str`), mask_schedule_exponent (`float`): the model's MaskGIT schedule.
        target_time_points (`str`, *optional*, defaults to `"random"`): `"random"` (one per example) or `"all"` (each
            example becomes one row per time point).
        target_index (`int`, *optional*): always predict this position of `time_indices`.
        mask (`bool`, *optional*, defaults to `True`): mask targets (token training); without, the complete target goes
            to the model with no `labels` (count-head training, teacher-forced evaluation).
        include_counts (`bool`, *optional*, defaults to `True`): add `target_counts` and `library_size`.
        max_source_length (`int`, *optional*): keep the top-ranked source genes (then `<eos>`).
        max_target_length (`int`, *optional*): keep the top-ranked target genes.
        seed (`int`, *optional*): seed of per-example draws, and of a private generator for examples without
            `example_id` (the global RNG otherwise).
        epoch (`int`, *optional*, defaults to 0): mixed into per-example seeds, so each epoch masks differently.
    """

    time_values: list
    num_target_genes: int
    time_indices: list | None = None
    context_mode: str = "previous"
    mask_schedule: str = "cosine"
    mask_schedule_exponent: float = 2.0
    target_time_points: str = "random"
    target_index: int | None = None
    mask: bool = True
    include_counts: bool = True
    max_source_length: int | None = None
    max_target_length: int | None = None
    seed: int | None = None
    epoch: int = 0
    generator: torch.Generator | None = field(init=False, repr=False, default=None)

    def __post_init__(self):
        if self.context_mode not in ("previous", "all", "chained", "none"):
            raise ValueError(
                f"Unknown context_mode {self.context_mode!r}; use 'previous', 'all', 'chained' or 'none'."
            )
        if self.target_time_points not in ("random", "all"):
            raise ValueError(f"Unknown target_time_points {self.target_time_points!r}; use 'random' or 'all'.")
        if self.time_indices is None:
            self.time_indices = list(range(len(self.time_values)))
        if len(self.time_indices) != len(self.time_values):
            raise ValueError(f"{len(self.time_indices)} time indices for {len(self.time_values)} time values.")
        if self.seed is not None:
            self.generator = torch.Generator().manual_seed(self.seed)

    @classmethod
    def for_model(cls, config, **kwargs) -> "DataCollatorForPerturbGen":
        """A collator that agrees with a model config (time values, genes, context and schedule)."""
        kwargs.setdefault("time_values", list(config.time_values))
        return cls(
            num_target_genes=config.num_target_genes,
            context_mode=config.context_mode,
            mask_schedule=config.mask_schedule,
            mask_schedule_exponent=config.mask_schedule_exponent,
            **kwargs,
        )

    def _genes(self, example, position):
        genes = example["target_input_ids"][self.time_indices[position]]
        return genes[: self.max_target_length] if self.max_target_length else genes

    def _source(self, example):
        source = example["source_input_ids"]
        if self.max_source_length and len(source) > self.max_source_length:
            source = [*source[: self.max_source_length - 1], EOS_TOKEN_ID]
        return source

    def _example_generators(self, examples):
        if not examples or "example_id" not in examples[0]:
            return None
        seed = 0 if self.seed is None else self.seed
        return [
            torch.Generator().manual_seed(
                int(np.random.SeedSequence([seed, self.epoch, int(e["example_id"])]).generate_state(1)[0])
            )
            for e in examples
        ]

    def _choose(self, examples, generators):
        num_times = len(self.time_values)
        if self.target_index is not None:
            return examples, [self.target_index] * len(examples), generators
        if self.target_time_points == "all":
            expanded = [e for e in examples for _ in range(num_times)]
            generators = None if generators is None else [g for g in generators for _ in range(num_times)]
            return expanded, list(range(num_times)) * len(examples), generators
        if generators is not None:
            chosen = [int(torch.randint(num_times, (1,), generator=g)) for g in generators]
        else:
            chosen = torch.randint(num_times, (len(examples),), generator=self.generator).tolist()
        return examples, chosen, generators

    def _mask(self, maskable, generators):
        if generators is None:
            return sample_training_mask(maskable, self.mask_schedule, self.mask_schedule_exponent, self.generator)
        width = maskable.shape[1]
        draws = torch.stack([torch.rand(width + 1, generator=g) for g in generators])
        return training_mask_from_uniforms(
            maskable, draws[:, 0], draws[:, 1:], self.mask_schedule, self.mask_schedule_exponent
        )

    def __call__(self, examples: list[dict]) -> dict:
        """Collate `examples` into a batch of padded tensors (see the class docstring)."""
        examples, chosen, generators = self._choose(examples, self._example_generators(examples))
        targets, num_conditions = [], []
        for example, k in zip(examples, chosen):
            conditions = list(example["target_condition_ids"][self.time_indices[k]])
            targets.append(conditions + list(self._genes(example, k)))
            num_conditions.append(len(conditions))
        full = _pad(targets)
        batch = {
            "input_ids": _pad([self._source(e) for e in examples]),
            "decoder_time_values": torch.tensor([self.time_values[k] for k in chosen], dtype=torch.float32),
        }
        batch["attention_mask"] = (batch["input_ids"] != PAD_TOKEN_ID).long()
        if self.mask:
            positions = torch.arange(full.shape[1])[None, :]
            maskable = (full != PAD_TOKEN_ID) & (positions >= torch.tensor(num_conditions)[:, None])
            masked = self._mask(maskable, generators)
            batch["decoder_input_ids"] = full.masked_fill(masked, MASK_TOKEN_ID)
            batch["labels"] = full.masked_fill(~masked, -100)
        else:
            batch["decoder_input_ids"] = full
        batch.update(self._context(examples, chosen))
        if self.include_counts:
            batch.update(self._counts(examples, chosen))
        return batch

    def _context(self, examples, chosen):
        num_times = len(self.time_values)
        if self.context_mode == "none" or num_times == 1:
            return {}
        sequences, times = [], []
        for example, k in zip(examples, chosen):
            slots = [j for j in range(num_times) if j != k]
            for j in slots:
                use = self.context_mode in ("all", "chained") or self.time_values[j] < self.time_values[k]
                sequences.append(list(self._genes(example, j)) if use else [])
            times.append([self.time_values[j] for j in slots])
        ids = _pad(sequences).view(len(examples), num_times - 1, -1)
        return {
            "context_input_ids": ids,
            "context_attention_mask": (ids != PAD_TOKEN_ID).long(),
            "context_time_values": torch.tensor(times, dtype=torch.float32),
        }

    def _counts(self, examples, chosen):
        counts = np.zeros((len(examples), self.num_target_genes), dtype=np.float32)
        library = np.zeros(len(examples), dtype=np.float32)
        for row, (example, k) in enumerate(zip(examples, chosen)):
            column = self.time_indices[k]
            counts[row, example["target_counts_indices"][column]] = example["target_counts_values"][column]
            library[row] = example["target_library_size"][column]
        return {"target_counts": torch.from_numpy(counts), "library_size": torch.from_numpy(library)}
