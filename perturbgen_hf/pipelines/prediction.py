"""
The one way source cells become generated cells: batches of ranked source cells through `model.generate`, each
batch seeded from `(seed, batch start, sample)` so that a cell's prediction does not depend on what else is
generated with it. The perturbation pipeline's control run, `embed_genes` and `perturbgen-hf evaluate` all
generate this way, so that for the same cells, seed and batch size they predict the same cells.
"""

import numpy as np
import torch
from tqdm.auto import tqdm


def cell_batch_seed(seed: int, batch_start: int, sample: int) -> int:
    """Seed of the random draws of the cell batch starting at `batch_start` (one row per cell), for one sample."""
    return int(seed) * 1_000_003 + int(batch_start) * 131 + int(sample)


def target_capacity(config) -> int:
    """The most genes a generated cell holds: the target genes, or the decoder's positions after the conditions."""
    return min(config.num_target_genes, config.decoder_max_position_embeddings - len(config.condition_tokens))


def generation_lengths(cells, config, device=None) -> torch.Tensor:
    """
    Genes to generate per cell: as many as the source cell has (its tokens less `<cls>` and `<eos>`), at least 1 and
    at most [`target_capacity`].

    Args:
        cells (`Sequence[np.ndarray]`): ranked source cells (token ids with `<cls>` ... `<eos>`).
    """
    capacity = target_capacity(config)
    return torch.tensor([min(max(len(cell) - 2, 1), capacity) for cell in cells], device=device)


def pad_cells(cells, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` of shape `(len(cells), longest)`, padded with `<pad>` (0)."""
    width = max(len(cell) for cell in cells)
    input_ids = torch.zeros(len(cells), width, dtype=torch.long)
    for row, cell in enumerate(cells):
        input_ids[row, : len(cell)] = torch.as_tensor(cell, dtype=torch.long)
    return input_ids.to(device), (input_ids != 0).long().to(device)


def pad_targets(targets, rows, device=None) -> torch.Tensor:
    """
    Observed target cells of `rows` as `decoder_input_ids` of shape `(len(rows), num_time_points, longest)`, padded
    with `<pad>` (0), for a teacher-forced `readout`.

    Args:
        targets (`Sequence[Sequence[np.ndarray]]`): per time point, the decoder tokens of every cell.
        rows (`Sequence[int]`): the cells to take.
    """
    width = max(1, *(len(per_cell[r]) for per_cell in targets for r in rows))
    decoder_input_ids = torch.zeros(len(rows), len(targets), width, dtype=torch.long)
    for t, per_cell in enumerate(targets):
        for i, r in enumerate(rows):
            decoder_input_ids[i, t, : len(per_cell[r])] = torch.as_tensor(per_cell[r], dtype=torch.long)
    return decoder_input_ids.to(device)


@torch.inference_mode()
def generate_cells(
    model,
    cells,
    time_points=None,
    batch_size: int = 32,
    num_samples: int = 1,
    iterations: int = 16,
    temperature: float = 1.0,
    seed: int = 0,
    library_size=None,
    output_hidden_states: bool = False,
    progress: bool = False,
    desc: str = "generating",
):
    """
    Generate the future states of ranked source cells, one batch and sample at a time.

    Args:
        model: a PerturbGen model (duck-typed: `generate`, `config`, `device`).
        cells (`Sequence[np.ndarray]`): ranked source cells, e.g. from `tokenizer.rank_cells(...).cell(i)`.
        time_points (`list`, *optional*): names or values of the time points (default: the model's).
        batch_size (`int`): cells per model call; it is part of the seeding (batch `b` starts at cell `b * batch_size`).
        num_samples (`int`), iterations (`int`), temperature (`float`), seed (`int`): MaskGIT settings and seeding.
        library_size (`np.ndarray` of shape `(len(cells),)`, *optional*): observed library sizes, for a model that
            scales its predicted composition by one (`config.library_size_source == "observed"`).
        output_hidden_states (`bool`): also return the decoder's final hidden states.

    Yields:
        `(rows, sample, generator, output)`: the cell indices of the batch (`np.ndarray`), the sample number, the
        batch's generator (after generation: draws from it continue the batch's stream) and the
        [`PerturbGenGenerateOutput`].
    """
    config, device = model.config, model.device
    for start in tqdm(range(0, len(cells), batch_size), desc=desc, unit="batch", disable=not progress):
        rows = np.arange(start, min(start + batch_size, len(cells)))
        batch = [cells[r] for r in rows]
        input_ids, attention_mask = pad_cells(batch, device)
        extra = {}
        if config.library_size_source == "observed":
            if library_size is None:
                raise ValueError("This model scales its counts by an observed library size: pass library_size.")
            extra["library_size"] = torch.as_tensor(np.asarray(library_size)[rows], dtype=torch.float32, device=device)
        for sample in range(num_samples):
            generator = torch.Generator(device=device).manual_seed(cell_batch_seed(seed, start, sample))
            # Each cell takes row `i` of a draw made for `batch_size` rows: the same draws as in the perturbation
            # pipeline's control run, whatever the size of the last batch.
            out = model.generate(
                input_ids,
                attention_mask,
                time_points=time_points,
                sequence_length=generation_lengths(batch, config, device),
                num_iterations=iterations,
                temperature=temperature,
                generator=generator,
                output_hidden_states=output_hidden_states,
                noise_index=torch.arange(len(rows)),
                num_noise_rows=batch_size,
                **extra,
            )
            yield rows, sample, generator, out
