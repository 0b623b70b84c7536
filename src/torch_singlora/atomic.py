"""Crash-safe, non-destructive writes: every file and folder singlora writes goes through here.

- ``atomic_write`` / ``atomic_write_text``: a temp file beside the target, fsynced, renamed over it. A crash leaves
  the old file or the new one, never a torn one.
- ``atomic_directory``: a temp folder beside the target, filled, then swapped in by two renames.
- ``check_not_input``: the one output rule, for every file and folder a command writes or removes: an output never
  is, holds, or lies inside one of the command's inputs (model, tokenizer, data, prompts, adapter, chat template),
  compared by file identity, whatever ``--overwrite`` says.
- ``check_output_file``: that rule, then an existing file named by an output flag is replaced only with
  ``--overwrite``.
- ``output_folder``: ``atomic_directory`` behind the one output-folder policy every command that writes a folder
  uses (``check_output_folder``): the output rule, then a non-empty target that is not this command's own previous
  output is refused, naming what is there, unless ``overwrite=True``.

Files and folders get the permissions an ordinary ``open(path, "w")`` / ``mkdir`` would give them: ``0o666`` /
``0o777`` less the umask (the kernel applies it), or the mode of the file being replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Mapping, Optional, Union

from .errors import SingLoRAError

PathLike = Union[str, "os.PathLike[str]"]
# A command's inputs: ``{what the user calls it (a flag): path}``, or bare paths (named "input"); None entries skipped.
Inputs = Union[Mapping[str, Optional[PathLike]], Iterable[Optional[PathLike]]]
MANIFEST_FILE = "singlora_output.json"  # what a command wrote into its output folder (``output_folder``)
_TEMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")  # the temp names made here


def _temp_path(path: Path, make: Callable[[Path], None]) -> Path:
    """Create (``make``) a fresh ``.<name>.XXXXXXXX.tmp`` beside ``path`` and return it."""
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            make(candidate)
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp name beside {path}")


def _create_file(candidate: Path) -> None:
    os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # 0o666 less the umask


def _ordinary_file_modes(folder: Path) -> None:
    """Give every plain file under ``folder`` the mode ``open(path, "w")`` would (0o666 less the umask, measured on
    a probe file): writers such as safetensors' ``save_file`` (used by ``save_pretrained``) create theirs 0600."""
    probe = _temp_path(folder / "mode", _create_file)
    mode = stat.S_IMODE(os.stat(probe).st_mode)
    probe.unlink()
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and not info.st_mode & 0o111:  # executables and links keep theirs
                os.chmod(path, mode)


def _keep_mode(source: Path, target: Path) -> None:
    """Give ``target`` the permission bits of ``source`` if it exists (an ordinary overwrite keeps them)."""
    with contextlib.suppress(FileNotFoundError):
        os.chmod(target, stat.S_IMODE(os.stat(source).st_mode))


