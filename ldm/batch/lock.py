"""Who works on an output folder: one run at a time, or several that share the work (``--join``).

Everything lives in ``<outdir>/.ldm-batch/``. Every process of a run registers a file in
``procs/`` and holds an exclusive ``flock`` on it for its life; a batch being made has a file in
``claims/``, flocked by its maker. The kernel drops a process's flocks when it dies (kill -9, OOM),
and a power loss drops them all, so a leftover file whose lock can be taken belongs to no one and
is taken over. A pid file would need "is pid P alive and still the same process?" (pid reuse, start
time in /proc, other hosts); a flock answers it exactly. Decisions (who is alive, register) are
made under a short exclusive flock on ``lock``. A file is unlinked only while its flock is held,
and every locker checks that the path still names the inode it locked, else it starts over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from ldm.batch import manifest
from ldm.errors import LdmError

LOCK_DIR = ".ldm-batch"


@dataclass(frozen=True)
class Holder:
    """A process registered on the folder."""

    pid: int
    host: str
    started: str  # "2026-12-06 17:50:01 UTC", when the run began
    signature: str  # which images it makes (see ldm.cli.batch): joiners must match it
    joined: bool = False

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


def _flock(fd: int, path: Path, blocking: bool) -> bool:
    """Exclusive flock on ``fd``; False if another open file holds it (non-blocking only)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError as e:  # ENOLCK, EOPNOTSUPP: a filesystem without locks
        raise LdmError(f"{path}: this filesystem cannot lock files ({e.strerror})") from e


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _lock_path(path: Path, blocking: bool) -> int | None:
    """An fd holding the flock of ``path`` (created if absent); None if held by another."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue  # the folder was removed by the last process leaving: make it again
        if not _flock(fd, path, blocking):
            os.close(fd)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # unlinked or replaced while we waited: lock the current file


class _Mutex:
    """The short exclusive lock under which processes decide and (un)register."""

    def __init__(self, root: Path):
        self.path = root / "lock"

    def __enter__(self) -> _Mutex:
        self.fd = _lock_path(self.path, blocking=True)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def _holder_files(root: Path):
    """(path, open fd, Holder or None) of each process file; the fd is closed after the step."""
    for path in sorted((root / "procs").glob("*.json")) if root.is_dir() else []:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            yield path, fd, _read_holder(fd)
        finally:
            os.close(fd)


def _scan(root: Path) -> tuple[list[Holder], list[Holder]]:
    """(live, gone) holders; the files of the gone ones are removed (call under the mutex)."""
    live, gone = [], []
    for path, fd, holder in _holder_files(root):
        if _flock(fd, path, blocking=False):
            path.unlink(missing_ok=True)  # nobody holds it: its process is gone
            if holder is not None:
                gone.append(holder)
        elif holder is not None:
            live.append(holder)
    live.sort(key=lambda h: h.started)
    return live, gone


def _read_holder(fd: int) -> Holder | None:
    try:
        return Holder(**json.loads(os.pread(fd, 1 << 16, 0)))
    except (ValueError, TypeError):
        return None  # not ours or torn (a power loss before the rename reached the disk)


def busy(outdir: str | Path) -> list[Holder]:
    """The live holders of ``outdir``, read-only (nothing is created): a fast early check."""
    live = [
        holder
        for _, fd, holder in _holder_files(Path(outdir) / LOCK_DIR)
        if holder is not None and not _probe_free(fd)
    ]
    return sorted(live, key=lambda h: h.started)


def _probe_free(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP):
            return True  # the real registration reports it
        raise
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def refusal(outdir: str | Path, live: list[Holder]) -> LdmError:
    more = f" and {len(live) - 1} more process(es)" if len(live) > 1 else ""
    return LdmError(
        f"--outdir {outdir} is in use by another ldm batch ({live[0].describe()}{more}); wait for "
        "it to finish, or pass --join to share its work"
    )


class Lease:
    """This process's registration on an output folder, held until :meth:`release`.

    ``Lease.acquire`` refuses (LdmError) when live processes hold the folder, unless ``join``
    (then their signature must equal ours) or ``member`` (a rank > 0 of the run that rank 0
    registered). The first process in clears what dead runs left: claims, temp files, a torn
    manifest line, duplicate manifest lines. ``gone`` lists the dead holders it took over from.
    """

    def __init__(self, outdir: Path, fd: int, path: Path, others, gone, member: bool):
        self.outdir, self.fd, self.path = outdir, fd, path
        self.others, self.gone = others, gone  # live holders when we came; dead ones cleared
        self.joined = bool(others) and not member

    @classmethod
    def acquire(
        cls, outdir: str | Path, me: Holder, *, join: bool = False, member: bool = False
    ) -> Lease:
        outdir = Path(outdir)
        root = outdir / LOCK_DIR
        with _Mutex(root):
            live, gone = _scan(root)
            if live and not (join or member):
                raise refusal(outdir, live)
            if live and join and any(h.signature != me.signature for h in live):
                raise LdmError(
                    f"--join: the run on {outdir} ({live[0].describe()}) makes other images "
                    "(prompt file, flags, model or --batch-size differ); join with its command"
                )
            if not live and not member:
                _fresh_start(outdir, root)
            joined = bool(live) and not member
            fd, path = _register(root, Holder(**{**asdict(me), "joined": joined}))
        return cls(outdir, fd, path, live, gone, member)

    def release(self) -> None:
        """Unregister; the last process out compacts the manifest and removes the lock folder."""
        root = self.outdir / LOCK_DIR
        with _Mutex(root) as mutex:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            live, _ = _scan(root)
            if live:
                return
            try:
                manifest.compact(self.outdir)
            except OSError:
                pass  # a full disk: the old file is intact and readers keep a name's last line
            for sub in ("claims", "procs"):
                shutil.rmtree(root / sub, ignore_errors=True)
            mutex.path.unlink(missing_ok=True)  # still locked by us: waiters will start over
            try:
                root.rmdir()
            except OSError:
                pass  # someone is making it again, or left files of their own in it


def _register(root: Path, me: Holder) -> tuple[int, Path]:
    """Write ``procs/<host>-<pid>-<random>.json`` already flocked (written, locked, renamed)."""
    procs = root / "procs"
    procs.mkdir(parents=True, exist_ok=True)
    (root / "claims").mkdir(exist_ok=True)
    name = f"{me.host}-{me.pid}-{secrets.token_hex(4)}.json"
    tmp = procs / f".{name}.tmp"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps(asdict(me)).encode())
        os.fsync(fd)
        _flock(fd, tmp, blocking=True)  # a fresh file: nobody else can hold it
        os.replace(tmp, procs / name)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return fd, procs / name


def _fresh_start(outdir: Path, root: Path) -> None:
    """Nobody alive works here: clear what dead processes left (their claims are all free)."""
    shutil.rmtree(root / "claims", ignore_errors=True)
    for tmp in (root / "procs").glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    manifest.clean_temp_files(outdir)
    manifest.repair(outdir)
    manifest.compact(outdir)


def this_process(started: str, signature: str) -> Holder:
    return Holder(os.getpid(), socket.gethostname(), started, signature)


class Claims:
    """Per-batch claims: a batch is made only by the process holding its claim's flock."""

    def __init__(self, outdir: str | Path):
        self.root = Path(outdir) / LOCK_DIR / "claims"

    def take(self, key: str, wait: bool = False) -> Claim | None:
        """The claim of ``key``, or None when a live process holds it (``wait``: block)."""
        path = self.root / f"{key}.claim"
        fd = _lock_path(path, blocking=wait)
        return None if fd is None else Claim(fd, path)


class Claim:
    """A held claim; leaving the block unlinks it (the batch's manifest lines are written)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
