"""Writing outputs and reading paths from files other people made: the one way every stage does both.

Outputs are written atomically: into a temporary file beside the target (created exclusively, so
a link planted at the temporary name is never followed), synced, then renamed over the target. A
reader never sees half a file, and a kill during writing leaves the previous version intact.

Links are never written through. A rename replaces a symbolic link planted at an output's name by
the output itself, and leaves the link's target untouched; a link planted where an output *folder*
belongs (``<run>/probes``, ``<run>/plots``) is removed and a real folder made in its place. Either
way a warning names the link and its target. This is the policy for folders this code makes inside
an output folder; the output folder itself (``--out``, ``run_dir``) may be a link the user made on
purpose (a run folder on a bigger disk) and is used as it is.

Paths read from files that came from elsewhere (a dataset's annotation file, a split list, an
export) are untrusted: :func:`under_root` refuses one that leaves its root (an absolute path, or
``..`` climbing out), and :func:`regular_files` lists only the real files of a folder, so that a
link planted in a run folder is never read, copied or embedded.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

#: the temporary files' infix: ``<name>.tmp<random>``; ``probes.store.locks.sweep_temporaries``
#: deletes those a killed writer left behind
TMP_INFIX = ".tmp"


class PlantedLinkWarning(UserWarning):
    """An output's name (or an output folder's) held a symbolic link, which was replaced, not followed."""


def _warn_link(path: Path, what: str) -> None:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    warnings.warn(f"{path} was a symbolic link (to {target}); the {what} replaced the link itself and never "
                  f"wrote through it (the link's target is untouched)", PlantedLinkWarning, stacklevel=4)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8",
                 newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it is synced and renamed over
    ``path`` (see the module docstring). ``mode`` is ``"w"`` (text) or ``"wb"`` (bytes).

    On an exception the temporary file is deleted and ``path`` keeps its previous content.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError(f"cannot write the file {path}: a folder of that name is in the way; move or delete it")
    with atomic_path(path) as tmp:         # the temporary name, the rename and the clean-up live there
        with open(tmp, mode, **({} if "b" in mode else {"encoding": encoding, "newline": newline})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name beside ``path`` (same suffix), for a library that writes to a file *name*
    (a video encoder, a downloader); on success it is renamed over ``path`` (links replaced, not followed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + TMP_INFIX, suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        if path.is_symlink():
            _warn_link(path, "output")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_checkpoint(path: str | os.PathLike) -> Any:
    """A checkpoint written with ``torch.save`` (resume states: tensors, state dicts, numbers, strings),
    read with ``weights_only=True``: a file holding anything else (a pickled object runs code when
    loaded) is refused, naming the file, instead of executed."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path} holds objects other than tensors and plain containers, which are not loaded "
                         f"(torch.load(weights_only=True): a pickled object could run any code). It was not written "
                         f"by this recipe, or was tampered with; delete it (training starts again from step 0). "
                         f"Detail: {str(err).splitlines()[0]}") from None
    except (RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a readable checkpoint ({err}): damaged or truncated; delete it (training "
                         f"starts again from step 0)") from err


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    """``fig.savefig`` (matplotlib), atomically: the format is the file's suffix (``png`` by default)."""
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", **kwargs)
    return path


def output_dir(path: str | os.PathLike) -> Path:
    """The folder ``path`` inside an output folder, created if needed; a symbolic link planted there is
    removed (its target untouched) and a real folder made instead (module docstring)."""
    path = Path(path)
    if path.is_symlink():
        _warn_link(path, "output folder")
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def under_root(root: str | os.PathLike, relative: str | os.PathLike, what: str, source: str | os.PathLike) -> Path:
    """``root / relative`` for a ``relative`` path read from the file ``source``; one that leaves ``root``
    (absolute, or climbing out with ``..``) is refused, naming ``what``, the value and the file.

    The check is on the path as written (not on where links inside ``root`` lead): links inside a
    dataset folder are its owner's choice, a ``../../`` in a downloaded annotation file is not.
    """
    rel = str(relative)
    norm = os.path.normpath(rel) if rel else ""
    if not rel or os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise ValueError(f"{source}: {what} {rel!r} leaves the folder {root} (an absolute path, or '..' climbing out); "
                         f"a path in this file must name a file inside {root}: the file is damaged or not trustworthy")
    return Path(root) / norm


def regular_files(folder: str | os.PathLike, pattern: str = "*") -> list[Path]:
    """The files in ``folder`` matching ``pattern`` that are real files, sorted: symbolic links are
    skipped (a link planted in a run folder may point anywhere, e.g. ``/etc/passwd``)."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return []
    return sorted(p for p in folder.glob(pattern) if p.is_file() and not p.is_symlink())


def is_regular_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a real file in a real folder (neither it nor its folder a symbolic link)."""
    path = Path(path)
    return path.is_file() and not path.is_symlink() and not path.parent.is_symlink()


def read_json_object(path: str | os.PathLike, what: str, fix: str) -> dict[str, Any]:
    """A JSON file that must hold an object (``what``: "a run summary", ...); a truncated, edited or
    foreign file is named with ``fix`` instead of surfacing as a bare ``JSONDecodeError``."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): it was "
                         f"truncated (killed while writing?) or edited; {fix}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not {what} (a JSON {type(data).__name__}); {fix}")
    return data


def open_log(path: str | os.PathLike) -> IO[str]:
    """A fresh log file for a process's console, written while it runs (so not atomic: a crash must
    leave what was written), but never through a link planted at its name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        _warn_link(path, "log")
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "w", encoding="utf-8")
