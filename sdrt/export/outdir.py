"""Where an export writes: a staging folder beside OUT, published in one atomic step.

Guarantees, whatever happens to the process (an error, Ctrl-C, `kill -9`):
- OUT is either the complete old engine dir or the complete new one. A replaced OUT is swapped with
  the staging folder by one `renameat2(RENAME_EXCHANGE)` (Linux), and only then deleted.
- Nothing the export did not write is deleted. OUT is recorded when the export starts; if it changed
  since (a file appeared in it, or it appeared where there was none, e.g. another export finished
  first), the export fails naming what changed, and leaves OUT alone.
- Leftovers do not pile up. A staging folder holds an flock for as long as its export runs; the next
  export into the same parent folder deletes staging folders whose lock nobody holds (their process died).
  Temporary source files (built-in models, single-file configs) live inside the staging folder.
- A failed export removes the parent folders it created (`engines/` of `engines/sd15`).

`SDRT_FAULT=STAGE` kills the process with SIGKILL when the export reaches STAGE (a test hook:
tests/test_export_safety.py); the stages are FAULT_STAGES.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import secrets
import shutil
import signal
from pathlib import Path

from sdrt.errors import InputError, SdrtError

log = logging.getLogger(__name__)

FAULT_STAGES = ("staged", "component", "published", "removing-old")
LOCK = ".sdrt-export.lock"
_PARTIAL = ".partial-"
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def fault(stage: str) -> None:
    """The test hook: SIGKILL this process at STAGE when SDRT_FAULT names it."""
    if os.environ.get("SDRT_FAULT") == stage:
        os.kill(os.getpid(), signal.SIGKILL)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the C library or the file system lacks it."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def snapshot(path: Path) -> tuple | None:
    """What OUT holds now: None if absent, else its inode and every entry with size and mtime."""
    if not path.exists():
        return None
    st = path.stat()
    entries = []
    for p in sorted(path.rglob("*")):
        s = p.lstat()
        entries.append((str(p.relative_to(path)), s.st_size, s.st_mtime_ns))
    return (st.st_ino, tuple(entries))


def _changes(before: tuple | None, after: tuple | None) -> str | None:
    """How OUT changed between two snapshots, in words; None if it did not."""
    if before == after:
        return None
    if before is None:
        return "it appeared while the export ran (another export, or a user, created it)"
    if after is None:
        return "it was removed while the export ran"
    new = sorted({e[0] for e in after[1]} - {e[0] for e in before[1]})
    if new:
        return f"{new[0]} appeared in it while the export ran" + (f" (and {len(new) - 1} more)" if len(new) > 1 else "")
    return "its contents changed while the export ran"


def _lock_is_free(lock_file: Path) -> bool:
    try:
        fd = os.open(lock_file, os.O_RDWR)
    except OSError:
        return True  # no lock file: a folder from before the lock, or one being set up; see caller
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale(parent: Path) -> list[Path]:
    """Delete the staging folders in PARENT of exports whose process is gone; return them."""
    removed = []
    for p in parent.glob(f".*{_PARTIAL}*"):
        if not p.is_dir() or not _lock_is_free(p / LOCK):
            continue
        if not (p / LOCK).exists():  # created but not yet locked: only if its process is gone
            pid = p.name.rsplit(_PARTIAL, 1)[-1].split("-")[0]
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    for p in removed:
        log.info("removed %s, left by an export that did not finish", p)
    return removed


class OutDir:
    """`with OutDir(out, force) as staging:` write into `staging`, then `publish()` inside the block.
    Leaving the block without publishing (an error, Ctrl-C) removes the staging folder and any parent
    folders this export created."""

    def __init__(self, out: str | Path, force: bool = False):
        self.out = Path(out).absolute()
        self.force = force
        # the pid names the process (stale-folder cleanup); the token tells two exports of one process apart
        self.staging = self.out.parent / f".{self.out.name}{_PARTIAL}{os.getpid()}-{secrets.token_hex(3)}"
        self._lock_fd = None
        self._made_parents: list[Path] = []
        self.published = False

    def check(self) -> None:
        """Refuse an OUT that is not a directory, or a non-empty one without force (before any work)."""
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"{self.out} exists and is not a directory")
        if self.out.is_dir() and any(self.out.iterdir()) and not self.force:
            raise InputError(f"{self.out} is not empty (use --force to replace it)")

    def __enter__(self) -> Path:
        self.check()
        self.before = snapshot(self.out)
        missing = [p for p in [self.out.parent, *self.out.parent.parents] if not p.exists()]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._made_parents = missing  # deepest first
        remove_stale(self.out.parent)
        self.staging.mkdir()
        self._lock_fd = os.open(self.staging / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        return self.staging

    def publish(self) -> None:
        """Make the staging folder OUT, atomically; then delete what OUT held before."""
        os.close(self._lock_fd)
        self._lock_fd = None
        (self.staging / LOCK).unlink()
        fault("staged")
        changed = _changes(self.before, snapshot(self.out))
        if changed:
            raise InputError(f"{self.out}: {changed}; it was left as it is and nothing was written to it")
        if self.before is None:
            if not _renameat2(self.staging, self.out, _RENAME_NOREPLACE):
                if self.out.exists():
                    raise InputError(f"{self.out}: it appeared while the export ran; it was left as it is")
                os.rename(self.staging, self.out)
        else:
            self._swap()
        self.published = True
        fault("published")
        self._remove_old()

    def _swap(self) -> None:
        """Exchange staging and OUT; if OUT changed in the instant before, exchange back and fail."""
        if not _renameat2(self.staging, self.out, _RENAME_EXCHANGE):  # no atomic exchange here:
            aside = self.out.parent / f".{self.out.name}.old-{os.getpid()}"  # a short window without OUT
            os.rename(self.out, aside)
            os.rename(self.staging, self.out)
            os.rename(aside, self.staging)
        # the old contents are now at self.staging
        changed = _changes(self.before, snapshot(self.staging))
        if changed:
            _renameat2(self.staging, self.out, _RENAME_EXCHANGE)
            raise InputError(f"{self.out}: {changed}; it was left as it is and nothing was written to it")

    def _remove_old(self) -> None:
        if not self.staging.exists():
            return
        # the old contents hold no lock file: while this process lives, other exports leave them to
        # it (its pid is alive); if it is killed midway, the next export removes the rest
        for i, p in enumerate(sorted(self.staging.rglob("*"), reverse=True)):
            if i == 1:
                fault("removing-old")
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
        self.staging.rmdir()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if not self.published:
            shutil.rmtree(self.staging, ignore_errors=True)
            for p in self._made_parents:
                try:
                    p.rmdir()  # only if still empty
                except OSError:
                    break
        elif exc_type is not None and not isinstance(exc, (SdrtError, KeyboardInterrupt)):
            log.warning("%s was published; removing the old contents failed: %s", self.out, exc)
