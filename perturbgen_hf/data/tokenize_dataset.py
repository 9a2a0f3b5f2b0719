"""
AnnData of raw counts -> tokenized, paired source/target dataset on disk (`perturbgen-hf tokenize`).

Output folder:
    dataset/            `datasets.Dataset.save_to_disk`: one row per (source cell, target cells) pair
    tokenizer/          `PerturbGenTokenizer.save_pretrained` (encoder vocabulary, medians, target genes)
    perturbgen_data.json  time points and values, target genes, pairing report, input checksum

Each row: `source_input_ids` (encoder ids, `<cls>` ... `<eos>`); per target time point `target_input_ids` (decoder
ids, genes by rank), `target_condition_ids`, `target_counts_indices`/`target_counts_values` (sparse counts of the
target genes), `target_library_size` (counts of all genes), `target_cell_ids`; `source_cell_id`, `source_group`.
"""

import contextlib
import hashlib
import json
import logging
import re
from functools import partial
from itertools import pairwise
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
from datasets import Dataset, Features, List, Value
from tqdm.auto import tqdm

from ..io_utils import check_tokenizer_folder, read_anndata
from ..output_folder import check_output_folder, staged_output_folder
from ..tokenization import NORMALIZED_TOTAL, PerturbGenTokenizer, check_raw_counts, warn_duplicate_gene_ids
from ..tokenization.chunking import map_row_chunks, read_rows
from ..tokenization.tokenization_perturbgen import write_arrow_stream
from .pairing import pair_cells


logger = logging.getLogger(__name__)

DESCRIPTION_FILE = "perturbgen_data.json"
_NUMBER = re.compile(r"(?P<number>[-+]?\d*\.?\d+)\s*(?P<unit>[a-z]*)", re.IGNORECASE)
# Labels in one data set often mix units ("90min", "6h"): a recognised unit converts the number to hours.
_HOURS_PER_UNIT = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1 / 3600),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 1 / 60),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 1.0),
    **dict.fromkeys(("d", "day", "days"), 24.0),
}

FEATURES = Features(
    {
        "source_input_ids": List(Value("int32")),
        "target_input_ids": List(List(Value("int32"))),
        "target_condition_ids": List(List(Value("int32"))),
        "target_counts_indices": List(List(Value("int32"))),
        "target_counts_values": List(List(Value("float32"))),
        "target_library_size": List(Value("float64")),
        "source_cell_id": Value("string"),
        "target_cell_ids": List(Value("string")),
        "source_group": Value("string"),
    }
)


