"""Write stage outputs atomically: build next to the destination, then rename into place.

Temps are named `.<dest name>.<pid>-<random>` beside the destination (`.<dest name>.old` holds the
previous folder during a swap). A process killed with SIGKILL cannot remove them, so the first write
into a folder removes every temp there whose process is gone; a temp of a live process on this
machine (a concurrent run) is left alone. Leftovers of an older naming (`.<dest name>.<random>`)
and `.<dest name>.old` carry no pid: they are removed by the next write of that same destination.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# tempfile's random part is 8 characters of [a-z0-9_]
_PID_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[a-z0-9_]{8}")
_hidden_names: dict[str, list[str]] = {}  # per folder: hidden names seen at this process's first write there


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):  # not a pid at all: nothing can be alive under it
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(dest: str | Path) -> None:
    """Remove what killed writers left beside `dest` (see the module docstring).

    The folder is listed once per process: listing it on every write would make writing N files
    into one folder (predict's overlays) cost N^2.
    """
    dest = Path(dest)
    folder = os.path.abspath(dest.parent)
    names = _hidden_names.get(folder)
    if names is None:
        names = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.name.startswith("."):
                    continue
                match = _PID_TEMP.fullmatch(entry.name)
                if match is None:
                    names.append(entry.name)
                elif not process_alive(int(match["pid"])):
                    _remove(Path(folder, entry.name))
        _hidden_names[folder] = names
    own = re.compile(rf"\.{re.escape(dest.name)}\.(?:[a-z0-9_]{{8}}|old)")
    for name in [n for n in names if own.fullmatch(n)]:
        _remove(Path(folder, name))
        names.remove(name)


def _temp_prefix(dest: Path) -> str:
    return f".{dest.name}.{os.getpid()}-"


@contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `dest`; on success it replaces `dest`, on error it vanishes."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), dir=dest.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; outputs should look like any other folder
    try:
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, dest: Path) -> None:
    """Put folder `new` at `dest` (same file system); an older `dest` is removed only once `new` is in
    place, and put back if the rename fails. The one folder swap of the package (atomic_dir, download)."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    try:
        new.rename(dest)
    except OSError:
        if old.exists():
            old.rename(dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(dest: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `dest`; on success it replaces `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(dest), dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())  # mkstemp (and some writers) make 0600
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def nan_to_null(data: object) -> object:
    """Copy of nested dicts/lists with every NaN float as None: JSON's null for an undefined value."""
    if isinstance(data, dict):
        return {key: nan_to_null(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [nan_to_null(value) for value in data]
    if isinstance(data, float) and math.isnan(data):
        return None
    return data


def write_json(dest: str | Path, data: object) -> None:
    """Write strict JSON: NaN and infinity are refused (many readers reject them); see nan_to_null."""
    try:
        text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"{dest}: cannot write NaN or infinity as JSON ({err})") from None
    with atomic_file(dest) as tmp:
        tmp.write_text(text + "\n")


DVC_STAGE_LOCK = ".dvc/tmp/rwlock"  # where DVC records, per output path, the live command writing it


def being_written(path: Path) -> str | None:
    """The DVC command writing `path` (or a folder inside or above it) right now, as "pid N: <command>", from
    the stage lock of the DVC repository holding it; None when no live process writes there. DVC deletes a
    stage's outputs before it runs it, so this tells "a run is in progress" apart from "never trained"."""
    path = Path(path).resolve()
    root = next((p for p in (path, *path.parents) if (p / ".dvc").is_dir()), None)
    if root is None:
        return None
    try:
        writers = json.loads((root / DVC_STAGE_LOCK).read_text()).get("write", {})
    except (OSError, ValueError, AttributeError):
        return None  # no lock file, or one being rewritten: nothing to say
    for written, info in writers.items() if isinstance(writers, dict) else ():
        out = (root / written).resolve()  # DVC records absolute paths; a relative one is the repository's
        related = out == path or out in path.parents or path in out.parents
        if related and isinstance(info, dict) and isinstance(info.get("pid"), int) and process_alive(info["pid"]):
            return f"pid {info['pid']}: {info.get('cmd', 'dvc')}"
    return None
