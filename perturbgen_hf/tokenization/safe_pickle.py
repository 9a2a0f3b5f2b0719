"""Read the original Geneformer / PerturbGen dictionaries (pickles) without executing code."""

import pickle
from pathlib import Path

import numpy as np


# The only globals a dictionary pickle of str -> int/float/str (numpy scalars included) refers to.
_ALLOWED_GLOBALS = {
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class UnsafePickleError(ValueError):
    """The pickle refers to something other than plain dictionaries and numpy scalars."""


class _DictionaryUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"refusing to load {module}.{name}: only plain dictionaries of strings and numbers are accepted"
        )


def load_dictionary_pickle(path, key_type: type = str) -> dict:
    """
    Load a pickled `dict` of `str` keys to `int`, `float`, `str` or numpy scalar values, refusing anything else.

    Args:
        path (`str` or `os.PathLike`): the pickle file.
        key_type (`type`, *optional*, defaults to `str`): the type of every key (`int` for the original PerturbGen's
            token-id -> row-id and row-id -> gene-name maps; numpy integer keys are converted).

    Returns:
        `dict` with numpy scalars converted to Python numbers.

    Raises:
        `FileNotFoundError` if the file is missing; `ValueError` (naming the file) if it holds anything but such a
        dictionary, including a pickle that would import or call other code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Dictionary file not found: {str(path)!r}")
    try:
        with path.open("rb") as handle:
            loaded = _DictionaryUnpickler(handle).load()
    except UnsafePickleError as error:
        raise ValueError(f"{path}: {error}") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as error:
        raise ValueError(f"{path} is not a readable dictionary pickle: {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a dict.")
    converted = {}
    for key, value in loaded.items():
        if isinstance(key, np.generic):
            key = key.item()
        if isinstance(key, bool) or not isinstance(key, key_type):
            raise ValueError(f"{path}: keys must be {key_type.__name__}, found {key!r}.")
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{path}: value of {key!r} is a {type(value).__name__}, not a number or string.")
        converted[key] = value
    return converted
