"""
The one place that opens user files: h5ad inputs and model folders. Each check turns what would be a library's
traceback (h5py's "file signature not found", transformers' Hub connection error, safetensors' header error) into
one error that names the file and what is wrong with it.
"""

import contextlib
import json
import os
import re
import struct
from pathlib import Path


# An HDF5 file starts with this signature at offset 0, 512, 1024, 2048, ... (a user block may precede it).
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# A Hugging Face Hub repository id: "name" or "owner/name", letters, digits, "-", "_", ".".
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def read_anndata(data, what: str = "input", backed: str | None = None):
    """
    An AnnData from a path to an h5ad file, or the AnnData itself.

    Args:
        data (`str`, `os.PathLike` or `anndata.AnnData`): the h5ad file or the object.
        what (`str`): how errors name it ("input", "source", ...).
        backed (`str`, *optional*): `anndata.read_h5ad`'s `backed` ("r" reads `X` lazily).

    Returns:
        `anndata.AnnData`.

    Raises:
        `TypeError`: for an array, matrix or data frame (an AnnData carries the gene ids these need).
        `FileNotFoundError`, `ValueError`: a missing file, a folder, an empty file, a file that is not HDF5 (a CSV
        or text file), or one HDF5 cannot read (truncated, corrupted).
    """
    import anndata as ad

    if isinstance(data, ad.AnnData):
        return data
    if not isinstance(data, (str, os.PathLike)):
        raise TypeError(
            f"The {what} must be an AnnData or the path of an .h5ad file, got {type(data).__name__}; wrap a matrix "
            "as anndata.AnnData(X, var=pandas.DataFrame(index=gene_ids)) so that its genes are named."
        )
    path = Path(data)
    check_h5ad_file(path, what)
    try:
        adata = ad.read_h5ad(path, backed=backed)
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise ValueError(f"Could not read the {what} file {str(path)!r} as h5ad ({_first_line(error)}).") from None
    if backed is None:  # a backed matrix is checked block by block as it is read (`read_rows`)
        _check_matrix_structure(adata, path, what)
    return adata


def _check_matrix_structure(adata, path, what) -> None:
    # Bytes corrupted inside a sparse X read without complaint, then crash the compiled sparse kernels (a
    # segmentation fault) wherever the matrix is first used; checked here, they are one error naming the file.
    import scipy.sparse as sp

    for name, matrix in [("X", adata.X), *((f"layers[{k!r}]", v) for k, v in adata.layers.items())]:
        if sp.issparse(matrix) and matrix.format in ("csr", "csc"):
            try:
                matrix.check_format(full_check=True)
            except ValueError as error:
                raise ValueError(
                    f"The {what} file {str(path)!r} is corrupted: its {name} is not a valid sparse matrix ({error})."
                ) from None


def read_yaml_options(path, what: str = "config") -> dict:
    """
    The mapping of option names to values in a YAML file.

    Raises:
        `FileNotFoundError`: no such file. `ValueError`: YAML that does not parse (with the line and column), or a
        file that holds something other than a mapping.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"The {what} {str(path)!r} does not exist" + (" (it is a folder)." if path.is_dir() else ".")
        )
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ValueError(f"The {what} {str(path)!r} is not valid YAML{where}: {problem}.") from None
    except UnicodeDecodeError:
        raise ValueError(f"The {what} {str(path)!r} is not a text (YAML) file.") from None
    values = values or {}
    if not isinstance(values, dict):
        raise ValueError(
            f"The {what} {str(path)!r} must hold a mapping of option names to values, not a {type(values).__name__}."
        )
    return values


def check_tokenizer_folder(path) -> None:
    """Raise a one-line error unless `path` is a saved tokenizer (or model) folder: it must hold `vocab.json`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Tokenizer folder {str(path)!r} does not exist.")
    if not path.is_dir():
        raise NotADirectoryError(f"Tokenizer {str(path)!r} is a file; give the folder of a saved model or tokenizer.")
    if not (path / "vocab.json").is_file():
        inside = path / "tokenizer"
        hint = (
            f" (a tokenized-data folder? its tokenizer is {str(inside)!r})"
            if (inside / "vocab.json").is_file()
            else ""
        )
        raise FileNotFoundError(f"{str(path)!r} is not a tokenizer folder: it has no vocab.json{hint}.")


