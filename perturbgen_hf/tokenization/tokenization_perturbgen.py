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
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import BatchEncoding

from .chunking import _csr_row_view, csr_view, map_row_chunks
from .ranking import (
    NORMALIZED_TOTAL,
    ColumnPlan,
    RankedCells,
    build_column_plan,
    check_raw_counts,
    concatenate_ranked,
    library_sizes,
    pad_ranked,
    rank_chunk,
)
from .safe_pickle import load_dictionary_pickle


logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<eos>")
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
TOTAL_COUNTS_MODES = ("all", "vocabulary")
# Values ranked at a time inside a chunk: the temporaries of 512k values (4 MiB each) stay in cache, which halves
# the time of ranking a 2,048-cell chunk of 2,000 genes each on this project's machine.
_CACHE_ENTRIES = 1 << 18
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*G\d+)\.\d+$", re.IGNORECASE)


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
    >>> batch = tokenizer(adata, gene_ids=adata.var["ensembl_id"], padding=True, return_tensors="pt")  # doctest: +SKIP
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
            logger.warning(
                "%d vocabulary genes have no median and are left out (e.g. %s).",
                len(without_median),
                without_median[:3],
            )
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
        num_cells, num_columns = counts.shape
        if num_cells == 0 or num_columns == 0:
            raise ValueError(f"Cannot fit a vocabulary on empty data ({num_cells} cells x {num_columns} genes).")
        if len(gene_ids) != num_columns:
            raise ValueError(f"{len(gene_ids)} gene ids for {num_columns} columns.")
        # Columns naming the same gene (e.g. several orthologs of one human gene) are one gene: their counts add up.
        unique_ids = list(dict.fromkeys(gene_ids))
        position = {gene: i for i, gene in enumerate(unique_ids)}
        merge = sp.csr_matrix(
            (np.ones(num_columns), (np.arange(num_columns), [position[g] for g in gene_ids])),
            shape=(num_columns, len(unique_ids)),
        )
        if symbols is not None:
            first_symbol = dict(reversed(list(zip(gene_ids, symbols))))
            symbols = [first_symbol[g] for g in unique_ids]
        gene_ids, num_genes = unique_ids, len(unique_ids)
        columns, values = [], []
        for start in range(0, num_cells, chunk_size):
            raw = _as_csr(counts[start : start + chunk_size])
            check_raw_counts(raw.data, f"counts (cells {start}..{start + raw.shape[0] - 1})")
            chunk = sp.csr_matrix(raw @ merge)
            totals = np.asarray(raw.sum(axis=1, dtype=np.float64)).ravel()
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
        """Number of tokens in the vocabulary (specials and genes)."""
        return len(self.vocab)

    def get_vocab(self) -> dict:
        """The vocabulary `{token: id}`, added tokens included."""
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
        """Gene tokens joined by spaces."""
        return " ".join(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        """`<cls>` + the cell's token ids + `<eos>` (a cell is one sequence: no pairs)."""
        if token_ids_1 is not None:
            raise ValueError("A cell is a single sequence; pairs are not supported.")
        return [self.cls_token_id, *token_ids_0, self.eos_token_id]

    def save_vocabulary(self, save_directory, filename_prefix=None):
        """Write the vocabulary, medians, gene names and target genes as JSON; returns their paths."""
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
                len(missing),
                len(gene_ids),
                len(named),
                ", ".join(named[:5]) or "-",
                len(missing) - len(named),
            )
        if not (ids >= 0).any():
            raise ValueError(
                f"None of the {len(gene_ids)} input genes is in the vocabulary (e.g. {gene_ids[:3]}); check the gene "
                "identifiers (Ensembl IDs or symbols) and the species."
            )
        return ids.astype(np.int64)

    # -- encoding -------------------------------------------------------------------------------------------------

    def _cached(self, kind, gene_ids, build):
        key = (kind, len(gene_ids), hash(tuple(gene_ids)), tuple(self.target_genes))
        if key not in self._plans:
            self._plans[key] = build(gene_ids)
        return self._plans[key]

    def _encoder_plan(self, gene_ids) -> ColumnPlan:
        return self._cached("encoder", gene_ids, self._build_encoder_plan)

    def _target_plan(self, gene_ids) -> ColumnPlan:
        return self._cached("target", gene_ids, self._build_target_plan)

    def _library_columns(self, column_tokens):
        # "vocabulary": only input columns of vocabulary genes count towards the library size.
        return None if self.total_counts == "all" else (column_tokens >= 0).astype(np.float64)

    def _build_encoder_plan(self, gene_ids) -> ColumnPlan:
        token_ids = self.resolve_genes(gene_ids)
        medians = {self.vocab[g]: m for g, m in self.gene_medians.items() if g in self.vocab}
        usable = np.where(np.isin(token_ids, np.fromiter(medians, dtype=np.int64)), token_ids, -1)
        return build_column_plan(usable, medians, self._library_columns(usable))

    def _build_target_plan(self, gene_ids) -> ColumnPlan:
        if not self.target_genes:
            raise ValueError("This tokenizer has no target genes; call `set_target_genes` first.")
        token_ids = self.resolve_genes(gene_ids)
        decoder_of_token = np.full(max(self.vocab_size, int(token_ids.max()) + 1), -1, dtype=np.int64)
        decoder_of_token[self.target_token_ids()] = NUM_SPECIAL_TOKENS + np.arange(self.num_target_genes)
        decoder_ids = np.where(token_ids >= 0, decoder_of_token[np.maximum(token_ids, 0)], -1)
        medians = {NUM_SPECIAL_TOKENS + i: self.gene_medians[g] for i, g in enumerate(self.target_genes)}
        return build_column_plan(decoder_ids, medians, self._encoder_plan(gene_ids).library_columns)

    def rank_block(
        self, block, gene_ids, max_length=None, add_special_tokens=True, targets=False, check_counts=True
    ) -> RankedCells:
        """
        Rank one in-memory block of cells: in the encoder vocabulary (`<cls>` ... `<eos>`), or with `targets=True`
        over the target genes only, in decoder ids and without special tokens. The library size is the cell's own
        (per `total_counts`) either way, so both rankings agree.
        """
        return concatenate_ranked(
            self._rank_block_parts(block, gene_ids, max_length, add_special_tokens, targets, check_counts)
        )

    def _rank_block_parts(self, block, gene_ids, max_length, add_special_tokens, targets, check_counts) -> list:
        """[`rank_block`] as the list of its consecutive parts (joining them is a copy `rank_cells` makes once)."""
        block = _as_csr(block)
        if block.shape[1] != len(gene_ids):
            raise ValueError(
                f"The data have {block.shape[1]} genes (columns) but {len(gene_ids)} gene ids were given."
            )
        plan = self._target_plan(gene_ids) if targets else self._encoder_plan(gene_ids)
        specials = 2 if add_special_tokens and not targets else 0
        max_length = max_length or (self.num_target_genes if targets else self.model_max_length)
        if max_length <= specials:
            raise ValueError(f"`max_length={max_length}` leaves no room for genes.")
        wrap = (self.cls_token_id, self.eos_token_id) if specials else None
        parts = []
        # Every step runs on cache-sized slices of rows: the arrays of a whole chunk do not fit in cache.
        for rows in _row_slices(block):
            if check_counts:
                check_raw_counts(rows.data, "counts")
            # In float64 once: the library sizes and the values both read it (a mixed-type divide is slower).
            rows = csr_view(rows.data.astype(np.float64), rows.indices, rows.indptr, rows.shape[1])
            parts.append(rank_chunk(rows, plan, library_sizes(rows, plan), max_length - specials, wrap))
        return parts

    def rank_cells(
        self,
        counts,
        gene_ids,
        max_length=None,
        chunk_size=2048,
        add_special_tokens=True,
        targets=False,
        check_counts=True,
        num_proc=1,
        progress=None,
    ) -> RankedCells:
        """
        Rank-value encode all cells of a matrix, reading it in chunks.

        Args:
            counts (`scipy.sparse` matrix, `np.ndarray` or a backed AnnData's `X`, shape `(num_cells, num_genes)`).
            gene_ids (`Sequence[str]`): identifier of each column.
            max_length (`int`, *optional*): longest sequence, special tokens included; defaults to `model_max_length`
                (the number of target genes with `targets=True`).
            chunk_size (`int`, *optional*, defaults to 2048): cells ranked at a time.
            add_special_tokens (`bool`, *optional*, defaults to `True`): wrap each cell in `<cls>` ... `<eos>`.
            targets (`bool`, *optional*, defaults to `False`): rank over the target genes, in decoder ids.
            check_counts (`bool`, *optional*, defaults to `True`): refuse non-integer, negative or NaN values.
            num_proc (`int`, *optional*, defaults to 1): processes ranking chunks in parallel.
            progress (`callable`, *optional*): called with the number of cells of each finished chunk.

        Returns:
            [`RankedCells`]. For bounded memory on large inputs, use [`iter_rank_cells`].
        """
        function = self._block_ranker(
            counts, gene_ids, max_length, add_special_tokens, targets, check_counts, method=self._rank_block_parts
        )
        parts = []
        for chunk_parts in map_row_chunks(counts, _drop_index(function), chunk_size, num_proc):
            parts.extend(chunk_parts)
            if progress is not None:
                progress(sum(len(part) for part in chunk_parts))
        return concatenate_ranked(parts)

    def iter_rank_cells(
        self,
        counts,
        gene_ids,
        max_length=None,
        chunk_size=2048,
        add_special_tokens=True,
        targets=False,
        check_counts=True,
        num_proc=1,
        progress=None,
    ):
        """Like [`rank_cells`], yielding one [`RankedCells`] per chunk (memory bounded by a few chunks)."""
        function = self._block_ranker(counts, gene_ids, max_length, add_special_tokens, targets, check_counts)
        for ranked in map_row_chunks(counts, _drop_index(function), chunk_size, num_proc):
            if progress is not None:
                progress(len(ranked))
            yield ranked

    def rank_to_arrow(
        self,
        counts,
        gene_ids,
        folder,
        max_length=None,
        chunk_size=2048,
        add_special_tokens=True,
        targets=False,
        check_counts=True,
        num_proc=1,
        progress=None,
    ) -> list:
        """
        Rank all cells into Arrow stream files `folder/tokens-00000.arrow`, ... (one per chunk, a column
        `input_ids` of int32 lists, in cell order), written by the worker processes themselves. Memory stays bounded
        by a few chunks per process whatever the number of cells.

        Returns:
            `list` of the written paths, in cell order.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ranker = self._block_ranker(
            counts, gene_ids, max_length, add_special_tokens, targets, check_counts, method=self._rank_block_parts
        )
        function = partial(_write_ranked_shard, ranker=ranker, folder=folder)
        paths = []
        for path, num_cells in map_row_chunks(counts, function, chunk_size, num_proc):
            paths.append(path)
            if progress is not None:
                progress(num_cells)
        return paths

    def _block_ranker(self, counts, gene_ids, max_length, add_special_tokens, targets, check_counts, method=None):
        gene_ids = list(gene_ids)
        if counts.shape[1] != len(gene_ids):
            raise ValueError(
                f"The data have {counts.shape[1]} genes (columns) but {len(gene_ids)} gene ids were given."
            )
        # Plans are built here, once, so that worker processes inherit them.
        self._target_plan(gene_ids) if targets else self._encoder_plan(gene_ids)
        return partial(
            method or self.rank_block,
            gene_ids=gene_ids,
            max_length=max_length,
            add_special_tokens=add_special_tokens,
            targets=targets,
            check_counts=check_counts,
        )

    def __call__(
        self,
        cells=None,
        gene_ids=None,
        max_length=None,
        padding=False,
        return_tensors=None,
        add_special_tokens=True,
        layer=None,
        **kwargs,
    ):
        """
        Tokenize cells: an AnnData (in memory, a view or backed), a scipy sparse matrix or a dense array of raw
        counts. Text (`"ENSG... ENSG..."`) goes through the standard `PreTrainedTokenizer` path.

        Args:
            cells: the counts; an AnnData uses `X` (or `layers[layer]`) and its `var_names` unless `gene_ids` is given.
            gene_ids (`Sequence[str]` or `str`, *optional*): identifier of each column, or the name of an AnnData
                `var` column that holds them. Required for matrices.
            max_length (`int`, *optional*): defaults to `model_max_length`.
            padding (`bool` or `str`, *optional*, defaults to `False`): as transformers' tokenizers: `False` (or
                `"do_not_pad"`) returns each cell's tokens unpadded; `True` (or `"longest"`) pads to the longest cell,
                `"max_length"` to `max_length`. (Before 0.2 this tokenizer padded to the longest cell by default:
                pass `padding=True` for that.)
            return_tensors (`str`, *optional*): `"pt"` or `"np"`; lists otherwise. Tensors need equal lengths:
                with cells of different lengths, pass `padding=True`.

        Returns:
            `BatchEncoding` with `input_ids` and `attention_mask`.
        """
        if (
            cells is None
            or isinstance(cells, str)
            or (isinstance(cells, (list, tuple)) and cells and isinstance(cells[0], str))
        ):
            return super().__call__(
                cells,
                max_length=max_length,
                padding=padding,
                return_tensors=return_tensors,
                add_special_tokens=add_special_tokens,
                **kwargs,
            )
        if kwargs:
            raise TypeError(f"Unexpected arguments for cells: {sorted(kwargs)}.")
        counts, gene_ids = counts_and_genes(cells, gene_ids, layer)
        if counts.shape[0] == 0:
            raise ValueError("No cells to tokenize (the input has 0 rows).")
        ranked = self.rank_cells(counts, gene_ids, max_length, add_special_tokens=add_special_tokens)
        if padding not in (False, True, "do_not_pad", "longest", "max_length"):
            raise ValueError(f"padding must be False, True, 'do_not_pad', 'longest' or 'max_length'; got {padding!r}.")
        lengths = ranked.lengths()
        if padding in (False, "do_not_pad"):
            if return_tensors is not None and len(set(lengths.tolist())) > 1:
                raise ValueError(
                    f"The {len(ranked)} cells have {lengths.min()} to {lengths.max()} tokens: return_tensors="
                    f"{return_tensors!r} needs equal lengths, so pass padding=True (or 'max_length')."
                )
            if return_tensors is None:
                ids = [ranked.cell(i).tolist() for i in range(len(ranked))]
                return BatchEncoding({"input_ids": ids, "attention_mask": [[1] * len(c) for c in ids]})
        width = (max_length or self.model_max_length) if padding == "max_length" else int(lengths.max(initial=0))
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
        """Number of target genes of the decoder's vocabulary."""
        return len(self.target_genes)

    def target_token_ids(self) -> np.ndarray:
        """Encoder token id of each target gene, in decoder order."""
        return np.array([self.vocab[g] for g in self.target_genes], dtype=np.int64)

    def target_gene_to_id(self, gene: str) -> int:
        """
        Decoder id of a target gene given by Ensembl ID, symbol or alias.

        Raises:
            `KeyError` naming the gene when it is unknown or not among the decoder's target genes.
        """
        resolved = self.resolve_gene(gene)
        if resolved is None:
            raise KeyError(self._unknown_gene_message([gene]))
        if resolved not in self._target_index():
            raise KeyError(
                f"{gene!r} is not among the model's {self.num_target_genes} target genes, so it cannot be perturbed "
                "in a target cell; perturb it in the source (site='src')."
            )
        return NUM_SPECIAL_TOKENS + self._target_index()[resolved]

    def _target_index(self) -> dict:
        if getattr(self, "_target_positions", (None,))[0] is not self.target_genes:
            self._target_positions = (self.target_genes, {g: i for i, g in enumerate(self.target_genes)})
        return self._target_positions[1]

    def condition_token_id(self, condition: str) -> int:
        """Decoder id of a condition token."""
        if condition not in self.condition_tokens:
            raise KeyError(f"Unknown condition token {condition!r}; known: {self.condition_tokens[:10]}.")
        return NUM_SPECIAL_TOKENS + self.num_target_genes + self.condition_tokens.index(condition)

    def rank_targets(self, counts, gene_ids, max_length=None, chunk_size=2048, check_counts=True) -> RankedCells:
        """[`rank_cells`] over the target genes only, in decoder ids, without special tokens."""
        return self.rank_cells(counts, gene_ids, max_length, chunk_size, targets=True, check_counts=check_counts)

    def target_counts(self, counts, gene_ids) -> sp.csr_matrix:
        """Counts of the target genes, `(num_cells, num_target_genes)` CSR in decoder order (duplicates summed)."""
        plan = self._target_plan(list(gene_ids))
        block = _as_csr(counts)
        if plan.merge is not None:
            block = sp.csr_matrix(block @ plan.merge)
        columns = plan.token_of_column
        used = np.flatnonzero(columns >= 0)
        select = sp.csr_matrix(
            (np.ones(len(used)), (used, columns[used] - NUM_SPECIAL_TOKENS)),
            shape=(len(columns), self.num_target_genes),
        )
        result = sp.csr_matrix(block @ select)
        result.sort_indices()
        return result

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


