"""
Rank-value tokenizer for single-cell expression (Geneformer's encoding), as a transformers `PreTrainedTokenizer`.

A cell's counts `x_g` become `x_g / total_counts * 10_000 / median_g` over the vocabulary's genes; the non-zero genes
sorted by that value (descending; ties by ascending token id, so the result is deterministic) are the cell's tokens,
truncated to `model_max_length` inside `<cls>` ... `<eos>`. Whole chunks of cells are ranked with one `lexsort`,
never one cell at a time.
"""

import difflib
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding

from .safe_pickle import load_dictionary_pickle


logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<eos>")
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
NORMALIZED_TOTAL = 10_000.0
TOTAL_COUNTS_MODES = ("all", "vocabulary")
# Largest padded (cells x genes) array sorted at once in `rank_chunk` (8M float64 = 64 MiB).
_SORT_BLOCK_ELEMENTS = 8_000_000
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*G\d+)\.\d+$", re.IGNORECASE)


@dataclass
class RankedCells:
    """Ragged token lists of many cells: the tokens of cell `i` are `tokens[offsets[i]:offsets[i + 1]]`."""

    offsets: np.ndarray
    tokens: np.ndarray

    def __len__(self):
        return len(self.offsets) - 1

    def cell(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def check_raw_counts(data: np.ndarray, where: str = "the input") -> None:
    """Raise a `ValueError` unless `data` holds finite, non-negative integers (raw counts)."""
    if data.size == 0:
        return
    if not np.isfinite(data).all():
        raise ValueError(f"{where} contains NaN or infinite values; raw counts are required.")
    if (data < 0).any():
        raise ValueError(f"{where} contains negative values (minimum {data.min()}); raw counts are required.")
    if np.issubdtype(data.dtype, np.floating) and not np.array_equal(data, np.round(data)):
        example = data[data != np.round(data)][0]
        raise ValueError(
            f"{where} contains non-integer values (e.g. {example}); raw counts are required, not normalised data."
        )


def rank_chunk(
    matrix: sp.csr_matrix, medians: np.ndarray, token_ids: np.ndarray, totals: np.ndarray, max_tokens: int
) -> RankedCells:
    """
    Rank the genes of a chunk of cells.

    Args:
        matrix (`scipy.sparse.csr_matrix` of shape `(num_cells, num_columns)`): counts, one column per vocabulary
            gene (duplicates already summed).
        medians (`np.ndarray` of shape `(num_columns,)`): normalisation median of each column's gene.
        token_ids (`np.ndarray` of shape `(num_columns,)`): token id of each column.
        totals (`np.ndarray` of shape `(num_cells,)`): library size of each cell.
        max_tokens (`int`): keep at most this many genes per cell.

    Returns:
        [`RankedCells`] with int32 tokens.
    """
    matrix = matrix.tocsr()
    matrix.eliminate_zeros()
    matrix.sort_indices()  # columns ascending = token ids ascending: a stable sort then breaks ties by token id
    counts_per_row = np.diff(matrix.indptr)
    rows = np.repeat(np.arange(matrix.shape[0]), counts_per_row)
    safe_totals = np.where(totals > 0, totals, 1.0)
    values = matrix.data / safe_totals[rows] * NORMALIZED_TOTAL / medians[matrix.indices]
    entry_tokens = token_ids[matrix.indices]
    kept_per_row = np.minimum(counts_per_row, max_tokens)
    offsets = np.zeros(matrix.shape[0] + 1, dtype=np.int64)
    np.cumsum(kept_per_row, out=offsets[1:])
    tokens = np.empty(offsets[-1], dtype=np.int32)
    # Rows are sorted side by side in a padded 2-D array (one C-level sort per row, no Python loop); blocks of rows
    # bound the array's size.
    width = int(counts_per_row.max(initial=0))
    block = max(1, _SORT_BLOCK_ELEMENTS // max(width, 1))
    for first in range(0, matrix.shape[0], block):
        last = min(first + block, matrix.shape[0])
        lo, hi = matrix.indptr[first], matrix.indptr[last]
        filled = np.arange(width)[None, :] < counts_per_row[first:last, None]
        keys = np.full((last - first, width), np.inf)
        keys[filled] = -values[lo:hi]
        block_tokens = np.zeros((last - first, width), dtype=np.int32)
        block_tokens[filled] = entry_tokens[lo:hi]
        order = np.argsort(keys, axis=1, kind="stable")
        ranked = np.take_along_axis(block_tokens, order, axis=1)
        keep = np.arange(width)[None, :] < kept_per_row[first:last, None]
        tokens[offsets[first] : offsets[last]] = ranked[keep]
    return RankedCells(offsets=offsets, tokens=tokens)


class PerturbGenTokenizer(PreTrainedTokenizer):
    r"""
    Rank-value tokenizer of cells (Geneformer's encoding) with a gene vocabulary, per-gene medians, gene symbols and
    aliases, and the decoder's target-gene vocabulary.

    Args:
        vocab_file (`str`): JSON `{token: id}` with `<pad>` 0, `<mask>` 1, `<cls>` 2, `<eos>` 3, then Ensembl IDs.
        medians_file (`str`, *optional*): JSON `{ensembl_id: median}` (non-zero median of counts per 10,000).
        genes_file (`str`, *optional*): JSON `{"symbols": {ensembl_id: symbol}, "aliases": {ALIAS: ensembl_id}}`.
        target_file (`str`, *optional*): JSON `{"target_genes": [...], "condition_tokens": [...]}` (the decoder's
            vocabulary).
        total_counts (`str`, *optional*, defaults to `"all"`): library size of a cell = sum over all input genes
            (`"all"`) or over the input genes in the vocabulary (`"vocabulary"`, as the original PerturbGen did).

    Example:

    ```python
    >>> tokenizer = PerturbGenTokenizer.from_dictionaries(
    ...     "vocab/perturbgen_token_dict_gftokens_gc95M.pkl",
    ...     "vocab/perturbgen_gene_median_dict_gftokens_gc95M.pkl",
    ...     "vocab/perturbgen_ensembl_mapping_dict_gc95M.pkl",
    ... )  # doctest: +SKIP
    >>> batch = tokenizer(adata, gene_ids=adata.var["ensembl_id"], return_tensors="pt")  # doctest: +SKIP
    ```
    """

    vocab_files_names = {
        "vocab_file": "vocab.json",
        "medians_file": "gene_medians.json",
        "genes_file": "gene_names.json",
        "target_file": "target_vocab.json",
    }
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file,
        medians_file=None,
        genes_file=None,
        target_file=None,
        total_counts="all",
        pad_token="<pad>",
        mask_token="<mask>",
        cls_token="<cls>",
        eos_token="<eos>",
        sep_token="<eos>",
        **kwargs,
    ):
        # Loaded before super().__init__, which queries the vocabulary.
        self.vocab = _read_json(vocab_file)
        self._check_special_layout()
        self.ids_to_tokens = {index: token for token, index in self.vocab.items()}
        self.gene_medians = _read_json(medians_file) if medians_file else {}
        names = _read_json(genes_file) if genes_file else {}
        self.gene_symbols = names.get("symbols", {})
        self.gene_aliases = names.get("aliases", {})
        target = _read_json(target_file) if target_file else {}
        self.target_genes = list(target.get("target_genes", []))
        self.condition_tokens = list(target.get("condition_tokens", []))
        if total_counts not in TOTAL_COUNTS_MODES:
            raise ValueError(f"`total_counts` must be one of {list(TOTAL_COUNTS_MODES)}, got {total_counts!r}.")
        self.total_counts = total_counts
        self._lookup = None
        self._reported_missing = set()
        self._plans = {}
        kwargs.setdefault("model_max_length", 4096)
        super().__init__(
            pad_token=pad_token,
            mask_token=mask_token,
            cls_token=cls_token,
            eos_token=eos_token,
            sep_token=sep_token,
            total_counts=total_counts,
            **kwargs,
        )

    # -- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_vocabulary(
        cls,
        gene_ids: Sequence[str],
        medians: Sequence[float],
        symbols: Sequence[str] | None = None,
        aliases: dict | None = None,
        **kwargs,
    ) -> "PerturbGenTokenizer":
        """
        Build a tokenizer from gene identifiers (token ids 4, 5, ... in this order) and their medians.

        Args:
            gene_ids (`Sequence[str]`): Ensembl IDs (or other unique identifiers).
            medians (`Sequence[float]`): positive normalisation median of each gene.
            symbols (`Sequence[str]`, *optional*): gene symbol of each gene.
            aliases (`dict`, *optional*): extra `{alias: gene_id}` entries for lookups.
            kwargs: passed to the constructor (`model_max_length`, `total_counts`, ...).
        """
        gene_ids = [str(g) for g in gene_ids]
        if len(set(gene_ids)) != len(gene_ids):
            duplicated = sorted({g for g in gene_ids if gene_ids.count(g) > 1})[:5]
            raise ValueError(f"Duplicate gene ids in the vocabulary: {duplicated}.")
        medians = np.asarray(medians, dtype=np.float64)
        if len(medians) != len(gene_ids):
            raise ValueError(f"{len(medians)} medians for {len(gene_ids)} genes.")
        if not (np.isfinite(medians).all() and (medians > 0).all()):
            raise ValueError("Gene medians must be finite and positive.")
        vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
        vocab.update({gene: NUM_SPECIAL_TOKENS + index for index, gene in enumerate(gene_ids)})
        names = {"symbols": {}, "aliases": dict(aliases or {})}
        if symbols is not None:
            names["symbols"] = {g: str(s) for g, s in zip(gene_ids, symbols) if s is not None and str(s) != "nan"}
        with tempfile.TemporaryDirectory() as folder:
            files = _write_vocabulary_files(folder, vocab, dict(zip(gene_ids, medians.tolist())), names, {})
            return cls(**files, **kwargs)

    @classmethod
    def from_dictionaries(
        cls, token_dict, gene_medians, gene_mapping=None, gene_names=None, **kwargs
    ) -> "PerturbGenTokenizer":
        """
        Build a tokenizer from the original Geneformer / PerturbGen dictionary pickles, read with a restricted
        unpickler (plain dictionaries of strings and numbers only).

        Args:
            token_dict (`str` or `os.PathLike`): `{ensembl_id: token_id}` with `<pad>` 0, `<mask>` 1 (and, for
                PerturbGen, `<cls>` 2, `<eos>` 3). Geneformer 30M dictionaries (no `<cls>`/`<eos>`) are re-indexed.
            gene_medians (`str` or `os.PathLike`): `{ensembl_id: median}`.
            gene_mapping (`str` or `os.PathLike`, *optional*): `{symbol_or_alias_or_id: ensembl_id}`, for lookups
                by symbol and alias.
            gene_names (`str` or `os.PathLike`, *optional*): `{symbol: ensembl_id}` of canonical symbols (e.g.
                Geneformer's `gene_name_id_dict`), for display. The alias mapping cannot tell a symbol from an alias.
        """
        tokens = load_dictionary_pickle(token_dict)
        medians = load_dictionary_pickle(gene_medians)
        genes = [g for g, _ in sorted(tokens.items(), key=lambda item: item[1]) if g not in SPECIAL_TOKENS]
        without_median = [g for g in genes if g not in medians]
        if without_median:
            logger.warning("%d vocabulary genes have no median and are left out (e.g. %s).",
                           len(without_median), without_median[:3])  # fmt: skip
            genes = [g for g in genes if g in medians]
        known = set(genes)
        aliases = {}
        if gene_mapping is not None:
            aliases = {k.upper(): v for k, v in load_dictionary_pickle(gene_mapping).items() if v in known}
        symbol_of = {}
        if gene_names is not None:
            for symbol, gene in load_dictionary_pickle(gene_names).items():
                if gene in known:
                    symbol_of.setdefault(gene, symbol)
                    aliases.setdefault(symbol.upper(), gene)
        symbols = [symbol_of.get(g) for g in genes]
        return cls.from_vocabulary(genes, [medians[g] for g in genes], symbols=symbols, aliases=aliases, **kwargs)

    def add_symbols(self, gene_ids: Sequence[str], symbols: Sequence[str]) -> None:
        """Record display symbols (e.g. from a dataset's `var`) for vocabulary genes that have none yet."""
        for gene, symbol in zip(gene_ids, symbols):
            resolved = self.resolve_gene(gene) if gene else None
            if resolved is not None and symbol and resolved not in self.gene_symbols:
                self.gene_symbols[resolved] = str(symbol)
        self._lookup = None

    @classmethod
    def fit(cls, counts, gene_ids, symbols=None, min_cells: int = 1, chunk_size: int = 4096, **kwargs):
        """
        Build a vocabulary from data: every gene expressed in at least `min_cells` cells, with the median of its
        non-zero counts per 10,000 as its normalisation median.

        Args:
            counts (AnnData X, `scipy.sparse` matrix or `np.ndarray` of shape `(num_cells, num_genes)`): raw counts;
                a backed AnnData's `X` is read in chunks.
            gene_ids (`Sequence[str]`): identifier of each column (unique).
            symbols (`Sequence[str]`, *optional*): symbol of each column.
            min_cells (`int`, *optional*, defaults to 1): minimum number of expressing cells.
            chunk_size (`int`, *optional*, defaults to 4096): cells read at a time.

        Memory grows with the number of non-zero counts (the exact median needs every value of a gene).
        """
        gene_ids = [str(g) for g in gene_ids]
        num_cells, num_genes = counts.shape
        if num_cells == 0 or num_genes == 0:
            raise ValueError(f"Cannot fit a vocabulary on empty data ({num_cells} cells x {num_genes} genes).")
        if len(gene_ids) != num_genes:
            raise ValueError(f"{len(gene_ids)} gene ids for {num_genes} columns.")
        columns, values = [], []
        for start in range(0, num_cells, chunk_size):
            chunk = _as_csr(counts[start : start + chunk_size])
            check_raw_counts(chunk.data, f"counts (cells {start}..{start + chunk.shape[0] - 1})")
            totals = np.asarray(chunk.sum(axis=1)).ravel()
            chunk.eliminate_zeros()
            rows = np.repeat(np.arange(chunk.shape[0]), np.diff(chunk.indptr))
            columns.append(chunk.indices.astype(np.int64))
            values.append(chunk.data / np.where(totals > 0, totals, 1.0)[rows] * NORMALIZED_TOTAL)
        columns, values = np.concatenate(columns), np.concatenate(values)
        order = np.lexsort((values, columns))
        columns, values = columns[order], values[order]
        starts = np.searchsorted(columns, np.arange(num_genes))
        ends = np.searchsorted(columns, np.arange(num_genes), side="right")
        cells_per_gene = ends - starts
        keep = np.flatnonzero(cells_per_gene >= max(min_cells, 1))
        if keep.size == 0:
            raise ValueError(f"No gene is expressed in at least {min_cells} cells.")
        lower = values[starts[keep] + (cells_per_gene[keep] - 1) // 2]
        upper = values[starts[keep] + cells_per_gene[keep] // 2]
        kept_symbols = None if symbols is None else [list(symbols)[i] for i in keep]
        return cls.from_vocabulary([gene_ids[i] for i in keep], (lower + upper) / 2.0, symbols=kept_symbols, **kwargs)

    def _check_special_layout(self):
        for expected, token in enumerate(SPECIAL_TOKENS):
            if self.vocab.get(token) != expected:
                raise ValueError(f"The vocabulary must map {token} to {expected}, found {self.vocab.get(token)!r}.")

    # -- PreTrainedTokenizer interface ----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def get_vocab(self) -> dict:
        return dict(self.vocab, **self.added_tokens_encoder)

    def _tokenize(self, text, **kwargs):
        return text.split()

    def _convert_token_to_id(self, token):
        if token in self.vocab:
            return self.vocab[token]
        return self.gene_to_id(token)

    def _convert_id_to_token(self, index):
        if index not in self.ids_to_tokens:
            raise KeyError(f"Token id {index} is not in the vocabulary (size {self.vocab_size}).")
        return self.ids_to_tokens[index]

    def convert_tokens_to_string(self, tokens):
        return " ".join(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        if token_ids_1 is not None:
            raise ValueError("A cell is a single sequence; pairs are not supported.")
        return [self.cls_token_id, *token_ids_0, self.eos_token_id]

    def save_vocabulary(self, save_directory, filename_prefix=None):
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        medians = {g: float(m) for g, m in self.gene_medians.items()}
        names = {"symbols": self.gene_symbols, "aliases": self.gene_aliases}
        target = {"target_genes": self.target_genes, "condition_tokens": self.condition_tokens}
        files = _write_vocabulary_files(save_directory, self.vocab, medians, names, target, prefix)
        return tuple(files.values())

    # -- gene lookup ----------------------------------------------------------------------------------------------

    def _build_lookup(self):
        lookup = {}
        for alias, gene in self.gene_aliases.items():
            if gene in self.vocab:
                lookup.setdefault(alias.upper(), gene)
        for gene, symbol in self.gene_symbols.items():
            lookup.setdefault(symbol.upper(), gene)
        for gene in self.vocab:
            if gene not in SPECIAL_TOKENS:
                lookup[gene.upper()] = gene
        self._lookup = lookup
        return lookup

    def resolve_gene(self, gene: str) -> str | None:
        """Vocabulary gene id of an Ensembl ID (with or without version), symbol or alias; None if unknown."""
        lookup = self._lookup if self._lookup is not None else self._build_lookup()
        key = str(gene).strip().upper()
        versionless = _ENSEMBL_VERSION.match(key)
        if versionless:
            key = versionless.group(1).upper()
        return lookup.get(key)

    def gene_to_id(self, gene: str) -> int:
        """
        Token id of a gene given by Ensembl ID, symbol or alias (case-insensitive).

        Raises:
            `KeyError` naming the gene and the closest known names.
        """
        resolved = self.resolve_gene(gene)
        if resolved is None:
            raise KeyError(self._unknown_gene_message([gene]))
        return self.vocab[resolved]

    def id_to_gene(self, token_id: int) -> str:
        """Ensembl ID (vocabulary key) of a token id."""
        return self._convert_id_to_token(int(token_id))

    def id_to_symbol(self, token_id: int) -> str:
        """Gene symbol of a token id (the id itself where no symbol is known)."""
        gene = self.id_to_gene(token_id)
        return self.gene_symbols.get(gene, gene)

    def _unknown_gene_message(self, genes) -> str:
        lookup = self._lookup if self._lookup is not None else self._build_lookup()
        parts = []
        for gene in list(genes)[:5]:
            close = difflib.get_close_matches(str(gene).upper(), list(lookup), n=3, cutoff=0.75)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            parts.append(f"{gene!r}{hint}")
        more = f" and {len(genes) - 5} more" if len(genes) > 5 else ""
        return f"Unknown gene{'s' if len(genes) > 1 else ''} {', '.join(parts)}{more}: not in the vocabulary."

    def resolve_genes(self, gene_ids: Sequence[str]) -> np.ndarray:
        """
        Token id of each input gene (-1 where it is not in the vocabulary). Missing genes are reported once per
        distinct input gene list, never silently dropped.
        """
        gene_ids = [str(g) for g in gene_ids]
        resolved = [self.resolve_gene(g) for g in gene_ids]
        ids = np.array([self.vocab[r] if r is not None else -1 for r in resolved], dtype=np.int64)
        missing = [g for g, i in zip(gene_ids, ids) if i < 0]
        key = (len(gene_ids), hash(tuple(gene_ids)))
        if missing and key not in self._reported_missing:
            self._reported_missing.add(key)
            named = [g for g in missing if g.strip() and g.lower() != "nan"]
            logger.warning(
                "%d of %d input genes are not used: %d are not in the tokenizer's vocabulary (e.g. %s) and %d have "
                "no identifier.",
                len(missing), len(gene_ids), len(named), ", ".join(named[:5]) or "-", len(missing) - len(named),
            )  # fmt: skip
        if not (ids >= 0).any():
            raise ValueError(
                f"None of the {len(gene_ids)} input genes is in the vocabulary (e.g. {gene_ids[:3]}); check the gene "
                "identifiers (Ensembl IDs or symbols) and the species."
            )
        return ids.astype(np.int64)

    # -- encoding -------------------------------------------------------------------------------------------------

    def _column_plan(self, gene_ids, token_ids_of_columns, allowed_ids, medians_by_id):
        """Sparse matrix summing input columns into unique allowed token ids, with their medians and ids."""
        token_ids = np.asarray(token_ids_of_columns)
        usable = np.flatnonzero(np.isin(token_ids, allowed_ids))
        unique_ids, column_to_unique = np.unique(token_ids[usable], return_inverse=True)
        aggregate = sp.csr_matrix(
            (np.ones(usable.size), (usable, column_to_unique)), shape=(len(gene_ids), unique_ids.size)
        )
        medians = np.array([medians_by_id[i] for i in unique_ids], dtype=np.float64)
        return aggregate, medians, unique_ids

    def _cached(self, kind, gene_ids, build):
        key = (kind, len(gene_ids), hash(tuple(gene_ids)), len(self.target_genes))
        if key not in self._plans:
            self._plans[key] = build(gene_ids)
        return self._plans[key]

    def _encoder_plan(self, gene_ids):
        return self._cached("encoder", gene_ids, self._build_encoder_plan)

    def _target_plan(self, gene_ids):
        return self._cached("target", gene_ids, self._build_target_plan)

    def _build_encoder_plan(self, gene_ids):
        token_ids = self.resolve_genes(gene_ids)
        medians_by_id = {self.vocab[g]: m for g, m in self.gene_medians.items() if g in self.vocab}
        allowed = np.fromiter(medians_by_id, dtype=np.int64)
        return self._column_plan(gene_ids, token_ids, allowed, medians_by_id)

    def rank_cells(self, counts, gene_ids, max_length=None, chunk_size=2048, add_special_tokens=True,
                   progress=None, check_counts=True) -> RankedCells:  # fmt: skip
        """
        Rank-value encode cells in the encoder vocabulary.

        Args:
            counts (`scipy.sparse` matrix, `np.ndarray` or a backed AnnData's `X`, shape `(num_cells, num_genes)`).
            gene_ids (`Sequence[str]`): identifier of each column.
            max_length (`int`, *optional*): longest sequence, special tokens included; defaults to `model_max_length`.
            chunk_size (`int`, *optional*, defaults to 2048): cells ranked at a time.
            add_special_tokens (`bool`, *optional*, defaults to `True`): wrap each cell in `<cls>` ... `<eos>`.
            progress (`callable`, *optional*): called with the number of cells done after each chunk.
            check_counts (`bool`, *optional*, defaults to `True`): refuse non-integer, negative or NaN values.

        Returns:
            [`RankedCells`].
        """
        max_length = max_length or self.model_max_length
        specials = 2 if add_special_tokens else 0
        if max_length <= specials:
            raise ValueError(f"`max_length={max_length}` leaves no room for genes.")
        aggregate, medians, token_ids = self._encoder_plan(gene_ids)
        ranked = self._rank_in_chunks(counts, gene_ids, aggregate, medians, token_ids, max_length - specials,
                                      chunk_size, progress, check_counts)  # fmt: skip
        if add_special_tokens:
            ranked = _wrap_special(ranked, self.cls_token_id, self.eos_token_id)
        return ranked

    def _rank_in_chunks(self, counts, gene_ids, aggregate, medians, token_ids, max_tokens, chunk_size,
                        progress, check_counts):  # fmt: skip
        num_cells, num_columns = counts.shape
        if num_columns != len(gene_ids):
            raise ValueError(f"The data have {num_columns} genes (columns) but {len(gene_ids)} gene ids were given.")
        offsets, tokens = [np.zeros(1, dtype=np.int64)], []
        for start in range(0, num_cells, chunk_size):
            chunk = _as_csr(counts[start : start + chunk_size])
            if check_counts:
                check_raw_counts(chunk.data, f"counts (cells {start}..{start + chunk.shape[0] - 1})")
            in_vocab = chunk if _is_identity(aggregate) else chunk @ aggregate
            totals = np.asarray(
                (chunk if self.total_counts == "all" else in_vocab).sum(axis=1, dtype=np.float64)
            ).ravel()
            part = rank_chunk(in_vocab, medians, token_ids, totals, max_tokens)
            offsets.append(part.offsets[1:] + offsets[-1][-1])
            tokens.append(part.tokens)
            if progress is not None:
                progress(chunk.shape[0])
        return RankedCells(np.concatenate(offsets), np.concatenate(tokens) if tokens else np.zeros(0, np.int32))

    def __call__(self, cells=None, gene_ids=None, max_length=None, padding="longest", return_tensors=None,
                 add_special_tokens=True, layer=None, **kwargs):  # fmt: skip
        """
        Tokenize cells: an AnnData (in memory, a view or backed), a scipy sparse matrix or a dense array of raw
        counts. Text (`"ENSG... ENSG..."`) goes through the standard `PreTrainedTokenizer` path.

        Args:
            cells: the counts; an AnnData uses `X` (or `layers[layer]`) and its `var_names` unless `gene_ids` is given.
            gene_ids (`Sequence[str]` or `str`, *optional*): identifier of each column, or the name of an AnnData
                `var` column that holds them. Required for matrices.
            max_length (`int`, *optional*): defaults to `model_max_length`.
            padding (`str`, *optional*, defaults to `"longest"`): `"longest"` or `"max_length"`.
            return_tensors (`str`, *optional*): `"pt"` or `"np"`; lists otherwise.

        Returns:
            `BatchEncoding` with `input_ids` and `attention_mask`.
        """
        if (
            cells is None
            or isinstance(cells, str)
            or (isinstance(cells, (list, tuple)) and cells and isinstance(cells[0], str))
        ):
            return super().__call__(cells, max_length=max_length, padding=padding, return_tensors=return_tensors,
                                    add_special_tokens=add_special_tokens, **kwargs)  # fmt: skip
        if kwargs:
            raise TypeError(f"Unexpected arguments for cells: {sorted(kwargs)}.")
        counts, gene_ids = counts_and_genes(cells, gene_ids, layer)
        ranked = self.rank_cells(counts, gene_ids, max_length, add_special_tokens=add_special_tokens)
        width = (
            (max_length or self.model_max_length) if padding == "max_length" else int(ranked.lengths().max(initial=0))
        )
        input_ids, attention_mask = pad_ranked(ranked, width, self.pad_token_id)
        return BatchEncoding(
            {"input_ids": input_ids, "attention_mask": attention_mask}, tensor_type=return_tensors or "np"
        )

    # -- decoder (target) vocabulary --------------------------------------------------------------------------------

    def set_target_genes(self, genes: Sequence[str], condition_tokens: Sequence[str] = ()) -> None:
        """
        Set the decoder's vocabulary: target genes (decoder ids 4, 5, ... in this order) and condition tokens.

        Raises:
            `KeyError` naming genes that are not in the vocabulary; `ValueError` for duplicates.
        """
        resolved = [self.resolve_gene(g) for g in genes]
        unknown = [g for g, r in zip(genes, resolved) if r is None]
        if unknown:
            raise KeyError(self._unknown_gene_message(unknown))
        if len(set(resolved)) != len(resolved):
            raise ValueError("The target genes name the same gene more than once.")
        if len(set(condition_tokens)) != len(condition_tokens):
            raise ValueError(f"Duplicate condition tokens: {list(condition_tokens)}.")
        self.target_genes = resolved
        self.condition_tokens = [str(c) for c in condition_tokens]
        self._plans = {}

    @property
    def num_target_genes(self) -> int:
        return len(self.target_genes)

    def target_token_ids(self) -> np.ndarray:
        """Encoder token id of each target gene, in decoder order."""
        return np.array([self.vocab[g] for g in self.target_genes], dtype=np.int64)

    def condition_token_id(self, condition: str) -> int:
        """Decoder id of a condition token."""
        if condition not in self.condition_tokens:
            raise KeyError(f"Unknown condition token {condition!r}; known: {self.condition_tokens[:10]}.")
        return NUM_SPECIAL_TOKENS + self.num_target_genes + self.condition_tokens.index(condition)

    def _build_target_plan(self, gene_ids):
        if not self.target_genes:
            raise ValueError("This tokenizer has no target genes; call `set_target_genes` first.")
        token_ids = self.resolve_genes(gene_ids)
        target_ids = self.target_token_ids()
        decoder_of_token = {int(t): NUM_SPECIAL_TOKENS + i for i, t in enumerate(target_ids)}
        medians_by_id = {int(t): self.gene_medians[g] for t, g in zip(target_ids, self.target_genes)}
        aggregate, medians, unique_ids = self._column_plan(gene_ids, token_ids, target_ids, medians_by_id)
        decoder_ids = np.array([decoder_of_token[int(t)] for t in unique_ids], dtype=np.int64)
        return aggregate, medians, unique_ids, decoder_ids

    def rank_targets(self, counts, gene_ids, max_length=None, chunk_size=2048, check_counts=True) -> RankedCells:
        """
        Rank-value encode cells over the target genes only, in decoder ids (no `<cls>`/`<eos>`); the library size
        is still the cell's (per `total_counts`), so ranks agree with the encoder's.
        """
        aggregate, medians, _, decoder_ids = self._target_plan(gene_ids)
        full_aggregate, _, _ = self._encoder_plan(gene_ids)
        max_tokens = max_length or self.num_target_genes
        num_cells = counts.shape[0]
        offsets, tokens = [np.zeros(1, dtype=np.int64)], []
        for start in range(0, num_cells, chunk_size):
            chunk = _as_csr(counts[start : start + chunk_size])
            if check_counts:
                check_raw_counts(chunk.data, f"counts (cells {start}..{start + chunk.shape[0] - 1})")
            reference = chunk if self.total_counts == "all" else chunk @ full_aggregate
            totals = np.asarray(reference.sum(axis=1, dtype=np.float64)).ravel()
            part = rank_chunk(chunk @ aggregate, medians, decoder_ids, totals, max_tokens)
            offsets.append(part.offsets[1:] + offsets[-1][-1])
            tokens.append(part.tokens)
        return RankedCells(np.concatenate(offsets), np.concatenate(tokens) if tokens else np.zeros(0, np.int32))

    def target_counts(self, counts, gene_ids) -> sp.csr_matrix:
        """Counts of the target genes, `(num_cells, num_target_genes)` CSR in decoder order (duplicates summed)."""
        aggregate, _, _, decoder_ids = self._target_plan(gene_ids)
        columns = sp.csr_matrix(
            (np.ones(len(decoder_ids)), (np.arange(len(decoder_ids)), decoder_ids - NUM_SPECIAL_TOKENS)),
            shape=(len(decoder_ids), self.num_target_genes),
        )
        return (_as_csr(counts) @ aggregate @ columns).tocsr()

    def check_model_compatibility(self, config) -> None:
        """
        Refuse a model whose vocabularies disagree with this tokenizer's.

        Args:
            config: a `PerturbGenConfig` (or a model with `.config`).

        Raises:
            `ValueError` naming the first disagreement.
        """
        config = getattr(config, "config", config)
        if config.encoder.vocab_size < self.vocab_size:
            raise ValueError(
                f"The model's encoder vocabulary ({config.encoder.vocab_size}) is smaller than the tokenizer's "
                f"({self.vocab_size})."
            )
        if config.target_genes is not None and list(config.target_genes) != self.target_genes:
            differing = next(
                (i for i, (a, b) in enumerate(zip(config.target_genes, self.target_genes)) if a != b),
                min(len(config.target_genes), len(self.target_genes)),
            )
            raise ValueError(
                f"Target genes differ: the model has {len(config.target_genes)}, the tokenizer "
                f"{len(self.target_genes)}; first difference at position {differing}."
            )
        if config.num_target_genes != self.num_target_genes:
            raise ValueError(
                f"The model has {config.num_target_genes} target genes, the tokenizer {self.num_target_genes}."
            )
        if list(config.condition_tokens) != self.condition_tokens:
            raise ValueError(
                f"Condition tokens differ: model {list(config.condition_tokens)}, tokenizer {self.condition_tokens}."
            )


def counts_and_genes(cells, gene_ids=None, layer=None):
    """The count matrix and gene identifiers of an AnnData (or a matrix with explicit `gene_ids`)."""
    if hasattr(cells, "X") and hasattr(cells, "var_names"):
        if isinstance(gene_ids, str):
            if gene_ids not in cells.var.columns:
                raise KeyError(f"No var column {gene_ids!r}; available: {list(cells.var.columns)}.")
            gene_ids = cells.var[gene_ids].astype(str).tolist()
        elif gene_ids is None:
            gene_ids = list(cells.var_names)
        if layer is not None:
            if layer not in cells.layers:
                raise KeyError(f"No layer {layer!r}; available: {list(cells.layers.keys())}.")
            return cells.layers[layer], list(gene_ids)
        return cells.X, list(gene_ids)
    if gene_ids is None:
        raise ValueError("A count matrix needs `gene_ids` (one identifier per column).")
    if getattr(cells, "ndim", 2) == 1:
        cells = np.asarray(cells)[None, :]
    return cells, list(gene_ids)


def pad_ranked(ranked: RankedCells, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad ragged token lists into `(num_cells, width)` arrays of ids and attention mask."""
    lengths = np.minimum(ranked.lengths(), width)
    input_ids = np.full((len(ranked), width), pad_id, dtype=np.int64)
    mask = np.arange(width)[None, :] < lengths[:, None]
    starts = ranked.offsets[:-1]
    source = (starts[:, None] + np.arange(width)[None, :])[mask]
    input_ids[mask] = ranked.tokens[source]
    return input_ids, mask.astype(np.int64)


def _wrap_special(ranked: RankedCells, cls_id: int, eos_id: int) -> RankedCells:
    lengths = ranked.lengths() + 2
    offsets = np.zeros(len(ranked) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.empty(offsets[-1], dtype=np.int32)
    tokens[offsets[:-1]] = cls_id
    tokens[offsets[1:] - 1] = eos_id
    inner = np.ones(offsets[-1], dtype=bool)
    inner[offsets[:-1]] = False
    inner[offsets[1:] - 1] = False
    tokens[inner] = ranked.tokens
    return RankedCells(offsets, tokens)


def _is_identity(matrix: sp.csr_matrix) -> bool:
    """True when the column plan keeps every input column, in order, without merging any."""
    if matrix.shape[0] != matrix.shape[1] or matrix.nnz != matrix.shape[0]:
        return False
    coo = matrix.tocoo()
    return bool(np.array_equal(coo.row, coo.col) and np.array_equal(np.sort(coo.row), np.arange(matrix.shape[0])))


def _as_csr(block) -> sp.csr_matrix:
    if sp.issparse(block):
        return sp.csr_matrix(block)
    return sp.csr_matrix(np.asarray(block))


def _read_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Tokenizer file not found: {str(path)!r}")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_vocabulary_files(folder, vocab, medians, names, target, prefix=""):
    files = {
        "vocab_file": (vocab, "vocab.json"),
        "medians_file": (medians, "gene_medians.json"),
        "genes_file": (names, "gene_names.json"),
        "target_file": (target, "target_vocab.json"),
    }
    written = {}
    for key, (content, name) in files.items():
        path = os.path.join(folder, prefix + name)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(content, handle)
        written[key] = path
    return written


__all__ = ["PerturbGenTokenizer", "RankedCells", "check_raw_counts", "counts_and_genes", "pad_ranked", "rank_chunk"]
