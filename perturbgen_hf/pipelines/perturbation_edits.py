"""
In silico perturbation of rank-value encoded cells: edits of a cell's token sequence.

- `mask`: the gene's token becomes `<mask>` (the model sees that something was there);
- `pad`: the gene's token becomes `<pad>`, which attention ignores;
- `delete`: the gene's token is removed and the later genes move up one rank;
- `overexpress`: the gene moves to the top rank (inserted there if the cell did not express it; the lowest-ranked
  gene drops out if the sequence is full).

A source cell is `<cls>` genes... `<eos>` in the encoder vocabulary ([`perturb_tokens`]); a target cell is its
condition tokens, then genes, in the decoder vocabulary ([`perturb_target_tokens`], which keeps the length: an
overexpressed gene pushes the lowest-ranked one out, as in the original). Knockout-like modes leave a cell that does
not express the gene unchanged; callers count such cells.
"""

import numpy as np
import torch


PAD_ID, MASK_ID, CLS_ID, EOS_ID = 0, 1, 2, 3
MODES = ("mask", "pad", "delete", "overexpress")


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"Unknown perturbation mode {mode!r}; choose one of {list(MODES)}.")


def edit_genes(genes: np.ndarray, gene_ids, mode: str, limit: int) -> tuple[np.ndarray, bool]:
    """
    Apply one perturbation to a ranked list of gene tokens (no special or condition tokens).

    Args:
        genes (`np.ndarray` of shape `(length,)`): gene tokens, highest rank first.
        gene_ids (`Sequence[int]`): token ids of the perturbed genes (all perturbed together).
        mode (`str`): one of `mask`, `pad`, `delete`, `overexpress`.
        limit (`int`): most genes the result may hold (for `overexpress`).

    Returns:
        `(new_genes, changed)`.
    """
    _check_mode(mode)
    genes = np.asarray(genes)
    perturbed = np.asarray(list(gene_ids), dtype=genes.dtype)
    present = np.isin(genes, perturbed)
    if mode == "overexpress":
        new = np.concatenate([perturbed, genes[~present]])[:limit].astype(genes.dtype)
        return new, not np.array_equal(new, genes)
    if not present.any():
        return genes.copy(), False
    if mode == "delete":
        return genes[~present], True
    replacement = MASK_ID if mode == "mask" else PAD_ID
    return np.where(present, replacement, genes).astype(genes.dtype), True


def perturb_tokens(tokens: np.ndarray, gene_ids, mode: str, max_length: int | None = None) -> tuple[np.ndarray, bool]:
    """
    Apply one perturbation to one source cell.

    Args:
        tokens (`np.ndarray` of shape `(length,)`): the cell's tokens, `<cls>` first and `<eos>` last, no padding.
        gene_ids (`Sequence[int]`): encoder token ids of the perturbed genes (all perturbed together).
        mode (`str`): one of `mask`, `pad`, `delete`, `overexpress`.
        max_length (`int`, *optional*): longest sequence allowed (for `overexpress`); defaults to the input's length
            plus the number of inserted genes.

    Returns:
        `(new_tokens, changed)`: the edited sequence and whether anything changed.
    """
    _check_mode(mode)
    tokens = np.asarray(tokens)
    limit = (max_length if max_length is not None else len(tokens) + len(list(gene_ids))) - 2
    body, changed = edit_genes(tokens[1:-1], gene_ids, mode, limit)
    return np.concatenate([tokens[:1], body, tokens[-1:]]).astype(tokens.dtype), changed


def perturb_target_tokens(tokens: np.ndarray, gene_ids, mode: str, num_conditions: int = 0) -> tuple[np.ndarray, bool]:
    """
    Apply one perturbation to one target cell, keeping its width.

    Args:
        tokens (`np.ndarray` of shape `(width,)`): condition tokens, genes by rank, then `<pad>` to the width.
        gene_ids (`Sequence[int]`): decoder ids of the perturbed genes.
        mode (`str`): one of `mask`, `pad`, `delete`, `overexpress`.
        num_conditions (`int`, *optional*, defaults to 0): leading condition tokens, left untouched.

    Returns:
        `(new_tokens, changed)`, `new_tokens` of the input's width (a deletion leaves `<pad>` at the end).
    """
    tokens = np.asarray(tokens)
    body = tokens[num_conditions:]
    # The cell's genes end at its last non-pad token (a `pad` edit may leave holes before it).
    filled = np.flatnonzero(body != PAD_ID)
    length = int(filled[-1]) + 1 if len(filled) else 0
    genes, changed = edit_genes(
        body[:length], gene_ids, mode, limit=max(length, 1) if mode == "overexpress" else length
    )
    # Only an overexpression into an empty cell grows it.
    new = np.full(max(len(tokens), num_conditions + len(genes)), PAD_ID, dtype=tokens.dtype)
    new[:num_conditions] = tokens[:num_conditions]
    new[num_conditions : num_conditions + len(genes)] = genes
    return new, changed


def edit_target_batch(
    tokens: torch.Tensor, gene_ids_per_row, mode: str, num_conditions: int = 0
) -> tuple[torch.Tensor, np.ndarray]:
    """
    [`perturb_target_tokens`] over a batch `(batch, width)`, each row with its own perturbed genes.

    Returns:
        `(new_tokens, changed)`: a tensor like `tokens` and a boolean array `(batch,)`.
    """
    rows = tokens.detach().cpu().numpy()
    edited = [perturb_target_tokens(row, genes, mode, num_conditions) for row, genes in zip(rows, gene_ids_per_row)]
    new = torch.as_tensor(np.stack([e[0] for e in edited]), dtype=tokens.dtype, device=tokens.device)
    return new, np.array([e[1] for e in edited], dtype=bool)


