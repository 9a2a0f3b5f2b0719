"""
The one place that prepares an output folder. Every command that writes a folder builds its result in a hidden
staging folder beside the target and swaps it in only when the whole result is there, so a failure, a bad option
or a kill leaves the previous result (or nothing) rather than half of a new one:

- `check_output_folder` refuses, before any work starts, a target that holds a result and no `--overwrite`, and a
  target that holds files this package did not write (no marker file) unless the user forces it;
- `staged_output_folder` yields the staging folder, turns SIGTERM into an exception while it is open (so the
  clean-up runs), removes the staging folders that killed runs left beside the same target, and on success writes
  the marker and replaces the target.
"""

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path


logger = logging.getLogger(__name__)

# Written into every folder a command produced; `--overwrite` replaces only folders that hold it.
OUTPUT_MARKER = ".perturbgen-hf-output.json"
_STAGING = "staging"
_RETIRED = "replaced"


def check_output_folder(out, overwrite: bool = False, force: bool = False) -> Path:
    """
    Refuse an output folder that cannot be written, before any work starts.

    Args:
        out (`str` or `os.PathLike`): the folder a command will write.
        overwrite (`bool`): replace a folder that holds an earlier result of this package.
        force (`bool`): replace a non-empty folder even without the marker file (its files are deleted).

    Returns:
        `Path`: `out`.

    Raises:
        `FileExistsError`: `out` is a file, or a non-empty folder without `overwrite`, or a folder of other files
        (no marker) without `force`.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"Output path {str(out)!r} is a file, not a folder; choose another --out.")
    if out.is_dir() and any(out.iterdir()):
        if not (overwrite or force):
            raise FileExistsError(f"Output folder {str(out)!r} is not empty; pass --overwrite to replace it.")
        if not force and not (out / OUTPUT_MARKER).is_file():
            raise FileExistsError(
                f"Output folder {str(out)!r} holds files that perturbgen-hf did not write (no {OUTPUT_MARKER}); "
                "--overwrite replaces only an earlier result. Choose another --out, or pass --force-overwrite to "
                "delete its contents."
            )
    return out


@contextlib.contextmanager
def staged_output_folder(out, command: str, overwrite: bool = False, force: bool = False):
    """
    Build a result in a staging folder beside `out` and move it into place only if the block succeeds.

    Args:
        out (`str` or `os.PathLike`): the final folder (checked with [`check_output_folder`]).
        command (`str`): what wrote it (recorded in the marker file).
        overwrite (`bool`), force (`bool`): see [`check_output_folder`].

    Yields:
        `Path`: the empty staging folder to write into.
    """
    out = check_output_folder(out, overwrite, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_STAGING}-{os.getpid()}-", dir=out.parent))
    try:
        with terminate_as_exception():
            yield staging
        write_marker(staging, command)
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_marker(folder, command: str) -> None:
    """Mark `folder` as a result of `command` (what `--overwrite` may replace)."""
    from . import __version__

    (Path(folder) / OUTPUT_MARKER).write_text(json.dumps({"command": command, "version": __version__}) + "\n")


def remove_stale_staging(out) -> list[Path]:
    """Remove the staging folders beside `out` whose process no longer runs (killed runs); returns them."""
    out = Path(out)
    removed = []
    for kind in (_STAGING, _RETIRED):
        for folder in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = folder.name[len(f".{out.name}.{kind}-") :].split("-")[0]
            if folder.is_dir() and pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    if removed:
        logger.warning(
            "Removed %d staging folder(s) left by an interrupted run: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed


@contextlib.contextmanager
def terminate_as_exception():
    """
    While open, SIGTERM (what `kill`, job schedulers and `timeout` send) raises `SystemExit(143)` in this process, so
    `finally` blocks and the staging clean-up run; by default Python dies on SIGTERM without unwinding. Forked
    workers that inherit the handler die as before.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _swap_in(staging: Path, out: Path) -> None:
    # The old result is moved aside first and deleted last: at no moment is there neither the old nor the new one.
    retired = None
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.{_RETIRED}-{os.getpid()}-", dir=out.parent))
        out.rename(retired / out.name)
    staging.rename(out)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
