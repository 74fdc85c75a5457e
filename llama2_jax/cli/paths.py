"""Output paths checked (and their directories created) before a program does any work, so that a missing or
read-only directory does not lose hours of sampling, conversion or evaluation: `python -m train.gatt --out`,
`python -m llama2_jax.convert --dst`, `python -m llama2_jax.evaluate --output_path / --histogram`. Errors are one-line ValueErrors (FileExistsError for a
non-empty --dst) naming the flag."""

from __future__ import annotations

import os
import tempfile


def _check_writable(directory: str, flag: str, path: str) -> None:
    """Create `directory` and write a temporary file in it (permission bits alone miss read-only mounts)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{flag} {path}: {directory} is a file, not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot write in {directory} ({error.strerror or error})") from None


def prepare_output_file(path: str, flag: str) -> None:
    """`path` will be written as a file: it must not be a directory, and its directory is created and writable."""
    if "://" in path:
        return
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a directory; pass a file path")
    _check_writable(os.path.dirname(os.path.abspath(path)), flag, path)


def prepare_output_dir(path: str, flag: str) -> None:
    """`path` will be written as a new directory: it must be absent or an empty directory (else FileExistsError);
    it is created and must be writable."""
    if "://" in path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a directory")
    if os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(f"{flag} {path} exists and is not empty; pick a new directory")
    _check_writable(path, flag, path)


def prepare_results_path(path: str, flag: str) -> None:
    """lm-eval's --output_path: a `.json` file name (written next to it, date-stamped) or a directory the results go
    under; that directory is created and must be writable."""
    if "://" in path:
        return
    _check_writable(os.path.dirname(os.path.abspath(path)) if path.endswith(".json") else path, flag, path)
