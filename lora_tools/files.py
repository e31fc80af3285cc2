"""Atomic file writes: write a temporary file beside the target, then rename it over the target.

A rename within one folder is atomic, so a crash (or Ctrl-C, or a full disk) at any moment leaves
either the old complete file or the new complete file, never a truncated one.
"""
import contextlib
import os
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
