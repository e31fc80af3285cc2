"""Atomic writes: write a temporary file (or folder) beside the target, then rename it into place.

A rename within one folder is atomic, so a crash (or Ctrl-C, or a full disk) at any moment leaves
either the old complete file or the new complete file, never a truncated one; and of two processes
building the same folder at once, one wins and the other finds it complete.
"""
import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """`with atomic_path(p) as tmp: write(tmp)` — p appears only if the block finishes."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions of a new file
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def atomic_folder(path, write):
    """Build a folder once: write(tmp) fills a temporary sibling, which is then renamed to `path`.
    An existing `path` is reused as it is. Safe when several processes build the same folder at once:
    the first rename wins, and the others drop their copy and use the winner's."""
    if os.path.isdir(path):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".building-")
    try:
        write(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # renaming onto a folder that is not empty: another process finished first
            if not os.path.isdir(path):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
