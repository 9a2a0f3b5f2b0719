"""
In silico perturbation of rank-value encoded cells: edits of a cell's token sequence (`<cls>` genes... `<eos>`).

- `mask`: the gene's token becomes `<mask>` (the model sees that something was there);
- `pad`: the gene's token becomes `<pad>`, which attention ignores;
- `delete`: the gene's token is removed and the later genes move up one rank;
- `overexpress`: the gene moves to the top rank (inserted there if the cell did not express it; the lowest-ranked
  gene drops out if the sequence is full).

Knockout-like modes leave a cell that does not express the gene unchanged; callers count such cells.
"""

import numpy as np


PAD_ID, MASK_ID, CLS_ID, EOS_ID = 0, 1, 2, 3
MODES = ("mask", "pad", "delete", "overexpress")


def perturb_tokens(tokens: np.ndarray, gene_ids, mode: str, max_length: int | None = None) -> tuple[np.ndarray, bool]:
    """
    Apply one perturbation to one cell.

    Args:
        tokens (`np.ndarray` of shape `(length,)`): the cell's tokens, `<cls>` first and `<eos>` last, no padding.
        gene_ids (`Sequence[int]`): token ids of the perturbed genes (all perturbed together).
        mode (`str`): one of `mask`, `pad`, `delete`, `overexpress`.
        max_length (`int`, *optional*): longest sequence allowed (for `overexpress`); defaults to the input's length
            plus the number of inserted genes.

    Returns:
        `(new_tokens, changed)`: the edited sequence and whether anything changed.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown perturbation mode {mode!r}; choose one of {list(MODES)}.")
    tokens = np.asarray(tokens)
    genes = np.asarray(list(gene_ids), dtype=tokens.dtype)
    present = np.isin(tokens, genes)
    present[[0, -1]] = False  # never <cls> or <eos>
    if mode == "overexpress":
        body = tokens[1:-1][~np.isin(tokens[1:-1], genes)]
        limit = (max_length if max_length is not None else len(tokens) + len(genes)) - 2
        new = np.concatenate([[tokens[0]], np.concatenate([genes, body])[:limit], [tokens[-1]]]).astype(tokens.dtype)
        return new, not np.array_equal(new, tokens)
    if not present.any():
        return tokens.copy(), False
    if mode == "delete":
        return tokens[~present], True
    replacement = MASK_ID if mode == "mask" else PAD_ID
    return np.where(present, replacement, tokens).astype(tokens.dtype), True
