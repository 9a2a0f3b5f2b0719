"""
The ranking kernel of the rank-value encoding, on whole chunks of cells (numpy and scipy only): a cell's counts
`x_g` become `x_g / total_counts * 10_000 / median_g`; its non-zero genes sorted by that value (descending; ties by
ascending token id) are its tokens. The tokenizer (`tokenization_perturbgen.py`) maps genes to columns and wraps
the result in `<cls>` ... `<eos>`.
"""

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


NORMALIZED_TOTAL = 10_000.0


@dataclass
class RankedCells:
    """Ragged token lists of many cells: the tokens of cell `i` are `tokens[offsets[i]:offsets[i + 1]]`."""

    offsets: np.ndarray
    tokens: np.ndarray

    def __len__(self):
        return len(self.offsets) - 1

    def cell(self, index: int) -> np.ndarray:
        """The tokens of cell `index`."""
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    def lengths(self) -> np.ndarray:
        """The number of tokens of every cell."""
        return np.diff(self.offsets)


def check_raw_counts(data: np.ndarray, where: str = "the input") -> None:
    """Raise a `ValueError` unless `data` holds finite, non-negative integers (raw counts)."""
    if data.size == 0:
        return
    if data.dtype.kind in "iub":
        if data.dtype.kind == "i" and data.min() < 0:
            raise ValueError(f"{where} contains negative values (minimum {data.min()}); raw counts are required.")
        return
    # Three passes when the data are fine (NaN fails `lowest >= 0`; infinity passes `floor`): the tokenizer checks
    # every chunk, and the fuller diagnosis below runs only on failure.
    lowest, highest = data.min(), data.max()
    if lowest >= 0 and np.isfinite(highest) and np.array_equal(data, np.floor(data)):
        return
    if np.isnan(data).any() or np.isinf(data).any():
        raise ValueError(f"{where} contains NaN or infinite values; raw counts are required.")
    if lowest < 0:
        raise ValueError(f"{where} contains negative values (minimum {lowest}); raw counts are required.")
    fractional = data != np.floor(data)
    raise ValueError(
        f"{where} contains non-integer values (e.g. {data[fractional][0]}); raw counts are required, not "
        "normalised data."
    )


@dataclass
class ColumnPlan:
    """
    How the columns of an input matrix become tokens.

    `token_of_column` and `median_of_column` describe the columns of the matrix being ranked: the input's own
    columns (-1 = not used), or, when several input columns name one gene, the columns of `block @ merge`, which
    sums them. `library_columns` marks the input columns that count towards a cell's library size.
    """

    token_of_column: np.ndarray
    median_of_column: np.ndarray
    merge: sp.csr_matrix | None
    library_columns: np.ndarray | None
    token_bits: int
    all_columns_used: bool


def build_column_plan(column_tokens: np.ndarray, medians: dict, library_columns=None) -> ColumnPlan:
    """
    Args:
        column_tokens (`np.ndarray` of shape `(num_columns,)`): token id of each input column, -1 if unused.
        medians (`dict`): median of each used token id.
        library_columns (`np.ndarray` of bool, *optional*): columns summed for the library size (all if None).
    """
    column_tokens = np.asarray(column_tokens, dtype=np.int64)
    used = np.flatnonzero(column_tokens >= 0)
    unique_tokens, merged_index = np.unique(column_tokens[used], return_inverse=True)
    token_bits = max(1, int(column_tokens.max(initial=1)).bit_length())
    if len(unique_tokens) == len(used):
        median_of_column = np.ones(len(column_tokens))
        median_of_column[used] = [medians[t] for t in column_tokens[used]]
        all_used = len(used) == len(column_tokens)
        return ColumnPlan(column_tokens, median_of_column, None, library_columns, token_bits, all_used)
    merge = sp.csr_matrix((np.ones(len(used)), (used, merged_index)), shape=(len(column_tokens), len(unique_tokens)))
    median_of_column = np.array([medians[t] for t in unique_tokens], dtype=np.float64)
    return ColumnPlan(unique_tokens, median_of_column, merge, library_columns, token_bits, True)


def library_sizes(block: sp.csr_matrix, plan: ColumnPlan) -> np.ndarray:
    """Library size of each cell of a block: the sum of its counts over `plan.library_columns` (all if None)."""
    data = block.data.astype(np.float64, copy=False)
    if plan.library_columns is not None:
        data = data * plan.library_columns[block.indices]
    counts_per_row = np.diff(block.indptr)
    if data.size == 0:
        return np.zeros(block.shape[0])
    # reduceat gives the first element for an empty row: those rows are zero.
    sums = np.add.reduceat(data, np.minimum(block.indptr[:-1], data.size - 1))
    return np.where(counts_per_row > 0, sums, 0.0)


