"""A tmpfs mounted for one test, for full-disk and read-only faults. Mounting needs root: elsewhere the test is skipped
with the reason."""

import contextlib
import pathlib
import subprocess

import pytest


@contextlib.contextmanager
def mounted_tmpfs(directory: pathlib.Path, options: str):
    """A tmpfs with mount `options` ("size=2m", "size=1m,ro") on `directory` (created), unmounted afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'})")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)
