"""Reading and writing looplens's files: atomic writes with the user's umask, clear errors on bad files.

Every file looplens writes goes through :func:`atomic_write_text`, :func:`atomic_write_bytes` or
:func:`atomic_dir`: the bytes go to a temporary name beside the target and are renamed into place, so
a crash, a full disk or a read-only folder leaves either the old file or none, never half of one. The
temporary file is created private (``mkstemp``: 0600) and given the user's umask just before the rename,
like a file written with ``open(path, "w")``.

Reading goes through :func:`read_json` and :class:`InvalidFileError` (a ValueError), whose message is
one line naming the file and what is wrong with it. Lives in data/, the root of the dependency chain,
so models/, analyses/ and app/ can all use it.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write_text(d / "a.json", "[1, 2]")
>>> (d / "a.json").read_text()
'[1, 2]'
>>> try:
...     read_json(d / "a.json", "run config")
... except InvalidFileError as err:  # a ValueError; str(err) is "<path>: <problem>"
...     print(err.problem)
run config must be a JSON object, got list
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class InvalidFileError(ValueError):
    """A file looplens reads is garbage, truncated or of the wrong kind. ``str(err)`` is one line."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class FormatVersionError(InvalidFileError):
    """A run directory or checkpoint written in a format this looplens does not read (newer or older)."""


class OutputError(OSError):
    """Writing failed (read-only folder, full disk, a file where a folder should be); names the target."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def umask() -> int:
    """The process's umask (read without changing it, where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: the classic swap (not thread-safe, but only a fallback)
    os.umask(mask)
    return mask


# errnos that mean "this output cannot be written here" (rather than "an input is missing")
_WRITE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                           errno.EISDIR, errno.EFBIG})


def output_error(err: OSError, target: str | os.PathLike) -> OutputError:
    """``err`` (from writing ``target``) as an :class:`OutputError` naming ``target``, with a hint."""
    reason = err.strerror or str(err)
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = f"{reason} (read-only folder or file system?)"
    elif err.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = f"{reason} (disk full or over quota)"
    return OutputError(err.errno, reason, str(target))


def _prepare_parent(path: Path) -> None:
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(errno.ENOTDIR, f"{parent} is a file, not a folder", str(path))
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise output_error(err, path) from None


def _atomic_write(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    _prepare_parent(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the file the user's usual mode
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise output_error(err, path) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temp file in the same folder and an atomic rename.

    Raises :class:`OutputError` naming ``path`` when the folder is read-only or the disk is full;
    nothing is left behind then (an existing ``path`` keeps its old contents).
    """
    _atomic_write(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Binary twin of :func:`atomic_write_text`."""
    _atomic_write(path, data)


@contextmanager
def atomic_dir(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; rename it into place only if the block succeeds.

    A crash or exception leaves no half-written ``final`` behind (the temp folder is removed); an
    OSError while writing (read-only, disk full) becomes an :class:`OutputError` naming ``final``.
    Without ``overwrite``, a ``final`` that another process completed meanwhile is left as it is and
    this one raises FileExistsError (so concurrent first builds of a cache never hide it from readers).
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    _prepare_parent(final)
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700
        if overwrite and final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:  # never move aside a folder another process finished meanwhile (its readers would see
                tmp.rename(final)  # no directory for a moment): the first complete one stays
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise FileExistsError(f"{final} already exists (written by another process meanwhile); "
                                          "pass overwrite=True (CLI: --overwrite) to replace it") from None
                raise
    except OSError as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OutputError) or err.errno not in _WRITE_ERRNOS:
            raise  # ours already names the target; other errors (a missing input, ...) are the caller's
        raise output_error(err, final) from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; :class:`InvalidFileError` (one line, naming the file) when it is
    not JSON, truncated, or not an object. ``what`` names the file's role ("run config", ...)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidFileError(path, f"{what} is not text (binary garbage?)") from None
    if not text.strip():
        raise InvalidFileError(path, f"{what} is empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidFileError(path, f"{what} is not valid JSON (line {err.lineno} column {err.colno}: "
                                     f"{err.msg}; truncated or edited?)") from None
    if not isinstance(obj, dict):
        raise InvalidFileError(path, f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def format_version(tag: Any, prefix: str) -> int | None:
    """``"looplens-run-v1"`` -> 1 for prefix ``"looplens-run-v"``; None when the tag is not of that kind."""
    if isinstance(tag, str) and tag.startswith(prefix) and tag[len(prefix):].isdigit():
        return int(tag[len(prefix):])
    return None


def check_format(path: str | os.PathLike, meta: dict[str, Any], prefix: str, expected: int, what: str) -> None:
    """Refuse a file whose ``meta["format"]`` is not ``f"{prefix}{expected}"``, naming the format and the
    looplens version found (``meta["provenance"]["looplens_version"]``) and the ones expected."""
    from looplens import __version__

    tag = meta.get("format")
    found = format_version(tag, prefix)
    if found == expected:
        return
    prov = meta.get("provenance")
    written_by = prov.get("looplens_version") if isinstance(prov, dict) else None
    by = f"looplens {written_by}" if written_by else "an unknown looplens"
    if found is None:
        raise FormatVersionError(path, f"not a looplens {what} (format {tag!r}, expected {prefix}{expected})")
    age = "newer" if found > expected else "older"
    advice = "upgrade looplens" if found > expected else f"open it with looplens {written_by or '< ' + __version__}"
    raise FormatVersionError(path, f"{what} format v{found} written by {by} ({age}); this looplens "
                                   f"{__version__} reads format v{expected}: {advice}")
