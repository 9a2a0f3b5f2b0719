"""Read a count matrix (in memory or a backed h5ad) in blocks of rows, optionally in several processes."""

import multiprocessing
import threading
from collections.abc import Callable, Iterator

import numpy as np
import scipy.sparse as sp


_WORKER_STATE = {}


def read_rows(counts, rows) -> sp.csr_matrix:
    """
    Rows of a matrix as CSR. `rows` is a `slice` or sorted positions; sorted positions that form a contiguous run
    are read as one slice (a backed h5ad reads a slice about 400x faster than scattered rows).
    """
    if not isinstance(rows, slice):
        rows = np.asarray(rows)
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
            rows = slice(int(rows[0]), int(rows[-1]) + 1)
    if isinstance(rows, slice) and rows.step in (None, 1) and _is_csr(counts):
        block = _csr_row_view(counts, rows)
    else:
        block = counts[rows]
        block = sp.csr_matrix(block) if sp.issparse(block) else sp.csr_matrix(np.asarray(block))
    check_csr_structure(block, counts, rows)
    return block


def _is_csr(counts) -> bool:
    return sp.issparse(counts) and counts.format == "csr"


def _csr_row_view(counts, rows: slice) -> sp.csr_matrix:
    """Consecutive rows of an in-memory CSR matrix without copying its arrays (scipy's slicing copies them)."""
    first, last, _ = rows.indices(counts.shape[0])
    lo, hi = counts.indptr[first], counts.indptr[last]
    return csr_view(counts.data[lo:hi], counts.indices[lo:hi], counts.indptr[first : last + 1] - lo, counts.shape[1])


def csr_view(data, indices, indptr, num_columns: int) -> sp.csr_matrix:
    """
    A CSR matrix on the given arrays, without copying them: scipy's constructor copies index and data arrays that
    are views of much larger ones (`prune`), which cost a tenth of the tokenizer's time. The caller vouches for the
    structure, or checks it with [`check_csr_structure`].
    """
    matrix = sp.csr_matrix((len(indptr) - 1, num_columns), dtype=data.dtype)
    matrix.data, matrix.indices, matrix.indptr = data, indices, indptr
    return matrix


def check_csr_structure(block: sp.csr_matrix, counts=None, rows=None) -> None:
    """
    Raise a `ValueError` if a CSR block's structure is inconsistent (column indices out of range, row pointers that
    decrease): what bytes corrupted inside an h5ad's `X` produce. The compiled sparse kernels do not check this and
    crash the process (a segmentation fault) instead of raising.
    """
    problem = _csr_problem(block)
    if problem is not None:
        location = _backed_location(counts) if counts is not None else None
        where = f" of {location[0]!r} ({location[1]})" if location else ""
        if isinstance(rows, slice):
            span = f"rows {rows.start}-{rows.stop - 1}"
        elif rows is not None and len(rows):
            span = f"rows {int(np.min(rows))}-{int(np.max(rows))}"
        else:
            span = "the matrix"
        raise ValueError(f"The count matrix{where} is corrupted in {span}: {problem}.")


def _csr_problem(block: sp.csr_matrix) -> str | None:
    """What is wrong with a CSR block's arrays, or None (the checks of scipy's `check_format`, without its copies)."""
    indptr, indices = block.indptr, block.indices
    if len(indptr) != block.shape[0] + 1:
        return f"index pointer has {len(indptr)} entries for {block.shape[0]} rows"
    if len(indices) != len(block.data):
        return f"{len(indices)} column indices for {len(block.data)} values"
    if indptr[0] != 0 or indptr[-1] != len(indices):
        return f"index pointer runs from {indptr[0]} to {indptr[-1]} over {len(indices)} entries"
    if len(indptr) > 1 and np.diff(indptr).min() < 0:
        return "index pointer decreases"
    if len(indices) and (indices.min() < 0 or indices.max() >= block.shape[1]):
        return f"column indices outside 0-{block.shape[1] - 1}"
    return None


def row_blocks(num_rows: int, chunk_size: int, rows=None) -> list:
    """The row selections of each block: slices of `range(num_rows)`, or pieces of the sorted positions `rows`."""
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be positive, got {chunk_size}.")
    if rows is None:
        return [slice(start, min(start + chunk_size, num_rows)) for start in range(0, num_rows, chunk_size)]
    rows = np.asarray(rows)
    return [rows[start : start + chunk_size] for start in range(0, len(rows), chunk_size)]


def _backed_location(counts):
    """(file name, dataset name) of a backed AnnData matrix, or None for an in-memory one."""
    group = getattr(counts, "group", None)
    if group is None or not hasattr(group, "file"):
        return None
    return group.file.filename, group.name


def _open_backed(location):
    import h5py
    from anndata.io import sparse_dataset

    filename, name = location
    handle = h5py.File(filename, "r")
    return sparse_dataset(handle[name]) if isinstance(handle[name], h5py.Group) else handle[name]


def _initialise_worker(location, counts, function):
    # A backed file is reopened in each process: HDF5 handles must not be shared across fork.
    _WORKER_STATE["counts"] = _open_backed(location) if location is not None else counts
    _WORKER_STATE["function"] = function


def _run_block(task):
    index, block = task
    return _WORKER_STATE["function"](index, read_rows(_WORKER_STATE["counts"], block))


def map_row_chunks(counts, function: Callable, chunk_size: int = 2048, num_proc: int = 1, rows=None) -> Iterator:
    """
    Apply `function` to consecutive blocks of rows (as CSR) and yield the results in order.

    Args:
        counts: a scipy sparse matrix, a dense array or a backed AnnData's `X`.
        function (`callable`): takes the block's index and the block (a `scipy.sparse.csr_matrix`) and returns
            anything picklable. Returning something small (say, the path of a file the function wrote) keeps the
            parent process idle, which matters when the processes outnumber the cores.
        chunk_size (`int`, *optional*, defaults to 2048): rows per block.
        num_proc (`int`, *optional*, defaults to 1): worker processes (forked; a backed file is reopened in each).
        rows (`np.ndarray`, *optional*): sorted row positions to read instead of all rows.

    Memory stays bounded by a few blocks per process, whatever the number of rows.
    """
    blocks = row_blocks(counts.shape[0], chunk_size, rows)
    if num_proc <= 1 or len(blocks) <= 1:
        for index, block in enumerate(blocks):
            yield function(index, read_rows(counts, block))
        return
    location = _backed_location(counts)
    context = multiprocessing.get_context("fork")
    # At most a few blocks per process are in flight (handed out but not yet consumed): memory stays bounded, and
    # unlike fixed windows of blocks, no worker waits for another at a window's end.
    in_flight = threading.Semaphore(4 * num_proc)
    stopped = threading.Event()

    def feed():
        for task in enumerate(blocks):
            in_flight.acquire()
            if stopped.is_set():
                return
            yield task

    with context.Pool(num_proc, _initialise_worker, (location, None if location else counts, function)) as pool:
        try:
            for result in pool.imap(_run_block, feed(), chunksize=1):
                in_flight.release()
                yield result
        finally:
            # Let the feeding thread finish if the consumer stops early (or fails), so the pool can shut down.
            stopped.set()
            in_flight.release()
