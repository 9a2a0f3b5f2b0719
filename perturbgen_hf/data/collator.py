"""Batches of tokenized pairs for `Trainer`: padding, MaskGIT training masks, context and counts."""

from dataclasses import dataclass, field

import numpy as np
import torch

from ..modeling.masking_perturbgen import sample_training_mask


PAD_TOKEN_ID = 0
MASK_TOKEN_ID = 1


def _pad(sequences, value=PAD_TOKEN_ID, width=None) -> torch.Tensor:
    width = width if width is not None else max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), max(width, 1)), value, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            out[row, : len(sequence)] = torch.as_tensor(sequence[:width], dtype=torch.long)
    return out


@dataclass
class DataCollatorForPerturbGen:
    """
    Collate rows of a `perturbgen-hf tokenize` dataset into model inputs.

    For each example one target time point is chosen at random (or, with `target_index`, a fixed one); its tokens,
    with the condition tokens in front, are MaskGIT-masked (`decoder_input_ids`, `labels`); the other time points
    become the context (`"previous"`: only earlier ones; `"all"`: every other one; absent slots are all padding);
    its counts over the target genes are stacked densely (`target_counts`, `library_size`).

    Args:
        time_values (`list[float]`): time value of each target time point, in the dataset's order.
        num_target_genes (`int`): width of `target_counts`.
        context_mode (`str`, *optional*, defaults to `"previous"`): `"previous"`, `"all"` or `"none"`.
        mask_schedule (`str`), mask_schedule_exponent (`float`): the model's MaskGIT schedule.
        target_index (`int`, *optional*): always use this target time point.
        max_target_length (`int`, *optional*): truncate target gene sequences (keeps the top-ranked genes).
        seed (`int`, *optional*, defaults to 0): seed of the time-point choice and the masks.
    """

    time_values: list
    num_target_genes: int
    context_mode: str = "previous"
    mask_schedule: str = "cosine"
    mask_schedule_exponent: float = 2.0
    target_index: int | None = None
    max_target_length: int | None = None
    seed: int = 0
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self):
        if self.context_mode not in ("previous", "all", "none"):
            raise ValueError(f"Unknown context_mode {self.context_mode!r}.")
        self.generator = torch.Generator().manual_seed(self.seed)

    @classmethod
    def for_model(cls, config, **kwargs) -> "DataCollatorForPerturbGen":
        """A collator that agrees with a model config (time values, genes, context and schedule)."""
        return cls(
            time_values=list(config.time_values), num_target_genes=config.num_target_genes,
            context_mode=config.context_mode, mask_schedule=config.mask_schedule,
            mask_schedule_exponent=config.mask_schedule_exponent, **kwargs,
        )  # fmt: skip

    def _genes(self, example, index):
        genes = example["target_input_ids"][index]
        return genes[: self.max_target_length] if self.max_target_length else genes

    def __call__(self, examples: list[dict]) -> dict:
        num_times = len(self.time_values)
        if self.target_index is not None:
            chosen = [self.target_index] * len(examples)
        else:
            chosen = torch.randint(num_times, (len(examples),), generator=self.generator).tolist()
        targets, num_conditions = [], []
        for example, k in zip(examples, chosen):
            conditions = list(example["target_condition_ids"][k])
            targets.append(conditions + list(self._genes(example, k)))
            num_conditions.append(len(conditions))
        full = _pad(targets)
        positions = torch.arange(full.shape[1])[None, :]
        maskable = (full != PAD_TOKEN_ID) & (positions >= torch.tensor(num_conditions)[:, None])
        masked = sample_training_mask(maskable, self.mask_schedule, self.mask_schedule_exponent, self.generator)
        batch = {
            "input_ids": _pad([e["source_input_ids"] for e in examples]),
            "decoder_input_ids": full.masked_fill(masked, MASK_TOKEN_ID),
            "decoder_time_values": torch.tensor([self.time_values[k] for k in chosen], dtype=torch.float32),
            "labels": full.masked_fill(~masked, -100),
        }
        batch["attention_mask"] = (batch["input_ids"] != PAD_TOKEN_ID).long()
        batch.update(self._context(examples, chosen))
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
                use = self.context_mode == "all" or j < k
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
            counts[row, example["target_counts_indices"][k]] = example["target_counts_values"][k]
            library[row] = example["target_library_size"][k]
        return {"target_counts": torch.from_numpy(counts), "library_size": torch.from_numpy(library)}