def original_perturb_sequence(ids, gene_ids, mode: str, site: str = "src") -> torch.Tensor:
    """
    The original PerturbGen's edit of a padded batch (its `perturb_sequence`), reproduced exactly for converted
    models and for comparison; this package's own edits differ where the original loses information (a full source
    row loses its `<eos>` when a gene is overexpressed).

    - `mask` / `pad`: every occurrence becomes `<mask>` / `<pad>` in place (length and positions unchanged);
    - `delete`: each row keeps its tokens that are neither perturbed nor `<pad>`, in order, left-aligned and padded
      back to the same width;
    - `overexpress`: `delete`, drop the last `len(gene_ids)` columns, then insert the genes after column 0 (source:
      `[<cls>, genes, rest]`) or at column 0 (target: `[genes, rest]`).

    Args:
        ids (`torch.LongTensor` of shape `(batch, width)`): source ids (encoder vocabulary) or target row ids.
        gene_ids (`Sequence[int]`): the perturbed genes' ids in that vocabulary.
        mode (`str`): one of `MODES`. site (`str`): `"src"` or `"tgt"`.

    Returns:
        `torch.LongTensor` of shape `(batch, width)`.
    """
    _check_mode(mode)
    if site not in ("src", "tgt"):
        raise ValueError(f"Unknown site {site!r}; choose 'src' or 'tgt'.")
    ids = torch.as_tensor(ids, dtype=torch.long)
    genes = torch.as_tensor(list(gene_ids), dtype=torch.long)
    present = torch.isin(ids, genes)
    if mode in ("mask", "pad"):
        return ids.masked_fill(present, MASK_ID if mode == "mask" else PAD_ID)
    width = ids.shape[1]
    kept = ~present & (ids != PAD_ID)
    rows = [row[keep] for row, keep in zip(ids, kept)]
    deleted = torch.stack([torch.cat([r, r.new_zeros(width - len(r))]) for r in rows])
    if mode == "delete":
        return deleted
    rest = deleted[:, : width - len(genes)]
    inserted = genes.expand(ids.shape[0], -1)
    if site == "src":
        return torch.cat([rest[:, :1], inserted, rest[:, 1:]], dim=1)
    return torch.cat([inserted, rest], dim=1)


def expression_profile(cells, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """
    How often and how highly each gene is expressed in a set of ranked source cells.

    Args:
        cells (`Sequence[np.ndarray]`): encoder token sequences (special tokens are ignored).
        vocab_size (`int`): encoder vocabulary size.

    Returns:
        `(cells_expressing, mean_rank)`, each `np.ndarray` of shape `(vocab_size,)`; the rank is 1 for a cell's top
        gene, and NaN for a gene no cell expresses.
    """
    tokens = [np.asarray(c) for c in cells]
    ranks = [np.arange(len(c)) for c in tokens]  # position 0 is <cls>, so a gene's position is its rank
    flat, flat_rank = np.concatenate(tokens), np.concatenate(ranks)
    genes = flat > EOS_ID
    flat, flat_rank = flat[genes], flat_rank[genes]
    expressing = np.bincount(flat, minlength=vocab_size).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_rank = np.bincount(flat, weights=flat_rank, minlength=vocab_size) / expressing
    return expressing, np.where(expressing > 0, mean_rank, np.nan)


def matched_null_genes(
    gene_ids, profile, num_null: int, rng: np.random.Generator, allowed=None, pool_size: int = 50
) -> list[list[int]]:
    """
    Sham perturbations matched to a perturbation: for each of `num_null` shams, each perturbed gene is replaced by a
    gene that the same cells express about as often and at about the same rank (drawn at random among the
    `pool_size` nearest in log cells-expressing and log mean rank, other perturbed genes excluded).

    Args:
        gene_ids (`Sequence[int]`): the perturbation's token ids.
        profile (`tuple`): [`expression_profile`] of the source cells.
        num_null (`int`): shams to draw.
        rng (`np.random.Generator`): the draw.
        allowed (`np.ndarray` of bool, *optional*): tokens a sham may use (e.g. the model's target genes).

    Returns:
        `list` of `num_null` token-id lists, each as long as `gene_ids`.
    """
    expressing, mean_rank = profile
    candidates = expressing > 0
    candidates[: EOS_ID + 1] = False
    if allowed is not None:
        candidates &= allowed
    candidates[list(gene_ids)] = False
    pool_ids = np.flatnonzero(candidates)
    if len(pool_ids) == 0:
        raise ValueError("No gene is available for sham perturbations (the cells express no other gene).")
    shams = np.empty((num_null, len(gene_ids)), dtype=np.int64)
    for column, gene in enumerate(gene_ids):
        # A gene no cell expresses (an overexpression) is matched to the least often expressed genes.
        reference_count = max(expressing[gene], 1.0)
        reference_rank = mean_rank[gene] if expressing[gene] > 0 else np.nanmax(mean_rank[pool_ids])
        distance = np.abs(np.log(expressing[pool_ids] / reference_count)) + np.abs(
            np.log(mean_rank[pool_ids] / reference_rank)
        )
        nearest = pool_ids[np.argsort(distance, kind="stable")[: max(pool_size, num_null)]]
        shams[:, column] = rng.choice(nearest, size=num_null, replace=len(nearest) < num_null)
    return [list(map(int, row)) for row in shams]
