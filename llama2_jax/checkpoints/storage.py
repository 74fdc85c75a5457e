"""Writing outputs under faults: a full disk told in one line, and no half-written output directory left behind.

`is_disk_full(error)` recognises ENOSPC however it arrives (an OSError, or TensorStore's text through Orbax).
Importing this module installs a filter on the absl logger that drops Orbax's records of a disk-full save (each failed
background save is logged several times with full tracebacks); the caller reports it in one line instead.
`write_new_dir(dst, write)` runs `write()` into a new (or empty) directory: on failure what it wrote is removed, so a
retry is not refused for a non-empty destination; on success the files get normal permissions under the umask.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import shutil
import sys
from typing import Callable, TypeVar

T = TypeVar("T")
DISK_FULL_MARKS = ("No space left on device", "os_error_code='28'")


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC, raised directly or reported as text (TensorStore: RESOURCE_EXHAUSTED ... os_error_code='28')."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if any(mark in str(error) for mark in DISK_FULL_MARKS):
            return True
        error = error.__cause__ or error.__context__
    return False


def is_io_error(error: BaseException) -> bool:
    """An OSError anywhere in the chain (a read-only or failing disk, EIO), or a full disk reported as text."""
    if is_disk_full(error):
        return True
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            return True
        error = error.__cause__ or error.__context__
    return False


class _DropDiskFullLogs(logging.Filter):
    """Drops Orbax's records of a save that failed on the disk (a full or read-only one): each is logged several times
    with full tracebacks from its background threads, and the caller (TrainCheckpointer) reports it in one line."""
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        error = record.exc_info[1] if record.exc_info else None
        if error is not None:
            text += str(error)
            if f"{os.sep}orbax{os.sep}" in (record.pathname or "") and is_io_error(error):
                return False
        return not any(mark in text for mark in DISK_FULL_MARKS)


_FILTER = _DropDiskFullLogs()
logging.getLogger("absl").addFilter(_FILTER)


def _is_late_orbax_failure(unraisable) -> bool:
    """A callback into Orbax's closed event loop, or an Orbax coroutine closed with its read's error unretrieved."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)  # set on coroutine objects only
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _closed_loop_hook(previous):
    def hook(unraisable):
        if not _is_late_orbax_failure(unraisable):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    return hook


def drop_closed_loop_callbacks() -> None:
    """When an Orbax read or write fails (a cut file, a full disk), TensorStore finishes the other operations of that
    call and calls back into the event loop Orbax has closed meanwhile, and the reads of the other arrays end as
    coroutines whose errors nobody retrieves; Python prints each as an "Exception ignored" traceback (with the
    TensorStore spec: hundreds of lines). The failure itself is reported once, by the caller, so those are dropped
    from the first call on (other unraisable exceptions are reported as before); call it before an Orbax write and
    after a failed read."""
    if not getattr(sys.unraisablehook, "drops_closed_loop_callbacks", False):
        sys.unraisablehook = _closed_loop_hook(sys.unraisablehook)


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of the error's text, without TensorStore's "See full TensorStore details: <spec ...>" tail."""
    lines = str(error).strip().splitlines()
    line = lines[0].split(" See full TensorStore details:")[0] if lines else type(error).__name__
    return line[:limit]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_permissions(root) -> None:
    """Files 0666 and directories 0777 under the umask (0644 / 0755 for the usual 022) below `root`: some writers
    (safetensors) create files 0600 through a temporary file."""
    mask = _umask()
    for directory, subdirs, files in os.walk(root):
        os.chmod(directory, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o666 & ~mask)


def write_new_dir(dst, write: Callable[[], T], *, created: bool | None = None) -> T:
    """`write()` fills `dst` (new or empty). On any failure everything under `dst` is removed (and `dst` itself when
    this call created it, or `created` says the caller did); a full disk becomes one OSError line. Returns what
    `write` returns."""
    dst = pathlib.Path(dst)
    existed = dst.exists() if created is None else not created
    drop_closed_loop_callbacks()
    try:
        result = write()
    except BaseException as error:
        if existed:
            for child in dst.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        else:
            shutil.rmtree(dst, ignore_errors=True)
        if isinstance(error, Exception) and is_disk_full(error):
            raise OSError(errno.ENOSPC, f"no space left on the device of {dst} (the partial output was removed; "
                                        "free space and retry)") from None
        raise
    if dst.exists():
        normal_permissions(dst)
    return result
