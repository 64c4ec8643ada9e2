"""Writing outputs so that nothing is lost and nothing is half-written.

- ``atomic_write`` / ``atomic_json``: a file appears whole or not at all.
- ``output_folder``: a folder iisan builds (a prepared dataset, a tiny model) is
  built in a temporary sibling and renamed into place. An existing folder is
  replaced only if iisan made it (its marker file lists every file in it);
  anything else, such as a user's folder or one with files iisan did not write, is
  refused with a message naming it. Nothing else in iisan deletes folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from iisan.core.errors import OutputError

MARKER = ".iisan-output.json"


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` writes a sibling temporary file, which then replaces ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from e  # name the output, not a temporary
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is not None:  # torch.save turns a full disk into a RuntimeError: name the output and why
            raise OSError(cause.errno, cause.strerror, str(path)) from e
        raise
    return path


def _os_error(e: BaseException) -> OSError | None:
    """The OSError in an exception's chain (itself, or what it was raised from or during)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def atomic_file(path, write: Callable) -> Path:
    """``write(f)`` writes into an open binary file that then replaces ``path`` (for np.save,
    np.savez and torch.save, which would otherwise rename a path without their suffix)."""

    def opened(tmp: Path) -> None:
        with tmp.open("wb") as f:
            write(f)

    return atomic_write(path, opened)


def atomic_text(path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_json(path, obj) -> Path:
    return atomic_text(path, json.dumps(obj, indent=2) + "\n")


def _files(root: Path) -> set[str]:
    """Every file and folder below ``root``, relative: a folder a user put there counts as theirs."""
    return {p.relative_to(root).as_posix() + ("/" if p.is_dir() else "") for p in root.rglob("*")}


def check_replaceable(out: Path, kind: str) -> None:
    """Raise unless ``out`` is absent, an empty folder, or a folder of kind ``kind``
    that iisan made and that holds only the files iisan wrote there."""
    if not out.exists() and not out.is_symlink():
        return
    fix = f"choose another output folder, or move {out} away yourself"
    if out.is_symlink() or not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder iisan made; refusing to replace it\n  fix: {fix}")
    found = _files(out)
    if not found:
        return
    marker = out / MARKER
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        raise OutputError(
            f"{out} exists and was not made by iisan (no readable {MARKER}); refusing to replace it\n  fix: {fix}"
        ) from None
    if record.get("kind") != kind:
        raise OutputError(
            f"{out} holds an iisan {record.get('kind')!r}, not a {kind!r}; refusing to replace it\n  fix: {fix}"
        )
    ours = set(record.get("files", []))
    ours |= {f"{parent.as_posix()}/" for f in ours for parent in Path(f).parents if parent != Path(".")}
    foreign = sorted(found - ours - {MARKER})
    if foreign:
        raise OutputError(
            f"{out} holds {len(foreign)} file(s) iisan did not write (e.g. {foreign[:3]}); refusing to replace it\n"
            f"  fix: {fix}"
        )


@contextlib.contextmanager
def output_folder(out, kind: str, info: dict | None = None) -> Iterator[Path]:
    """Build a folder in a temporary sibling (yielded), then publish it at ``out``.

    The check runs before any work; on an exception the temporary folder is
    removed and ``out`` is untouched. The marker records ``kind``, ``info`` and
    every file, so a later run may replace the folder and nothing else."""
    out = Path(out).absolute()
    check_replaceable(out, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kind": kind, "files": sorted(_files(tmp)), **(info or {})}, indent=2))
        check_replaceable(out, kind)  # again: something may have appeared while we worked
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)  # verified above to hold only what iisan wrote
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_output(out, kind: str) -> bool:
    """Whether ``out`` is a complete folder of this kind made by iisan."""
    try:
        return json.loads((Path(out) / MARKER).read_text()).get("kind") == kind
    except (OSError, ValueError):
        return False


def claim_folder(out, kind: str, allowed: tuple[str, ...], recognise: Callable[[Path], bool] = lambda p: True) -> Path:
    """Make ``out`` a folder of ``kind`` that iisan writes into file by file (a run).

    It may be absent, empty, carry this kind's marker, or (made before markers
    existed) hold only files named in ``allowed`` that ``recognise`` accepts as
    iisan's; a folder with anything else is refused."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder\n  fix: choose another output folder")
    if out.is_dir() and not is_output(out, kind):
        foreign = sorted(p.name for p in out.iterdir() if p.name not in allowed or not recognise(p))
        if foreign:
            raise OutputError(
                f"{out} holds files iisan did not write (e.g. {foreign[:3]}); refusing to write a {kind} into it\n"
                f"  fix: choose an empty or new output folder"
            )
    out.mkdir(parents=True, exist_ok=True)
    if not is_output(out, kind):
        atomic_json(out / MARKER, {"kind": kind})
    return out