def file_sha256(path, block=1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_time_points(obs, time_key, time_order=None, time_value_key=None):
    """
    Ordered time point names and their numeric values.

    Values come from `time_value_key` (one value per time point), else from the number in each name, in hours where
    it carries a unit ("6h" -> 6, "90min" -> 1.5, "2d" -> 48; "day3", with the unit first, -> 3), else from the
    position (1, 2, ...). Without `time_order` or an ordered categorical, the order is that of the values.
    """
    if time_key not in obs.columns:
        raise KeyError(f"Time key {time_key!r} is not an obs column; available: {list(obs.columns)}.")
    missing = obs[time_key].isna().to_numpy() | (obs[time_key].astype(str).str.strip() == "").to_numpy()
    if missing.any():
        examples = ", ".join(map(str, obs.index[missing][:3]))
        raise ValueError(
            f"{int(missing.sum())} cell(s) have no time point in obs[{time_key!r}] (NaN or empty), e.g. {examples}; "
            "drop them or fill them in before tokenizing."
        )
    present = obs[time_key].astype(str)
    observed = set(present.unique())
    if time_order:
        unknown = [t for t in time_order if t not in observed]
        if unknown:
            raise ValueError(
                f"Time point(s) {unknown} have no cells in obs[{time_key!r}]; present: {sorted(observed)}."
            )
        order = [str(t) for t in time_order]
    elif _is_ordered_categorical(obs[time_key]):
        order = [str(c) for c in obs[time_key].cat.categories if str(c) in observed]
    else:
        order = sorted(observed, key=lambda t: (_parse_number(t) is None, _parse_number(t) or 0.0, t))
    if time_value_key is not None:
        if time_value_key not in obs.columns:
            raise KeyError(f"Time value key {time_value_key!r} is not an obs column.")
        values = []
        for t in order:
            distinct = pd.unique(obs.loc[present == t, time_value_key])
            if len(distinct) != 1:
                raise ValueError(f"Time point {t!r} has {len(distinct)} different values in {time_value_key!r}.")
            values.append(float(distinct[0]))
        if not time_order and not _is_ordered_categorical(obs[time_key]):
            order, values = map(list, zip(*sorted(zip(order, values), key=lambda pair: pair[1]), strict=True))
    else:
        parsed = [_parse_number(t) for t in order]
        values = parsed if all(v is not None for v in parsed) and len(set(parsed)) == len(parsed) else None
        values = values or [float(i + 1) for i in range(len(order))]
    if any(b <= a for a, b in pairwise(values)):
        raise ValueError(f"Time values {values} of {order} are not increasing; give --time-order or --time-value-key.")
    return order, values


def _is_ordered_categorical(column) -> bool:
    return isinstance(column.dtype, pd.CategoricalDtype) and bool(column.cat.ordered)


def _parse_number(text):
    match = _NUMBER.search(str(text))
    if match is None:
        return None
    return float(match.group("number")) * _HOURS_PER_UNIT.get(match.group("unit").lower(), 1.0)


def select_target_genes(counts, rows, tokenizer, gene_ids, n_genes, include_genes=(), chunk_size=4096):
    """
    The `n_genes` vocabulary genes of largest variance of log1p(counts per 10,000) over the given cells, plus
    `include_genes` (which must be in the vocabulary), in vocabulary order. Streams over chunks of cells.
    """
    token_ids = tokenizer.resolve_genes(gene_ids)
    sums = np.zeros(len(gene_ids))
    squares = np.zeros(len(gene_ids))
    for start in range(0, len(rows), chunk_size):
        chunk = read_rows(counts, rows[start : start + chunk_size])
        totals = np.asarray(chunk.sum(axis=1, dtype=np.float64)).ravel()
        normalized = sp.diags(NORMALIZED_TOTAL / np.where(totals > 0, totals, 1.0)) @ chunk
        normalized.data = np.log1p(normalized.data)
        sums += np.asarray(normalized.sum(axis=0)).ravel()
        squares += np.asarray(normalized.multiply(normalized).sum(axis=0)).ravel()
    variance = squares / len(rows) - (sums / len(rows)) ** 2
    usable = np.flatnonzero((token_ids >= 0) & (sums > 0))
    chosen_tokens = set()
    # Several input columns may be one gene (e.g. orthologs): count distinct genes.
    for token in token_ids[usable[np.argsort(-variance[usable], kind="stable")]]:
        if len(chosen_tokens) == n_genes:
            break
        chosen_tokens.add(int(token))
    for gene in include_genes:
        chosen_tokens.add(tokenizer.gene_to_id(gene))  # KeyError names an unknown gene
    return [tokenizer.id_to_gene(t) for t in sorted(chosen_tokens)]


def tokenize_anndata(
    adata,
    out,
    time_key,
    source,
    targets=None,
    time_order=None,
    time_value_key=None,
    gene_id_key=None,
    dictionaries=None,
    tokenizer=None,
    keep_target_genes=True,
    n_hvg=2000,
    include_genes=(),
    pairing="random",
    pairing_key=None,
    pairing_file=None,
    condition_keys=(),
    seed=0,
    max_length=4096,
    chunk_size=2048,
    num_proc=1,
    overwrite=False,
    force_overwrite=False,
    progress=True,
):
    """
    Tokenize an AnnData of raw counts into a paired training dataset (see the module docstring for the layout).

    Args:
        adata (`str`, `os.PathLike` or `anndata.AnnData`): the data; a path is opened backed and read in chunks.
        out (`str` or `os.PathLike`): output folder (must not exist or be empty unless `overwrite`).
        time_key (`str`): obs column of time points. source (`str`): source time point. targets (`list[str]`,
            *optional*): target time points (default: every later one).
        time_order (`list[str]`, *optional*), time_value_key (`str`, *optional*): see [`resolve_time_points`].
        gene_id_key (`str`, *optional*): var column of gene identifiers (default: `var_names`).
        dictionaries (`list[str]`, *optional*): token dict, median dict [, alias mapping] pickles; without them
            (and without `tokenizer`) the vocabulary is fitted on the data.
        tokenizer ([`PerturbGenTokenizer`] or `str`, *optional*): an existing tokenizer (or a saved model or
            tokenizer folder) to use instead; its target genes are kept when it has them and `keep_target_genes`
            (so a model can be fine-tuned on the data), otherwise selected as below.
        n_hvg (`int`), include_genes (`list[str]`): target genes of the decoder ([`select_target_genes`]).
        pairing (`str`), pairing_key (`str`), pairing_file (`str`): see [`pair_cells`].
        condition_keys (`list[str]`): obs columns whose values become condition tokens of each target.
        seed (`int`): pairing seed. max_length (`int`): longest source sequence. chunk_size (`int`): cells per chunk.
        num_proc (`int`): processes that rank cells in parallel (forked; a backed file is reopened in each).
        overwrite (`bool`): replace an earlier result in `out`; force_overwrite (`bool`): replace any folder (see
            [`perturbgen_hf.output_folder.check_output_folder`]). The new result replaces it only once complete.
        progress (`bool`): show progress bars.

    Returns:
        `dict`: the description written to `perturbgen_data.json`.
    """
    for name, value in (("num_proc", num_proc), ("chunk_size", chunk_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value}.")
    out = check_output_folder(out, overwrite, force_overwrite)
    path = None
    if not isinstance(adata, ad.AnnData):
        path = Path(adata)
        adata = read_anndata(path, backed="r")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"The input is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    obs = adata.obs.copy()
    order, values = resolve_time_points(obs, time_key, time_order, time_value_key)
    time_points = _select_time_points(order, source, targets)
    for key in [*condition_keys, *([pairing_key] if pairing_key else [])]:
        if key not in obs.columns:
            raise KeyError(f"{key!r} is not an obs column; available: {list(obs.columns)}.")
    gene_ids = gene_identifiers(adata, gene_id_key)
    if isinstance(tokenizer, (str, Path)):
        check_tokenizer_folder(tokenizer)
        tokenizer = PerturbGenTokenizer.from_pretrained(tokenizer)
    cell_rows = np.flatnonzero(obs[time_key].astype(str).isin(time_points).to_numpy())
    tokenizer = tokenizer or _build_tokenizer(adata.X, cell_rows, gene_ids, dictionaries, max_length)
    if gene_id_key is not None:
        tokenizer.add_symbols(gene_ids, list(adata.var_names))
    condition_tokens = _condition_tokens(obs, cell_rows, condition_keys)
    if getattr(tokenizer, "target_genes", None) and keep_target_genes:
        # A model's tokenizer: its decoder genes stay, so the data fit the model (fine-tuning).
        if list(tokenizer.condition_tokens) != condition_tokens:
            raise ValueError(
                f"The tokenizer's condition tokens {tokenizer.condition_tokens} differ from the data's "
                f"{condition_tokens} (from --condition-keys)."
            )
    else:
        targets_genes = select_target_genes(adata.X, cell_rows, tokenizer, gene_ids, n_hvg, include_genes)
        tokenizer.set_target_genes(targets_genes, condition_tokens)

    mapping = pd.read_csv(pairing_file) if pairing == "mapping" and pairing_file else None
    counts = adata.X if pairing == "transport" else None
    pairs, report = pair_cells(obs, time_key, time_points, pairing, pairing_key, mapping, seed, counts=counts)
    with staged_output_folder(out, "tokenize", overwrite, force_overwrite) as staging:
        cell_paths, empty_cells = _tokenize_cells(
            adata.X, cell_rows, tokenizer, gene_ids, max_length, chunk_size, num_proc, progress, staging
        )
        conditions = _condition_ids(obs, condition_keys, tokenizer)
        pairs_path = _write_pairs(pairs, cell_rows, cell_paths, obs, conditions, pairing_key, staging, progress)
        description = _describe(
            path,
            adata,
            time_key,
            time_points,
            order,
            values,
            tokenizer,
            report,
            pairing,
            pairing_key,
            condition_keys,
            seed,
            max_length,
            empty_cells,
            gene_id_key,
        )
        _finish_output(staging, pairs_path, cell_paths, tokenizer, description, progress)
    return description


def _select_time_points(order, source, targets):
    if source not in order:
        raise ValueError(f"Source time point {source!r} is not in the data; time points: {order}.")
    if targets:
        unknown = [t for t in targets if t not in order]
        if unknown:
            raise ValueError(f"Target time point(s) {unknown} are not in the data; time points: {order}.")
        if source in targets:
            raise ValueError(f"The source time point {source!r} cannot also be a target.")
        targets = sorted(targets, key=order.index)
    else:
        targets = order[order.index(source) + 1 :]
        if not targets:
            raise ValueError(f"No time point after the source {source!r}; give --targets.")
    return [source, *targets]


def gene_identifiers(adata, gene_id_key=None) -> list[str]:
    """The gene identifier of every var of `adata`: `var[gene_id_key]` ("" where missing) or the var names; repeated
    identifiers are reported (their counts are summed into one token).
    """
    if gene_id_key is None:
        ids = [str(g) for g in adata.var_names]
    elif gene_id_key not in adata.var.columns:
        raise KeyError(f"Gene id key {gene_id_key!r} is not a var column; available: {list(adata.var.columns)}.")
    else:
        ids = ["" if pd.isna(g) else str(g) for g in adata.var[gene_id_key]]
    warn_duplicate_gene_ids(ids, f"var[{gene_id_key!r}]" if gene_id_key else "var_names")
    return ids


def _build_tokenizer(counts, rows, gene_ids, dictionaries, max_length):
    if dictionaries:
        if len(dictionaries) not in (2, 3):
            raise ValueError("--dictionaries takes TOKEN_PKL MEDIAN_PKL [MAPPING_PKL].")
        return PerturbGenTokenizer.from_dictionaries(*dictionaries, model_max_length=max_length)
    usable = [i for i, g in enumerate(gene_ids) if g]
    matrix = read_rows(counts, rows)[:, usable]
    return PerturbGenTokenizer.fit(matrix, [gene_ids[i] for i in usable], model_max_length=max_length)


def _condition_tokens(obs, rows, condition_keys):
    tokens = []
    for key in condition_keys:
        tokens += [f"{key}={v}" for v in sorted(obs.iloc[rows][key].astype(str).unique())]
    return tokens


def _rank_block(index, block, tokenizer, gene_ids, max_length, folder):
    """
    Everything the dataset needs from a block of cells, written by the worker itself to `cells-<index>.arrow`
    (only the path and two counts travel back to the parent process).
    """
    check_raw_counts(block.data, "X")
    source = tokenizer.rank_block(block, gene_ids, max_length, check_counts=False)
    target = tokenizer.rank_block(block, gene_ids, targets=True, check_counts=False)
    counts = tokenizer.target_counts(block, gene_ids)
    library = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
    columns = [
        _list_array(source.offsets, source.tokens),
        _list_array(target.offsets, target.tokens),
        _list_array(counts.indptr, counts.indices.astype(np.int32)),
        _list_array(counts.indptr, counts.data.astype(np.float32)),
        pa.array(library),
    ]
    path = Path(folder) / f"cells-{index:05d}.arrow"
    write_arrow_stream(path, pa.record_batch(columns, schema=_CELLS_SCHEMA))
    return path, block.shape[0], int((source.lengths() <= 2).sum())


def _list_array(offsets, values):
    return pa.ListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int32)), pa.array(values))


