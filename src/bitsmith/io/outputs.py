"""Writing outputs so that a reader never sees half of one: checked up front, staged beside the target,
renamed into place, readable by other users.

    prepare_output_dir(out)   before any work: ``out`` absent or an empty directory, not a symlink, not ``.``,
                              and its parent writable (tried for real: root may write where a mount refuses)
    staging_dir(out)          a temporary directory beside ``out``, named ``.<name>.bitsmith-<pid>-<random>.tmp``
    publish(tmp, out)         normal permissions (0755 / 0644, less the umask), then one rename into place
    staging_file / prepare_output_file   the same for a single file (``model.onnx``)

A process killed with ``kill -9`` leaves its staging entry behind; the next staging beside the same target
removes every such entry whose process is gone, so nothing accumulates and the target is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from bitsmith.errors import BitsmithError

__all__ = [
    "SAFETENSORS_METADATA",
    "prepare_output_dir",
    "prepare_output_file",
    "staging_dir",
    "staging_file",
    "publish",
    "remove_stale_staging",
]

# one key only: safetensors writes its metadata map in hash order, so two keys can swap places between
# runs and identical models would get different bytes (and sha256)
SAFETENSORS_METADATA = {"format": "pt"}

_STAGING = re.compile(r"^\.(?P<name>.+)\.bitsmith-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _nearest_existing_parent(out: Path) -> Path:
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    return ancestor


def _check_writable_parent(out: Path) -> None:
    ancestor = _nearest_existing_parent(out)
    if not ancestor.is_dir():
        raise BitsmithError(f"cannot write {out}: {ancestor} is a file, not a directory")
    try:  # os.access says yes to root even on /proc or a read-only mount: try it
        probe = tempfile.mkdtemp(prefix=".bitsmith-probe-", dir=ancestor)
        os.rmdir(probe)
    except OSError as err:
        raise BitsmithError(f"cannot write {out}: {ancestor} is not writable ({err.strerror})") from None


def _check_target(out: Path, what: str) -> None:
    if out.name in ("", ".", ".."):
        raise BitsmithError(f"{what} {out} names the current or a parent directory; give the name of a new one")
    if out.is_symlink():
        raise BitsmithError(f"{what} {out} is a symbolic link; give a real path")
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise BitsmithError(f"{what} {out} is the current directory or one of its parents; give the name of a new one")


def prepare_output_dir(out: str | Path) -> Path:
    """Check that ``out`` can be created (absent or empty, parent writable) before any work is done."""
    out = Path(out)
    _check_target(out, "output")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BitsmithError(f"output {out} already exists and is not an empty directory; choose another --out")
    _check_writable_parent(out)
    return out


def prepare_output_file(out: str | Path, suffix: str | None = None) -> Path:
    """Check that the file ``out`` can be written (absent, parent writable) before any work is done."""
    out = Path(out)
    _check_target(out, "output")
    if suffix is not None and out.suffix != suffix:
        raise BitsmithError(f"--out should be a {suffix} file, got {out.name}")
    if out.exists() or out.is_symlink():
        raise BitsmithError(f"{out} already exists; choose another --out")
    _check_writable_parent(out)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(directory: Path) -> None:
    """Remove staging entries in ``directory`` left by processes that no longer run (e.g. killed with -9)."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _STAGING.match(entry.name)
        if match and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"])):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _staging_parent(out: Path) -> Path:
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(parent)
    return parent


def staging_dir(out: str | Path) -> Path:
    """A new temporary directory beside ``out`` (created, with missing parents)."""
    out = Path(out)
    parent = _staging_parent(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.bitsmith-{os.getpid()}-", suffix=".tmp", dir=parent))


def staging_file(out: str | Path) -> Path:
    """A new temporary file path beside ``out`` (the file exists, empty)."""
    out = Path(out)
    parent = _staging_parent(out)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.bitsmith-{os.getpid()}-", suffix=".tmp", dir=parent)
    os.close(fd)
    return Path(name)


def _normal_permissions(path: Path) -> None:
    """0755 for directories and 0644 for files, less the umask (mkdtemp / mkstemp make them private)."""
    mask = _umask()
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def publish(tmp: Path, out: str | Path) -> None:
    """Give the staged ``tmp`` normal permissions and rename it to ``out`` (an empty directory there is
    replaced; anything else was refused by prepare_output_*)."""
    out = Path(out)
    _normal_permissions(tmp)
    if out.is_dir() and not out.is_symlink() and tmp.is_dir():
        out.rmdir()  # empty, checked by prepare_output_dir
    os.replace(tmp, out)