def check_h5ad_file(path, what: str = "input") -> None:
    """Refuse a path that is missing, a folder, empty, or not an HDF5 file, naming it (see [`read_anndata`])."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"The {what} file {str(path)!r} does not exist.")
    if path.is_dir():
        raise ValueError(f"The {what} {str(path)!r} is a folder; give an .h5ad file.")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"The {what} file {str(path)!r} is empty.")
    with path.open("rb") as handle:
        offset = 0
        while offset < size:
            handle.seek(offset)
            if handle.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                return
            offset = 512 if offset == 0 else offset * 2
        handle.seek(0)
        start = handle.read(256)
    kind = "a text or CSV file" if _looks_like_text(start) else "not an HDF5 file"
    raise ValueError(
        f"The {what} file {str(path)!r} is {kind}, not an h5ad (AnnData's HDF5 format); convert it first, e.g. "
        "anndata.read_csv(...).write_h5ad(...) or scanpy.read_10x_mtx(...).write_h5ad(...)."
    )


def check_model_location(model, needs_tokenizer: bool = True) -> None:
    """
    Refuse a `--model` that cannot be a model, before transformers tries it: a path that does not exist (and, as
    a Hub id, cannot be fetched offline), a tokenized-data folder, an empty folder, an interrupted training run, a
    corrupted `config.json`, missing or truncated weights, or (with `needs_tokenizer`) no tokenizer files. A Hub id
    with the network on is left to transformers.
    """
    text = str(model)
    path = Path(model)
    if not path.exists():
        hub_like = bool(_HUB_ID.match(text)) and not text.startswith(".")
        if hub_like and os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes", "on"):
            return
        detail = (
            " and, as a Hugging Face Hub id, it cannot be fetched with HF_HUB_OFFLINE set"
            if hub_like
            else " (and it is not a Hugging Face Hub id)"
        )
        raise FileNotFoundError(f"Model {text!r} not found: there is no such folder{detail}.")
    if not path.is_dir():
        raise ValueError(f"Model {text!r} is a file; give the model's folder (config.json and model.safetensors).")
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"Model folder {text!r} has no config.json: {_what_folder_is_instead(path)}")
    try:
        description = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"Model folder {text!r}: config.json is not valid JSON ({error}).") from None
    if not isinstance(description, dict) or "model_type" not in description:
        raise ValueError(f"Model folder {text!r}: config.json names no model_type; it is not a saved model.")
    weights = [name for name in _WEIGHT_FILES if (path / name).is_file()]
    if not weights:
        raise ValueError(
            f"Model folder {text!r} has config.json but no weights (model.safetensors): {_what_folder_is_instead(path)}"
        )
    if weights[0] == "model.safetensors":
        check_safetensors_file(path / "model.safetensors")
    if needs_tokenizer and not (path / "vocab.json").is_file():
        raise ValueError(
            f"Model folder {text!r} has no tokenizer (vocab.json): it was saved without it; save the tokenizer of "
            "its training data there too (PerturbGenTokenizer.from_pretrained(DATA / 'tokenizer').save_pretrained)."
        )


def check_safetensors_file(path) -> None:
    """Refuse a safetensors file whose header is unreadable or whose tensors run past its end (a truncated copy)."""
    path = Path(path)
    size = path.stat().st_size
    problem = None
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            problem = f"{size} bytes, shorter than a safetensors header"
        else:
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > size - 8:
                problem = "its header is longer than the file"
            else:
                try:
                    header = json.loads(handle.read(header_size))
                    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError):
                    problem = "its header is not a safetensors header"
                else:
                    needed = 8 + header_size + max(ends, default=0)
                    if needed > size:
                        problem = f"truncated: its tensors need {needed} bytes, the file has {size}"
    if problem:
        raise ValueError(f"Weights file {str(path)!r} is damaged ({problem}); copy or save the model again.")


@contextlib.contextmanager
def model_load_errors(model):
    """Turn what `from_pretrained` raises on a bad model folder (OSError, size mismatches) into one line naming it."""
    try:
        yield
    except OSError as error:
        raise ValueError(f"Could not load model {str(model)!r}: {_first_line(error)}") from None
    except RuntimeError as error:
        if not any(word in str(error) for word in ("size mismatch", "ignore_mismatched_sizes")):
            raise
        raise ValueError(
            f"Could not load model {str(model)!r}: its weights do not match the sizes its config.json gives "
            f"({_first_line(error)})."
        ) from None


def load_model_folder(model):
    """
    The model and tokenizer saved in one folder, after [`check_model_location`], with loading errors as one line;
    the tokenizer is checked against the model's vocabularies.

    Returns:
        `tuple`: ([`PerturbGenForConditionalGeneration`] in eval mode, [`PerturbGenTokenizer`]).
    """
    from .modeling import PerturbGenForConditionalGeneration
    from .tokenization import PerturbGenTokenizer

    check_model_location(model)
    with model_load_errors(model):
        loaded = PerturbGenForConditionalGeneration.from_pretrained(model).eval()
        tokenizer = PerturbGenTokenizer.from_pretrained(model)
    tokenizer.check_model_compatibility(loaded)
    return loaded, tokenizer


def _what_folder_is_instead(path: Path) -> str:
    if (path / "perturbgen_data.json").is_file():
        return "it is a tokenized-data folder (perturbgen-hf tokenize's output); pass it as --data, not --model."
    checkpoints = sorted(
        (p for p in path.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    if checkpoints:
        return (
            f"training did not finish; its last checkpoint is {str(checkpoints[-1])!r} (load that folder, or "
            "resume with perturbgen-hf train ... --resume_from_checkpoint)."
        )
    if not any(path.iterdir()):
        return "the folder is empty."
    return "it is not a saved model."


def _looks_like_text(start: bytes) -> bool:
    try:
        start.decode("utf-8")
    except UnicodeDecodeError as error:
        return error.start >= len(start) - 3  # only a character cut at the end of the sample
    return b"\x00" not in start


def _first_line(error) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


__all__ = [
    "check_h5ad_file",
    "check_model_location",
    "check_safetensors_file",
    "load_model_folder",
    "model_load_errors",
    "read_anndata",
]