def io_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write, or None: ``exc`` itself, one in its ``__cause__``/``__context__`` chain
    (torch.save's ``RuntimeError``; a nested ``atomic_write``'s ``SingLoRAError``), or an ``(os error N)`` in its
    message (safetensors' ``SafetensorError``). A context suppressed by ``raise ... from None`` is not followed."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        found = re.search(r"\(os error (\d+)\)", str(current))
        if found:
            number = int(found.group(1))
            return OSError(number, os.strerror(number))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


def _cannot_write(path: Path, error: OSError) -> SingLoRAError:
    return SingLoRAError(f"{path}: cannot write: {error.strerror or error}; the previous {path.name}, if any, is "
                         "unchanged")


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, then rename it over ``path``.

    A crash at any point leaves either the old ``path`` or the new one, never a torn file (at worst a stray
    ``.<name>.*.tmp`` beside it, which ``remove_stale_temps`` deletes). An I/O failure (disk full, unwritable
    directory) raises ``SingLoRAError`` naming ``path``, removes the temp file and leaves the old ``path`` untouched.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        tmp = _temp_path(path, _create_file)
        _keep_mode(path, tmp)
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        write(str(tmp))
        os.chmod(tmp, mode)  # some writers (safetensors' save_file) recreate the file 0600
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_directory(path.parent)
    except Exception as exc:  # an I/O failure, however the writer reports it (io_error); anything else is a bug
        error = io_error(exc)
        if error is None:
            raise
        raise _cannot_write(path, error) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write`` of a UTF-8 text file."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside ``path`` to fill; on success it replaces ``path`` (a folder or nothing).

    If the body raises, the temp folder is removed and ``path`` is untouched. The swap is two renames (the old
    folder aside, the new one in), so a crash leaves either the old folder, or the new one, or the new one
    complete under a ``.<name>.*.tmp`` name; never a half-written ``path``. No policy here: callers that replace a
    user's folder go through ``output_folder``.
    """
    path = Path(path)
    check_replaceable_folder(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path(path, lambda candidate: os.mkdir(candidate, 0o777))  # 0o777 less the umask
    except OSError as exc:
        raise SingLoRAError(f"{path}: cannot write: {exc.strerror}") from exc
    try:
        _keep_mode(path, tmp)
        yield tmp
        _ordinary_file_modes(tmp)
        old = path.parent / f"{tmp.name}.old" if path.exists() else None
        if old is not None:
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_directory(path.parent)
    except Exception as exc:  # also from the body: a writer on a full disk
        error = io_error(exc)
        if error is None:
            raise
        raise _cannot_write(path, error) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_replaceable_folder(path: Path) -> None:
    """Refuse (``SingLoRAError``, saying why) a folder ``atomic_directory`` could not put in place: a file; a
    symbolic link leading nowhere (a loop, or a missing target); a folder on a read-only file system; a mount
    point (the new folder is renamed into place, and a mount point cannot be renamed)."""
    if os.path.lexists(path) and not os.path.exists(path):
        raise SingLoRAError(f"{path}: a symbolic link that leads to no folder (a loop, or a missing target); remove "
                            "it or choose another folder")
    if path.exists() and not path.is_dir():
        raise SingLoRAError(f"{path}: exists and is not a folder")
    if not path.exists():
        return
    if os.statvfs(path).f_flag & os.ST_RDONLY:
        raise SingLoRAError(f"{path}: on a read-only file system (mounted read-only): nothing can be written there; "
                            "choose a folder on a writable one")
    if os.path.ismount(path):
        raise SingLoRAError(f"{path}: a mount point; singlora writes the new folder beside it and renames it into "
                            f"place, which a mount point cannot be: give a folder inside it, e.g. {path / 'out'}")


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the ``.<name>.XXXXXXXX.tmp`` files a process killed inside ``atomic_write`` left in ``directory``.

    Only for a directory one process owns (a training run's output folder): a concurrent writer's temp file would
    go too. Returns the removed paths; a missing directory removes nothing.
    """
    directory = Path(directory)
    stale = [p for p in directory.glob(".*.tmp") if _TEMP_NAME.fullmatch(p.name) and p.is_file()] \
        if directory.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# ---- the output-folder policy --------------------------------------------------------------------------------


def _same_or_inside(inner: Path, outer: Path) -> bool:
    """Whether ``inner`` is the file or folder ``outer`` or lies inside it, by file identity (device + inode of
    ``outer`` against ``inner`` and each of its parents), not by spelling: ``..``, symlinks, hard links and bind
    mounts are seen through. ``inner`` need not exist yet."""
    try:
        target = os.stat(os.path.realpath(outer))
    except OSError:
        return False
    current = Path(os.path.realpath(inner))
    for candidate in (current, *current.parents):
        with contextlib.suppress(OSError):
            if os.path.samestat(os.stat(candidate), target):
                return True
    return False


def _named(inputs: Inputs) -> list[tuple[str, Path]]:
    pairs = inputs.items() if isinstance(inputs, Mapping) else (("input", source) for source in inputs)
    return [(name, Path(source)) for name, source in pairs if source is not None and str(source)]


def check_not_input(path: PathLike, inputs: Inputs, *, what: str, advice: str, may_hold: bool = False) -> None:
    """The one output rule: refuse (``SingLoRAError``, naming both) an output ``path`` that is one of ``inputs``,
    lies inside an input folder, or (unless ``may_hold``: a folder the command writes only some named files into)
    holds an input. Compared by file identity, not by spelling; no flag overrides it.

    ``what`` names the output (``"--output"``, ``"output folder"``), ``advice`` ends the message.
    """
    for name, source in _named(inputs):
        if _same_or_inside(Path(path), source):
            relation = "is" if _same_or_inside(source, Path(path)) else "lies inside"
        elif not may_hold and _same_or_inside(source, Path(path)):
            relation = "holds"
        else:
            continue
        raise SingLoRAError(f"{what} {path} {relation} this command's {name} {source}: writing there would destroy "
                            f"it; {advice}")


def _manifest_files(folder: Path, command: str) -> set[str] | None:
    """The files ``command`` recorded in ``folder``'s manifest, or None if it holds no manifest of ``command``."""
    from .untrusted import read_json  # the one strict reader

    try:
        document = read_json(folder / MANIFEST_FILE, what="singlora output manifest", limit=2**20)
    except SingLoRAError:
        return None
    if not isinstance(document, dict) or document.get("written_by") != f"singlora {command}":
        return None
    files = document.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files)