_WARNED_DUPLICATES = set()


def warn_duplicate_gene_ids(gene_ids, where: str = "the input") -> list[str]:
    """
    Log (once per set of identifiers) that some genes occur more than once: their counts are summed into one token.

    Args:
        gene_ids (`list[str]`): one identifier per column of the counts.
        where (`str`): how the message names the data.

    Returns:
        `list[str]`: the duplicated identifiers, sorted.
    """
    seen, duplicated = set(), set()
    for gene in gene_ids:
        if gene and gene in seen:
            duplicated.add(gene)
        seen.add(gene)
    duplicated = sorted(duplicated)
    key = (where, tuple(duplicated))
    if duplicated and key not in _WARNED_DUPLICATES:
        _WARNED_DUPLICATES.add(key)
        extra = sum(gene_ids.count(g) - 1 for g in duplicated) if len(duplicated) < 1000 else "some"
        shown = ", ".join(duplicated[:10]) + (", ..." if len(duplicated) > 10 else "")
        logger.warning(
            "%d gene identifiers of %s occur more than once (%s extra columns): %s. Their counts are summed into one "
            "token per gene; make the identifiers unique (or give another --gene-id-key) to keep them apart.",
            len(duplicated),
            where,
            extra,
            shown,
        )
    return duplicated


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


