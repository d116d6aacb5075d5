"""How :func:`jpeft.save` claims a step safely against other writers and readers.

Every save writes into a directory of its own, ``step_<n>.jpeft-tmp-<host>-<pid>-<token>`` (orbax's
own temporary, ``<that>.orbax-checkpoint-tmp``, is unique with it), so concurrent saves never share
files. The finished directory then *claims* the step under an exclusive ``flock`` of the checkpoint
root (readers take it shared while they list and resolve steps):

* a new step is claimed by renaming the temporary to ``step_<n>`` only if neither ``step_<n>`` nor
  ``step_<n>.replaced`` exists; a writer that finds the step taken removes its temporary and gets a
  :class:`jpeft.JpeftError`;
* ``overwrite=True`` moves the old step to ``step_<n>.replaced``, the new one to ``step_<n>``, and
  the old one to ``step_<n>.jpeft-old-<token>``, deleted after the lock is released (a symlinked
  step is unlinked, its target left alone).

Temporaries of writers that died (same host, process gone) are removed by the next claim. Remote
roots (``gs://...``) have no ``flock``; there the renames are all the protection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
from collections.abc import Iterator

import jax
from etils import epath

from jpeft._errors import JpeftError

REPLACED = ".replaced"  # the old checkpoint while overwrite=True swaps in the new one
_TMP = ".jpeft-tmp-"
_OLD = ".jpeft-old-"
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40]
_OWNED = re.compile(r"step_\d+(?:\.jpeft-tmp-|\.jpeft-old-)(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]+(\..*)?")


def rename(src: epath.Path, dst: epath.Path) -> None:
    """The claim's renames go through here, so that a test can interrupt them."""
    src.rename(dst)


def with_suffix(path: epath.Path, suffix: str) -> epath.Path:
    return path.parent / (path.name + suffix)


def token() -> str:
    """A name part unique to this save (the same on every process of a multi-host run)."""
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        value = multihost_utils.broadcast_one_to_all(np.frombuffer(secrets.token_bytes(8), np.uint32))
        return f"mh-0-{''.join(f'{int(v):08x}' for v in value)}"
    return f"{_HOST}-{os.getpid()}-{secrets.token_hex(8)}"


def temporary(final: epath.Path, tag: str) -> epath.Path:
    return with_suffix(final, _TMP + tag)


def is_local(root: epath.Path) -> bool:
    return "://" not in os.fspath(root)


@contextlib.contextmanager
def locked(root: epath.Path, *, shared: bool) -> Iterator[None]:
    """An ``flock`` of the root directory (no-op for a remote or missing root)."""
    if not is_local(root):
        yield
        return
    import fcntl

    try:
        fd = os.open(os.fspath(root), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError:  # a file system without flock (some network mounts): the renames still hold
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def remove(path: epath.Path) -> None:
    """Deletes a directory tree, or only the link when ``path`` is a symlink."""
    if is_local(path) and os.path.islink(os.fspath(path)):
        os.unlink(os.fspath(path))
    elif path.exists():
        path.rmtree()


def _dead_writer(name: str) -> bool:
    m = _OWNED.fullmatch(name)
    if m is None or m.group("host") != _HOST or m.group("pid") == "0":
        return False
    try:
        os.kill(int(m.group("pid")), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def sweep(root: epath.Path) -> None:
    """Removes temporaries and old copies left by writers of this host that no longer run."""
    if not is_local(root):
        return
    for entry in root.iterdir():
        if _dead_writer(entry.name):
            with contextlib.suppress(OSError):
                remove(entry)


def claim(root: epath.Path, tmp: epath.Path, final: epath.Path, step: int, overwrite: bool, tag: str) -> None:
    """Moves the finished ``tmp`` to ``final`` (see the module docstring); raises if the step is taken."""
    replaced = with_suffix(final, REPLACED)
    old = None
    with locked(root, shared=False):
        taken = final.exists() or os.path.islink(os.fspath(final)) or replaced.exists()
        if taken and not overwrite:
            remove(tmp)
            raise JpeftError(
                f"jpeft.save: step {step} was saved at '{final}' by another writer while this save ran, so this "
                "save's copy was discarded and the other's kept whole. Save under another step, or pass "
                "overwrite=True to replace it."
            )
        if taken:
            if final.exists() or os.path.islink(os.fspath(final)):  # else an interrupted overwrite moved it aside
                if replaced.exists() or os.path.islink(os.fspath(replaced)):
                    remove(replaced)
                rename(final, replaced)
            rename(tmp, final)
            old = with_suffix(final, _OLD + tag)
            rename(replaced, old)
        else:
            try:
                rename(tmp, final)
            except OSError as e:  # a non-empty final appeared outside the lock (another jpeft, a remote root)
                remove(tmp)
                raise JpeftError(f"jpeft.save: could not move the new step {step} into '{final}': {e}.") from None
        sweep(root)
    if old is not None:
        remove(old)


def write_failed(error: BaseException, step: int, tmp: epath.Path) -> JpeftError:
    """One error for a save whose writing failed (disk full, quota, permissions), after cleaning up."""
    text = str(error)
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)) or any(
        s in text
        for s in ("RESOURCE_EXHAUSTED", "No space left", "File too large", "os_error_code='28'", "os_error_code='27'")
    )
    for leftover in (tmp, *tmp.parent.glob(tmp.name + ".*")):
        with contextlib.suppress(Exception):
            remove(leftover)
    why = (
        "the disk is full (or a size quota was hit)"
        if full
        else f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"
    )
    return JpeftError(
        f"jpeft.save: writing step {step} to '{tmp}' failed: {why}. Nothing was committed and the existing "
        "checkpoints are untouched; free space (or fix the cause) and save again."
    )