def _relative_files(folder: Path) -> list[str]:
    """Every entry under ``folder`` as a relative POSIX path (folders end in ``/``), sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        found += [(base / d).as_posix() + "/" for d in dirs] + [(base / f).as_posix() for f in files]
    return sorted(found)


def check_output_folder(
    path: PathLike, *, command: str, inputs: Inputs = (), overwrite: bool = False,
) -> Literal["new", "own", "overwrite"]:
    """The one output-folder policy: may ``command`` (e.g. ``"merge"``) replace the folder ``path``?

    Returns ``"new"`` (missing or empty), ``"own"`` (it holds exactly what ``command`` wrote there before, per its
    manifest) or ``"overwrite"`` (anything else, allowed by ``overwrite=True``). Raises ``SingLoRAError``:

    - always, if ``path`` is, holds, or lies inside one of ``inputs`` (``check_not_input``), or is a file;
    - without ``overwrite``, if it holds anything else, naming the first entries (they would be lost).
    """
    path = Path(path)
    check_not_input(path, inputs, what="output folder", advice="choose another output folder")
    try:
        check_replaceable_folder(path)
    except SingLoRAError as exc:
        raise SingLoRAError(f"output folder {exc}") from None
    if not path.exists():
        return "new"
    entries = _relative_files(path)
    if not entries:
        return "new"
    own = _manifest_files(path, command) or set()
    foreign = [e for e in entries if e not in own and e != MANIFEST_FILE and not e.endswith("/")]
    if own and not foreign:
        return "own"
    if overwrite:
        return "overwrite"
    listed = ", ".join((foreign or entries)[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise SingLoRAError(f"output folder {path} is not empty and is not the output of an earlier `singlora {command}` "
                        f"(it holds {listed}); choose a new folder, or pass --overwrite (overwrite=True) to replace "
                        "it and everything in it")


def check_output_file(path: PathLike, *, flag: str, inputs: Inputs = (), overwrite: bool = False) -> None:
    """The output-file policy (``evaluate --output``, ``report --plot``, ``generate --output``...): never one of the
    command's ``inputs`` nor inside one (``check_not_input``); an existing ``path`` is the user's and is replaced
    only with ``overwrite`` (``--overwrite``); a folder never is."""
    check_not_input(path, inputs, what=flag, advice=f"give {flag} another file name")
    if os.path.isdir(path):
        raise SingLoRAError(f"{flag} {str(path)!r} is a folder: give a file name")
    if os.path.lexists(path) and not overwrite:
        raise SingLoRAError(f"{flag} {str(path)!r} exists; --overwrite replaces it")


@contextlib.contextmanager
def output_folder(
    path: PathLike, *, command: str, inputs: Inputs = (), overwrite: bool = False,
) -> Iterator[Path]:
    """``atomic_directory(path)`` after ``check_output_folder``; records what the body wrote in the manifest
    ``singlora_output.json`` (``{"written_by": "singlora <command>", "files": [...]}``) so a rerun may replace it."""
    inputs = inputs if isinstance(inputs, Mapping) else list(inputs)
    check_output_folder(path, command=command, inputs=inputs, overwrite=overwrite)
    with atomic_directory(path) as tmp:
        yield tmp
        files = [f for f in _relative_files(tmp) if not f.endswith("/")]
        manifest = {"written_by": f"singlora {command}", "files": files}
        atomic_write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
