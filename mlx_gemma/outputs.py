"""Output folders written whole or not at all: a temporary folder beside the destination,
renamed into place when complete; a manifest (MARKER) naming every file written, so `--force`
replaces only a folder mlx-gemma wrote; the checks that come before any work (convert, quantize,
lora and fuse share them)."""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

import mlx.core as mx

from .errors import CheckpointError, InputError

MARKER = ".mlx-gemma-output.json"


def _stamp(path: Path) -> list:
    """What says a file is still the one we wrote: its size and modification time."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _manifest(folder: Path) -> dict:
    """{file name: stamp or None} of what mlx-gemma wrote into `folder`, from its manifest."""
    written = json.loads((folder / MARKER).read_text())["files"]
    if isinstance(written, list):  # a manifest of names only
        written = {name: None for name in written}
    return {str(name): stamp for name, stamp in written.items()}


def not_ours(folder: Path) -> Optional[str]:
    """Why `folder` is not an output mlx-gemma wrote (None if it is): it must hold our manifest
    and nothing but the plain files the manifest names, each as it was written (a hand-edited
    chat template is the user's now)."""
    try:
        written = _manifest(folder)
    except FileNotFoundError:
        return f"has no {MARKER} manifest"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"has an unreadable {MARKER} manifest"
    foreign = sorted(p.name for p in folder.iterdir()
                     if p.name != MARKER and (p.name not in written or p.is_symlink() or not p.is_file()))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        return f"holds {foreign[0]}{more}, which mlx-gemma did not write"
    changed = sorted(name for name, stamp in written.items()
                     if stamp is not None and (folder / name).is_file() and _stamp(folder / name) != stamp)
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        return f"holds {changed[0]}{more}, changed since mlx-gemma wrote it"
    return None


def record_written(folder: Path, names: Iterable[str], stamped: bool = True) -> None:
    """Add files written into `folder` to its manifest (made if there is none), atomically: only
    what the manifest names may later be replaced. `stamped` False: named before being written."""
    try:
        written = _manifest(folder)
    except FileNotFoundError:
        written = {}
    written.update({name: _stamp(folder / name) if stamped else None for name in names})
    tmp = folder / f".tmp-{MARKER}"
    tmp.write_text(json.dumps({"written_by": "mlx-gemma", "files": written}, indent=2))
    os.replace(tmp, folder / MARKER)


def cannot_write(folder: Path) -> Optional[str]:
    """Why files cannot be made in `folder` (None if they can): the check root's permissions
    pass, so a read-only file system is told apart."""
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    return os.strerror(errno.EROFS if os.statvfs(folder).f_flag & os.ST_RDONLY else errno.EACCES)


def check_destination(dst: Path, force: bool) -> Path:
    """The real folder to write `dst` to, once sure that writing there loses nothing the user
    has and can succeed; otherwise an error saying why. Creates nothing: called before any
    work, and again just before the rename, since the folder may change meanwhile."""
    target = dst.resolve()  # symlinks resolved: the checks and the rename act on the real folder
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise InputError(f"{dst}: is the current folder or one above it; name a new folder for the output")
    if target == Path.home().resolve():
        raise InputError(f"{dst}: is the home folder; name a new folder for the output")
    if target.exists() and not target.is_dir():
        raise InputError(f"{dst}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()):
        if not force:
            raise InputError(f"{dst}: exists and is not empty (use --force to replace it)")
        reason = not_ours(target)
        if reason:
            raise InputError(f"{dst}: --force replaces only a folder mlx-gemma wrote, and this one {reason}")
    # The output is renamed into its parent, made where missing inside the nearest existing folder.
    existing = next(p for p in dst.parents if p.exists())  # as the user named it, for the message
    if not existing.is_dir():
        raise InputError(f"{existing}: exists and is not a directory")
    reason = cannot_write(existing)
    if reason:
        raise CheckpointError(f"{dst}: cannot write ({reason})")
    return target


# --- writing ---------------------------------------------------------------------------------


@contextmanager
def _signals_deferred(pending: list):
    """Ctrl-C, SIGTERM and SIGHUP are recorded in `pending` instead of raised, so that the final
    renames and the cleanup are never cut half-way. (Not a thread signal mask: MLX's own threads
    would still take the signal, and Python would raise it here all the same.)"""
    def defer(signum, frame):
        pending.append(signum)

    try:
        previous = {s: signal.signal(s, defer) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    except ValueError:  # not the main thread: signals are not ours to take here
        previous = {}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _umask_mode() -> int:
    # mkdtemp makes 0700 folders; a finished output gets what the user's umask gives. The umask
    # can only be read by setting it.
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def save_safetensors(path: Path, arrays: dict[str, mx.array], dst: Path, metadata: Optional[dict] = None) -> None:
    # Through a Python file: a full disk is then an OSError with its errno, where
    # mx.save_safetensors(str) raises a bare RuntimeError ("Unable to write ... bytes").
    with open(path, "wb") as f:
        try:
            mx.save_safetensors(f, arrays, metadata=metadata or {"format": "mlx"})
        except RuntimeError as e:
            raise CheckpointError(f"{dst}: cannot write ({e})") from None


@contextmanager
def output_folder(dst: Path, force: bool = False):
    """A hidden temporary folder beside `dst` to write an output into. When the block ends, the
    folder gets the manifest of its files and is renamed into place, replacing (with `force`) an
    output of ours; on any error or signal it is removed with the parent folders made for it,
    and `dst` is as it was."""
    target = check_destination(dst, force)
    made = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # deepest first
    tmp = old = None
    pending: list = []  # signals that came while the output was being put in place
    try:
        # Named before it is made: a signal can then never leave a folder that `tmp` does not name.
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(mode=0o700)
        yield tmp
        record_written(tmp, [p.name for p in sorted(tmp.iterdir())])
        tmp.chmod(_umask_mode())
        check_destination(dst, force)
        with _signals_deferred(pending):
            if target.exists():  # an empty folder, or (with force) an output of ours
                old = target.parent / (tmp.name.removesuffix(".tmp") + ".old")
                target.rename(old)
            tmp.rename(target)
            tmp = None
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot write ({e.strerror or e})") from None
    finally:
        # Every way out: the temporary output goes; the previous output is deleted once the
        # new one is in place, or put back if the new one never got there.
        with _signals_deferred(pending):
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                for folder in made:
                    try:
                        folder.rmdir()
                    except OSError:  # not made by us after all, or something else is in it now
                        break
            if old is not None:
                if target.exists():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.rename(target)
        if pending and tmp is not None:  # the work did not finish: the signal stops the program now
            signal.raise_signal(pending[0])
    # A signal that came once the new output was in place is not acted on: the work is complete
    # (and "interrupted: nothing was written" would be untrue).