RANKED_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32()))])


def ranked_to_arrow(ranked: RankedCells) -> pa.RecordBatch:
    """A [`RankedCells`] as an Arrow record batch with one `input_ids` column (no copy of the tokens)."""
    column = pa.ListArray.from_arrays(pa.array(ranked.offsets.astype(np.int32)), pa.array(ranked.tokens))
    return pa.record_batch([column], schema=RANKED_SCHEMA)


def write_arrow_stream(path, batches) -> None:
    """Write one record batch, or several in order, as an Arrow stream file (the format `datasets` memory-maps)."""
    batches = [batches] if isinstance(batches, pa.RecordBatch) else list(batches)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, batches[0].schema) as writer:
        for batch in batches:
            writer.write_batch(batch)


def _write_ranked_shard(index, block, ranker, folder):
    # One record batch per part: joining the parts first was a copy of every token (a tenth of the time).
    parts = ranker(block)
    path = Path(folder) / f"tokens-{index:05d}.arrow"
    write_arrow_stream(path, [ranked_to_arrow(part) for part in parts])
    return path, sum(len(part) for part in parts)


def _row_slices(block: sp.csr_matrix, entries: int = _CACHE_ENTRIES):
    """Zero-copy CSR views of consecutive rows holding about `entries` stored values each."""
    per_row = max(1, block.nnz // max(block.shape[0], 1))
    step = max(1, entries // per_row)
    for first in range(0, block.shape[0], step):
        yield _csr_row_view(block, slice(first, min(first + step, block.shape[0])))


def _drop_index(function):
    return lambda index, block: function(block)


def _as_csr(block) -> sp.csr_matrix:
    if isinstance(block, sp.csr_matrix):
        return block  # as is: re-wrapping copies arrays that are views (scipy's `prune`)
    if sp.issparse(block):
        return sp.csr_matrix(block)
    return sp.csr_matrix(np.asarray(block))


def _read_json(path):
    if path is None:
        raise FileNotFoundError(
            "Tokenizer file not found: the folder has no vocab.json (saved without its tokenizer)."
        )
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


__all__ = [
    "ColumnPlan",
    "PerturbGenTokenizer",
    "RankedCells",
    "build_column_plan",
    "check_raw_counts",
    "concatenate_ranked",
    "counts_and_genes",
    "library_sizes",
    "pad_ranked",
    "rank_chunk",
    "warn_duplicate_gene_ids",
]