def rank_chunk(
    block: sp.csr_matrix, plan: ColumnPlan, totals: np.ndarray, max_tokens: int, wrap: tuple | None = None
) -> RankedCells:
    """
    Rank the genes of a block of cells: `x / total * 10,000 / median` descending, ties by ascending token id.

    Args:
        block (`scipy.sparse.csr_matrix` of shape `(num_cells, num_input_columns)`): raw counts.
        plan ([`ColumnPlan`]): token id and median of each column.
        totals (`np.ndarray` of shape `(num_cells,)`): library size of each cell.
        max_tokens (`int`): keep at most this many genes per cell.
        wrap (`tuple[int, int]`, *optional*): token ids put before and after each cell's genes (`<cls>`, `<eos>`).

    Returns:
        [`RankedCells`] with int32 tokens.
    """
    if plan.merge is not None:
        block = sp.csr_matrix(block @ plan.merge)
    num_cells = block.shape[0]
    data, per_row = block.data, np.diff(block.indptr)
    # Gathering with int32 indices takes a slow path in numpy (about 3x): convert once, gather twice.
    indices = block.indices.astype(np.intp)
    tokens = plan.token_of_column.take(indices)
    # The filter costs several passes; most inputs need none (every column a gene, no stored zeros).
    if not (plan.all_columns_used and (data.size == 0 or data.min() > 0)):
        keep = (tokens >= 0) & (data > 0)
        rows = np.repeat(np.arange(num_cells), per_row)[keep]
        tokens, data, indices = tokens[keep], data[keep], indices[keep]
        per_row = np.bincount(rows, minlength=num_cells)
    # x / total * 10,000 / median, in that order (as Geneformer), in place to spare fresh temporaries.
    values = np.repeat(np.where(totals > 0, totals, 1.0), per_row)
    np.divide(data, values, out=values)
    values *= NORMALIZED_TOTAL
    values /= plan.median_of_column.take(indices)
    return _sort_rows(values, tokens, per_row, plan.token_bits, max_tokens, wrap)


def _sort_rows(values, tokens, per_row, token_bits, max_tokens, wrap=None) -> RankedCells:
    """
    Sort each row by value descending, then token ascending. A positive float64's bit pattern orders like its value,
    so one int64 key per entry, its inverted bits with the low `token_bits` bits replaced by the token, orders as
    wanted; each row's keys are sorted in place. Rows where two keys share their high bits (values equal to about
    1e-11 relative) are re-sorted exactly with `lexsort`. Measured and dropped: a padded (cells x genes) grid sorted
    row by row (filling and reading it back cost more than the sort) and one flat sort with the row in the high
    bits (longer sorts cost more per entry, and the row bits cost two passes).
    """
    num_cells = len(per_row)
    starts = np.zeros(num_cells + 1, dtype=np.int64)
    np.cumsum(per_row, out=starts[1:])
    token_mask = (1 << token_bits) - 1
    keys = np.invert(values.view(np.int64))
    keys &= ~token_mask
    keys |= tokens
    for lo, hi in zip(starts[:-1].tolist(), starts[1:].tolist()):
        keys[lo:hi].sort()
    high = keys >> token_bits
    near_ties = high[1:] == high[:-1]
    boundaries = starts[1:-1]
    near_ties[boundaries[(boundaries > 0) & (boundaries <= near_ties.size)] - 1] = False  # across two rows
    keys &= token_mask
    for row in np.unique(np.searchsorted(starts, np.flatnonzero(near_ties), side="right") - 1):
        segment = slice(starts[row], starts[row + 1])
        keys[segment] = tokens[segment][np.lexsort((tokens[segment], -values[segment]))]
    kept = np.minimum(per_row, max_tokens)
    extra = 0 if wrap is None else 2
    offsets = np.zeros(num_cells + 1, dtype=np.int64)
    np.cumsum(kept + extra, out=offsets[1:])
    if wrap is None and (kept == per_row).all():
        return RankedCells(offsets=offsets, tokens=keys.astype(np.int32))
    out = np.empty(offsets[-1], dtype=np.int32)
    genes = np.ones(offsets[-1], dtype=bool)
    if wrap is not None:
        out[offsets[:-1]], out[offsets[1:] - 1] = wrap
        genes[offsets[:-1]] = genes[offsets[1:] - 1] = False
    out[genes] = keys if (kept == per_row).all() else keys[_first_of_each_row(starts, kept)]
    return RankedCells(offsets=offsets, tokens=out)


def _first_of_each_row(starts: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Mask of the first `kept[i]` entries of each row `i` of a flat array with row starts `starts`."""
    per_row = np.diff(starts)
    return np.arange(starts[-1]) - np.repeat(starts[:-1], per_row) < np.repeat(kept, per_row)


def log_normalize(counts: np.ndarray) -> np.ndarray:
    """log1p of counts per `NORMALIZED_TOTAL` (10,000) of each row: the expression scale of every comparison."""
    totals = counts.sum(axis=1, keepdims=True)
    return np.log1p(counts / np.where(totals > 0, totals, 1.0) * NORMALIZED_TOTAL)


def pad_ranked(ranked: RankedCells, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ragged token lists into `(num_cells, width)` arrays of ids and attention mask."""
    lengths = np.minimum(ranked.lengths(), width)
    input_ids = np.full((len(ranked), width), pad_id, dtype=np.int64)
    mask = np.arange(width)[None, :] < lengths[:, None]
    starts = ranked.offsets[:-1]
    source = (starts[:, None] + np.arange(width)[None, :])[mask]
    input_ids[mask] = ranked.tokens[source]
    return input_ids, mask.astype(np.int64)


def concatenate_ranked(parts: list) -> RankedCells:
    """One [`RankedCells`] from consecutive parts."""
    if not parts:
        return RankedCells(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int32))
    lengths = np.concatenate([p.lengths() for p in parts])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return RankedCells(offsets, np.concatenate([p.tokens for p in parts]))
