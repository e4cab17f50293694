"""The one way the project writes files: a temporary file beside the target, then a rename.

A reader never sees a half-written file; a failure (an exception, a full disk) leaves the
previous file as it was and no temporary file behind; files get the mode a plain
``open()`` would give them. :func:`atomic_write_all` extends the promise to a group of
files that must appear together or not at all (the two outputs of a weight conversion),
:func:`atomic_write_dir` to a whole folder (a generated dataset).
Streams that grow line by line (``log.txt``, ``metrics.json``, TensorBoard events) are
appended to instead.
"""
import errno
import json
import math
import os
import shutil
import tempfile
from typing import Callable, List, Optional, Sequence, Tuple

from .errors import WrnDetError

__all__ = ["read_json", "atomic_write", "atomic_write_all", "atomic_write_dir", "atomic_save", "write_text",
           "write_json", "save_figure", "check_output_dir", "json_value"]

Writer = Callable[[str], None]


def read_json(path: str, what: str = ""):
    """Return the parsed contents of the JSON file at ``path``.

    Raises :class:`WrnDetError` in one line starting with ``what`` (say ``results file``) and
    the path for a file that cannot be read, is not UTF-8 or is not valid JSON.
    """
    name = f"{what} {path}" if what else path
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise WrnDetError(f"{name}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise WrnDetError(f"{name}: not a JSON text file (it is not UTF-8)") from None
    except OSError as e:
        raise WrnDetError(f"{name} cannot be read: {e.strerror or e}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _umask_mode() -> int:
    # mkstemp creates files readable by the owner only; give the result the mode a plain open() would
    return 0o666 & ~_umask()


def _temp_beside(path: str, suffix: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise WrnDetError(f"cannot write {path}: {d} is not a folder (a file of that name is in the way)") from None
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    return tmp


def _os_error(path: str, e: OSError) -> WrnDetError:
    why = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why += "; the previous file, if any, is unchanged"
    return WrnDetError(f"cannot write {path}: {why}")


def atomic_write_all(items: Sequence[Tuple[str, Writer]], suffix: str = "") -> List[str]:
    """Call each ``write(tmp_path)`` on a temporary file beside its ``path``, then rename them all.

    Returns the paths written. If any write fails, every temporary file is removed and no
    target is touched, so the group appears whole or not at all. An ``OSError`` (a full
    disk, a folder where a file should be) becomes a :class:`WrnDetError` naming the path.
    """
    temps: List[Tuple[str, str]] = []
    try:
        for path, write in items:
            try:
                tmp = _temp_beside(path, suffix or os.path.splitext(path)[1])
            except OSError as e:
                raise _os_error(path, e) from None
            temps.append((tmp, path))
            try:
                write(tmp)
                os.chmod(tmp, _umask_mode())
            except OSError as e:
                raise _os_error(path, e) from None
        for tmp, path in temps:  # every target checked before the first rename: all or none
            if os.path.isdir(path):
                raise WrnDetError(f"cannot write {path}: it is a folder")
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    return [path for _, path in temps]


def atomic_write(path: str, write: Writer, suffix: str = "") -> str:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``; returns ``path``.

    See :func:`atomic_write_all` for what happens on failure.
    """
    return atomic_write_all([(path, write)], suffix)[0]


def atomic_write_dir(path: str, write: Writer, is_complete: Optional[Callable[[str], bool]] = None) -> str:
    """Call ``write(tmp_folder)`` on an empty temporary folder beside ``path``, then rename it to ``path``; returns
    ``path``.

    The folder appears whole or not at all: if ``write`` fails, the temporary folder is
    removed and ``path`` is left as it was. A folder already at ``path`` is replaced, unless
    ``is_complete(path)`` says it is a finished copy (another process that wrote the same
    folder at the same time got there first), which is then kept. An ``OSError`` becomes a
    :class:`WrnDetError` naming the path.
    """
    def complete() -> bool:
        return is_complete is not None and is_complete(path)

    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    except OSError as e:
        raise _os_error(path, e) from None
    try:
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is the owner's alone; a plain mkdir's is not
            write(tmp)
        except OSError as e:
            raise _os_error(path, e) from None
        if os.path.isdir(path) and not complete():
            # an outdated or broken copy: move it aside (one rename) so the rename below can take its place
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            try:
                os.replace(path, os.path.join(old, "folder"))
            except OSError:
                pass  # another process moved it first
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError as e:
            if not complete():  # unless another process's finished copy took the place first
                raise _os_error(path, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def atomic_save(obj, path: str) -> str:
    """Save ``obj`` with ``torch.save`` atomically; returns ``path``."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp), suffix=".pth")


def write_text(path: str, text: str) -> str:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write)


def write_json(path: str, obj, **kwargs) -> str:
    """Write ``obj`` as JSON to ``path`` atomically (``kwargs`` go to ``json.dump``); returns ``path``."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, **kwargs)

    return atomic_write(path, write, suffix=".json")


def save_figure(fig, path: str, **kwargs) -> str:
    """Save a matplotlib figure to ``path`` atomically (format from the extension); returns ``path``."""
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def check_output_dir(path: str, key: str = "OUTPUT_DIR") -> str:
    """Return ``path`` if it is, or can become, a folder; raise :class:`WrnDetError` naming ``key`` otherwise.

    Nothing is created: a regular file at ``path`` or at any of its parents is the error.
    """
    p = os.path.abspath(path)
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    if p and not os.path.isdir(p):
        what = "is a file" if p == os.path.abspath(path) else f"is under the file {p}"
        raise WrnDetError(f"{key} {path!r} {what}; expected a folder")
    return path


def json_value(v):
    """Return ``v`` as strict JSON holds it: tensors and numpy scalars as numbers, tuples as lists, NaN and infinities as None.

    Strict, so that any JSON reader takes the file (``NaN`` is not JSON); a value that is not
    a number is no point of a curve either way.
    """
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    return v