_CELLS_SCHEMA = pa.schema(
    [
        ("source", pa.list_(pa.int32())),
        ("target", pa.list_(pa.int32())),
        ("counts_indices", pa.list_(pa.int32())),
        ("counts_values", pa.list_(pa.float32())),
        ("library", pa.float64()),
    ]
)


def _tokenize_cells(counts, rows, tokenizer, gene_ids, max_length, chunk_size, num_proc, progress, staging):
    """Rank every used cell (in `rows` order) into Arrow shards in `staging`; returns their paths."""
    function = partial(_rank_block, tokenizer=tokenizer, gene_ids=gene_ids, max_length=max_length, folder=staging)
    paths, empty = [], 0
    bar = tqdm(total=len(rows), desc="tokenizing cells", unit="cell", disable=not progress)
    for path, num_cells, empty_in_block in map_row_chunks(counts, function, chunk_size, num_proc, rows=rows):
        paths.append(path)
        empty += empty_in_block
        bar.update(num_cells)
    bar.close()
    if empty:
        logger.warning("%d cells express no vocabulary gene; their source sequences hold only <cls> <eos>.", empty)
    return paths, empty


def _read_shards(paths) -> pa.Table:
    """The shards as one table, memory-mapped (nothing is copied into memory)."""
    return pa.concat_tables([pa.ipc.open_stream(pa.memory_map(str(p))).read_all() for p in paths])


def _condition_ids(obs, condition_keys, tokenizer) -> np.ndarray:
    """Decoder ids of each cell's condition tokens, `(num_cells, num_condition_keys)`."""
    columns = [
        [
            tokenizer.condition_token_id(f"{key}={value}") if f"{key}={value}" in tokenizer.condition_tokens else -1
            for value in obs[key].astype(str)
        ]
        for key in condition_keys
    ]
    return np.array(columns, dtype=np.int32).T.reshape(len(obs), len(condition_keys))


def _nested(values, width: int) -> pa.Array:
    """Group a flat (possibly chunked) array of `n * width` items into `n` lists of `width`."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()  # only a batch's worth: the cells table itself stays memory-mapped
    return pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, width, dtype=np.int32)), values)


def _fixed_lists(values: np.ndarray) -> pa.Array:
    """Rows of a 2-D int array as Arrow lists (possibly empty)."""
    rows, width = values.shape
    return pa.ListArray.from_arrays(
        pa.array(np.arange(rows + 1, dtype=np.int32) * width), pa.array(values.ravel(), pa.int32())
    )


def _write_pairs(pairs, cell_rows, cell_paths, obs, conditions, pairing_key, staging, progress, batch_size=4096):
    """Assemble the dataset rows from the memory-mapped cells table, a batch of pairs at a time."""
    cells = _read_shards(cell_paths)
    names = obs.index.astype(str).to_numpy()
    groups = obs[pairing_key].astype(str).to_numpy() if pairing_key else np.full(len(obs), "", dtype=object)
    num_targets = pairs.shape[1] - 1
    path = staging / "pairs.arrow"
    schema = FEATURES.arrow_schema
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in tqdm(range(0, len(pairs), batch_size), desc="writing pairs", unit="batch", disable=not progress):
            batch = pairs[start : start + batch_size]
            source_pos = np.searchsorted(cell_rows, batch[:, 0])
            target_pos = np.searchsorted(cell_rows, batch[:, 1:]).ravel()
            columns = {
                "source_input_ids": cells["source"].take(source_pos).combine_chunks(),
                "target_input_ids": _nested(cells["target"].take(target_pos), num_targets),
                "target_condition_ids": _nested(_fixed_lists(conditions[batch[:, 1:].ravel()]), num_targets),
                "target_counts_indices": _nested(cells["counts_indices"].take(target_pos), num_targets),
                "target_counts_values": _nested(cells["counts_values"].take(target_pos), num_targets),
                "target_library_size": _nested(cells["library"].take(target_pos), num_targets),
                "source_cell_id": pa.array(names[batch[:, 0]].tolist(), pa.string()),
                "target_cell_ids": _nested(pa.array(names[batch[:, 1:].ravel()].tolist(), pa.string()), num_targets),
                "source_group": pa.array(groups[batch[:, 0]].tolist(), pa.string()),
            }
            writer.write_batch(pa.record_batch([columns[f.name] for f in schema], schema=schema))
    return path


def _describe(
    path,
    adata,
    time_key,
    time_points,
    order,
    values,
    tokenizer,
    report,
    pairing,
    pairing_key,
    condition_keys,
    seed,
    max_length,
    empty_cells,
    gene_id_key,
):
    value_of = dict(zip(order, values))
    return {
        "input": {
            "path": str(path) if path else None,
            "sha256": file_sha256(path) if path else None,
            "cells": int(adata.n_obs),
            "genes": int(adata.n_vars),
            "gene_id_key": gene_id_key,
        },
        "time_key": time_key,
        "source": time_points[0],
        "source_time_value": value_of[time_points[0]],
        "time_points": time_points[1:],
        "time_values": [value_of[t] for t in time_points[1:]],
        "num_target_genes": tokenizer.num_target_genes,
        "condition_keys": list(condition_keys),
        "condition_tokens": tokenizer.condition_tokens,
        "pairing": {"mode": pairing, "key": pairing_key, "seed": seed, **report},
        "max_length": max_length,
        "cells_without_vocabulary_genes": empty_cells,
        "vocabulary_size": tokenizer.vocab_size,
    }


def _finish_output(staging, pairs_path, temporary, tokenizer, description, progress):
    dataset = Dataset.from_file(str(pairs_path))  # memory-mapped, no cache files elsewhere
    with _datasets_progress(progress):
        dataset.save_to_disk(str(staging / "dataset"))
    del dataset
    for path in [pairs_path, *temporary]:
        path.unlink()
    tokenizer.save_pretrained(staging / "tokenizer")
    (staging / DESCRIPTION_FILE).write_text(json.dumps(description, indent=2))


@contextlib.contextmanager
def _datasets_progress(progress):
    """`datasets`' own progress bars follow `progress` (they are global switches)."""
    from datasets.utils import logging as datasets_logging

    enabled = datasets_logging.is_progress_bar_enabled()
    if enabled and not progress:
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled and not progress:
            datasets_logging.enable_progress_bar()


def load_description(folder) -> dict:
    """The `perturbgen_data.json` of a tokenized folder."""
    path = Path(folder) / DESCRIPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a tokenized folder (no {DESCRIPTION_FILE}).")
    return json.loads(path.read_text())


__all__ = ["load_description", "pair_cells", "resolve_time_points", "select_target_genes", "tokenize_anndata"]
