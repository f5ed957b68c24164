"""One training process per run directory: ``RUN/run.lock``.

torchrun's workers run in their own session, so killing the agent leaves them training; a
relaunch on the same ``run.dir`` would then train beside them, both writing checkpoints. Rank 0
of a stage takes this lock before it trains and drops it when it is done
(``stages.common.started`` does, for every stage)::

    from muscle_hpc import runlock

    if rank == 0:
        lock = runlock.acquire(cfg.run.dir)          # RunLockError: one line naming the holder
        lock.keep_alive()                           # a thread beats every 30 s
    ...
    for step in ...:
        ...
        if rank == 0 and lock.lost:                 # another launch took the directory over
            stop without saving
    if rank == 0:
        lock.release()                              # or use ``with runlock.acquire(...)``

Only rank 0 calls anything here; the other ranks never see the lock. The stages take it just
after the rendezvous and share a refusal over the process group, so every rank stops with the
same line instead of waiting in a collective for a rank 0 that left. (``heartbeat`` can also be
called from the loop itself instead of ``keep_alive``; it then raises when the lock was lost.)
``RunLockError`` is a ``ValueError`` whose message is one line.

The lock file is JSON: ``host``, ``pid``, ``start_time`` (the process's start in clock ticks
since boot, /proc/<pid>/stat field 22, so a recycled pid is not mistaken for the holder),
``boot_id`` (a pid from before a reboot is dead), ``slurm_job_id``, ``slurm_array_id``
(``<array job>_<task>`` where set), ``slurm_restart_count``, ``acquired`` (Unix time) and a
random ``token`` that tells this acquisition from every other. The heartbeat is the file's
mtime.

Design and trade-offs:

* Creation writes a complete private temp file, then ``os.link``s it to ``run.lock``. link is
  atomic on local file systems, NFS and Lustre, and a reader never sees a half-written lock;
  ``O_EXCL`` is atomic on NFSv3+ too, but it publishes an empty file that is filled afterwards, so
  a reader could not tell "being written" from "corrupt". An NFS LINK whose reply was lost and
  retried answers EEXIST although it worked; the temp file's link count of 2 tells that case
  apart (open(2)'s recipe). ``flock`` is not used: it is advisory, per host on many NFS set-ups,
  and a node lost with its lease can leave it held or drop it silently.
* The heartbeat is the lock file's mtime, set through the descriptor of the file just checked to
  still be ours (so it never refreshes a newer holder's lock). Rewriting the JSON instead would
  either show readers half a file or, by rename, clobber the lock of whoever took over in the
  meantime. Reading the mtime on NFS relies on close-to-open consistency (the default; not with
  ``nocto``): an ``open`` fetches fresh attributes. Ages compare the holder's clock with the
  reader's, so node clocks must agree to well under ``stale_after_s`` (NTP does).
* A lock is stale, and is taken over, when
    - it names this host (same boot) and its pid is gone, a zombie, or alive with another start
      time. A live pid with the right start time holds the lock whatever its heartbeat: that is
      exactly the orphaned torchrun worker, alive but maybe stuck, that must not get a twin;
    - it names another host and the same Slurm job with a lower ``SLURM_RESTART_COUNT``: this is
      that job requeued, and Slurm has ended every process of its previous run. The same job at
      the same restart count is not enough (a second ``srun`` inside one allocation), nor is the
      job id alone;
    - it names another host and its heartbeat is older than ``stale_after_s``: a lost node. This
      is the only rule that can be wrong about a live holder: one that goes longer than
      ``stale_after_s`` without calling ``heartbeat`` (a long evaluation, a slow checkpoint) is
      taken over; its next ``heartbeat`` then raises ``RunLockError`` so it stops within a step.
      ``stale_after_s`` must therefore exceed the longest stretch between heartbeats; the price
      of a large value is that a new job on another node after a node loss waits that long (a
      requeue does not: the rule above frees it at once).
  Hosts are compared by ``socket.gethostname()``. Two containers with one host name but
  separate pid namespaces would see each other's pids as gone; run them with distinct names.
* Takeover is race-safe: a launcher that judged the lock with token T stale renames ``run.lock``
  to a name of its own, then reads what it moved. Only one launcher can move the file holding T:
  it links its own lock in place. One that moved something else (a winner's fresh lock) links it
  straight back, then reads it again and is refused. A third launcher creating a lock in the
  instant the file is moved aside can still end with two holders; the displaced one learns it at
  its next ``heartbeat`` and raises.
* Release renames the lock aside the same way and deletes it only if it is ours, so a holder
  that was taken over never deletes its successor's lock. It also runs at interpreter exit
  (``atexit``: a normal end or an uncaught exception). A killed holder (SIGKILL, a node loss, or
  SIGTERM without a Python handler, which skips ``atexit``) leaves its lock behind: that is the
  stale case above.
* psutil is not used: it is not a dependency of this package (only ffcv's extra brings it), and
  /proc tells the same on Linux. Without /proc the pid's existence alone decides on one host.

Why one module over ~450 lines: acquiring, beating, taking over a stale lock and releasing are
one protocol whose races are reasoned about together; split, each part would hide the others'
assumptions.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

LOCK_NAME = "run.lock"
DEFAULT_STALE_AFTER_S = 900.0
_MAX_ATTEMPTS = 20  # a lock that changes under us this often means a storm of launchers
_HAVE_PROC = os.path.exists("/proc/self/stat")


class RunLockError(ValueError):
    """A run directory is in use, cannot hold a lock, or its lock was lost; the message is one
    line."""


class InUseError(RunLockError):
    """A live process holds the lock (``acquire``'s refusal)."""


# ---------------------------------------------------------------------------- this process


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (/proc/<pid>/stat field 22); None when
    there is no such process or no /proc. Pairs with the pid to name a process uniquely within
    one boot, since pids are recycled."""
    stat = _proc_stat(pid)
    return None if stat is None else int(stat[19])


def _proc_stat(pid: int) -> list[str] | None:
    # Fields from the third (state) on; the command name before them may hold spaces and ')'.
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def boot_id() -> str | None:
    """This boot of this host, or None where the kernel does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _slurm_ids(environ) -> dict:
    array_job, array_task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    return {
        "slurm_job_id": environ.get("SLURM_JOB_ID") or None,
        "slurm_array_id": f"{array_job}_{array_task}" if array_job and array_task else None,
        "slurm_restart_count": int(environ.get("SLURM_RESTART_COUNT") or 0),
    }


def describe_self(host: str | None = None) -> dict:
    """The lock content naming this process (``host`` defaults to ``socket.gethostname()``)."""
    pid = os.getpid()
    return {"host": host or socket.gethostname(), "pid": pid,
            "start_time": process_start_time(pid), "boot_id": boot_id(),
            **_slurm_ids(os.environ), "acquired": time.time(), "token": uuid.uuid4().hex}


# --------------------------------------------------------------------------- reading a lock


def read_lock(path: Path) -> tuple[dict | None, float] | None:
    """``(content, mtime)`` of the lock file at ``path``: content None when it is not a lock
    this module wrote (unparsable); None when there is no file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        # fstat of the descriptor: the mtime of the very file read, fresh after open on NFS
        mtime = os.fstat(fd).st_mtime
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read()
    finally:
        os.close(fd)
    try:
        content = json.loads(raw)
    except ValueError:
        return None, mtime
    ok = (isinstance(content, dict) and isinstance(content.get("host"), str)
          and isinstance(content.get("pid"), int) and isinstance(content.get("token"), str))
    return (content if ok else None), mtime


def holder_text(info: dict) -> str:
    """``pid 1234 on node07 (Slurm job 5678)``: who a lock names."""
    job = info.get("slurm_array_id") or info.get("slurm_job_id")
    return f"pid {info['pid']} on {info['host']}" + (f" (Slurm job {job})" if job else "")


def why_stale(info: dict, mtime: float, me: dict, stale_after_s: float,
              now: float | None = None) -> str | None:
    """Why the lock ``info`` (file mtime ``mtime``) is dead as seen from ``me`` (the content
    ``describe_self`` gives), or None when its holder may be alive. See the module docstring for
    the rules."""
    age = (time.time() if now is None else now) - mtime
    if info["host"] == me["host"]:
        if info.get("boot_id") and me["boot_id"] and info["boot_id"] != me["boot_id"]:
            return "the host rebooted since"
        return _why_dead_here(info["pid"], info.get("start_time"))
    job, restarts = info.get("slurm_job_id"), int(info.get("slurm_restart_count") or 0)
    if job and job == me["slurm_job_id"] and restarts < me["slurm_restart_count"]:
        return (f"Slurm job {job} was requeued (restart {restarts} -> "
                f"{me['slurm_restart_count']})")
    if age > stale_after_s:
        return f"heartbeat {age:.0f} s ago, over {stale_after_s:.0f} s"
    return None


def _why_dead_here(pid: int, start_time: int | None) -> str | None:
    if not _HAVE_PROC:  # no /proc (not Linux): whether the pid exists is all we can tell
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "no such process"
        except PermissionError:
            pass  # another user's process: alive
        return None
    stat = _proc_stat(pid)
    if stat is None:
        return "no such process"
    if stat[0] == "Z":  # killed, not yet reaped by its parent
        return "the process is a zombie"
    if start_time is not None and int(stat[19]) != start_time:
        return f"pid {pid} now belongs to another process"
    return None


def _refusal(run_dir, info: dict, mtime: float, me: dict, stale_after_s: float) -> InUseError:
    age = max(0.0, time.time() - mtime)
    text = f"{run_dir} is in use by {holder_text(info)}, heartbeat {age:.0f} s ago; stop it first"
    if info["host"] != me["host"]:
        text += f", or retry in {max(1.0, stale_after_s - age):.0f} s if it is dead"
    return InUseError(text)


# ------------------------------------------------------------------------------- the lock


class RunLock:
    """A held ``RUN/run.lock``; get one from ``acquire``.

    Attributes: ``path`` (the lock file), ``info`` (what it says about us), ``takeover`` (the
    one-line notice when a dead holder's lock was taken over, else None), ``stale_after_s`` and
    ``heartbeat_every_s``."""

    def __init__(self, path: Path, info: dict, stale_after_s: float, heartbeat_every_s: float,
                 takeover: str | None):
        self.path, self.info, self.takeover = path, info, takeover
        self.stale_after_s, self.heartbeat_every_s = stale_after_s, heartbeat_every_s
        self.held = True
        self.lost: str | None = None  # set by the keep-alive thread when the lock was lost
        self._last_beat = time.monotonic()
        self._beating: threading.Thread | None = None
        self._stop_beating = threading.Event()
        # A stage that ends by an exception without ``with`` or ``release`` still frees the
        # directory for a launch on another node (which would otherwise wait stale_after_s).
        atexit.register(self.release)

    def heartbeat(self, force: bool = False) -> None:
        """Tell other hosts we are alive: call it every training step. It does nothing unless
        ``heartbeat_every_s`` passed since the last beat (or ``force``); then it checks the lock
        is still ours and sets its mtime to now. Raises ``RunLockError`` when another launch took
        the lock over (we went silent past ``stale_after_s``): stop training, our successor owns
        the directory."""
        if not self.held:
            raise RuntimeError(f"heartbeat on a released lock ({self.path})")
        t = time.monotonic()
        if not force and t - self._last_beat < self.heartbeat_every_s:
            return
        self._last_beat = t
        for attempt in range(2):
            fd = self._open_if_ours()
            if fd is not None:
                try:
                    now = time.time()
                    os.utime(fd, (now, now))
                finally:
                    os.close(fd)
                return
            # A takeover race briefly moves even a live lock aside (and links it back): look
            # again before declaring it lost.
            if attempt == 0:
                time.sleep(0.2)
        self.held = False
        found = read_lock(self.path)
        who = holder_text(found[0]) if found and found[0] else "nobody"
        raise RunLockError(f"lost the lock of {self.path.parent}: it is now held by {who}; "
                           f"stop, the directory belongs to them")

    def keep_alive(self) -> None:
        """Beat from a daemon thread every ``heartbeat_every_s`` until ``release``: a live
        holder then never looks dead, however long it spends between steps (a validation
        pass, a slow checkpoint, a kNN monitor), and the training loop need not call
        ``heartbeat`` itself. A lost lock does not raise in the thread; ``lost`` holds its
        one-line message, for the loop to stop on. A hung process keeps beating: that is right,
        it is alive and may still write."""
        def beat():
            while not self._stop_beating.wait(self.heartbeat_every_s):
                try:
                    self.heartbeat(force=True)
                except RunLockError as e:
                    self.lost = str(e)
                    return

        self._beating = threading.Thread(target=beat, name="runlock-heartbeat", daemon=True)
        self._beating.start()

    def _open_if_ours(self) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                content = json.loads(f.read())
            if isinstance(content, dict) and content.get("token") == self.info["token"]:
                return fd
        except ValueError:
            pass
        os.close(fd)
        return None

    def release(self) -> bool:
        """Remove the lock if it is still ours; True when it was. Idempotent; also run at
        interpreter exit. A forked child (a data-loader worker) inherits this object but never
        holds the lock, so in it this does nothing."""
        if self._beating is not None and os.getpid() == self.info["pid"]:
            self._stop_beating.set()
            self._beating.join()
            self._beating = None
        if not self.held or os.getpid() != self.info["pid"]:
            return False
        self.held = False
        atexit.unregister(self.release)
        return _remove_if(self.path, self.info["token"])

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.path)!r}, held={self.held})"


def acquire(run_dir: str | os.PathLike, *, stale_after_s: float = DEFAULT_STALE_AFTER_S,
            heartbeat_every_s: float | None = None, host: str | None = None,
            log: Callable[[str], object] | None = print) -> RunLock:
    """Take ``RUN/run.lock`` for this process, creating ``run_dir`` if needed.

    Arguments: ``stale_after_s``, how long a holder on another host may go without a heartbeat
    before it counts as dead (longer than any stretch between ``heartbeat`` calls);
    ``heartbeat_every_s``, how often ``heartbeat`` really touches the file (default
    ``min(30, stale_after_s / 10)``: a few file-system calls per half minute, and ten beats are
    missed before a live holder looks dead); ``host``, the name this host is recorded and
    compared under (default ``socket.gethostname()``; tests pass another to play a second
    node); ``log``, what the takeover notice is given to (None: silent; it is also
    ``RunLock.takeover``).

    Raises ``RunLockError`` (one line, naming host, pid and Slurm job) when a live process holds
    the lock."""
    if heartbeat_every_s is None:
        heartbeat_every_s = min(30.0, stale_after_s / 10)
    if not 0 < heartbeat_every_s < stale_after_s:
        raise ValueError(f"heartbeat_every_s ({heartbeat_every_s}) must be positive and below "
                         f"stale_after_s ({stale_after_s})")
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    me = describe_self(host)
    tmp = run_dir / f".{LOCK_NAME}.{me['host']}.{me['pid']}.{me['token'][:8]}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunLockError(f"{run_dir} exists and is not a directory: move it away or choose "
                           f"another run directory") from None
    except OSError as e:
        raise RunLockError(f"{run_dir}: cannot create the run directory: "
                           f"{_why_not(e, run_dir)}") from None
    try:
        _write_new(tmp, me)
    except OSError as e:
        with suppress(OSError):  # a read-only file system refuses even that
            tmp.unlink()
        raise RunLockError(f"{run_dir}: cannot write in the run directory: {e.strerror}; a run "
                           f"needs it writable") from None
    try:
        takeover = None
        for _ in range(_MAX_ATTEMPTS):
            if _link(tmp, path):
                if takeover and log is not None:
                    log(takeover)
                return RunLock(path, me, stale_after_s, heartbeat_every_s, takeover)
            found = read_lock(path)
            if found is None:
                continue  # released (or moved aside by a rival) since the link: try again
            info, mtime = found
            if info is None:  # not a lock we wrote (links publish whole files): age decides
                info, reason = _UNREADABLE, _unreadable_stale(path, mtime, stale_after_s)
            else:
                reason = why_stale(info, mtime, me, stale_after_s)
                if reason is None:
                    raise _refusal(run_dir, info, mtime, me, stale_after_s)
            if _move_stale_aside(path, info["token"], me["token"]):
                who = "an unknown holder" if info is _UNREADABLE else holder_text(info)
                takeover = f"{run_dir}: took over the lock of {who}, dead: {reason}"
            # Moved or not, try to create again: a rival that won links first and is refused
            # to us on the next read.
        raise RunLockError(f"{path} kept changing under {_MAX_ATTEMPTS} attempts to take it; "
                           f"are many jobs starting on this run directory?")
    finally:
        tmp.unlink(missing_ok=True)


_UNREADABLE = {"host": "?", "pid": "?", "token": None}


def _why_not(e: OSError, run_dir: Path) -> str:
    """Why ``run_dir`` could not be made, naming the part of its path in the way."""
    for parent in reversed(run_dir.parents):
        if parent.exists() and not parent.is_dir():
            return f"{parent} is not a directory"
    return e.strerror + (f" ({e.filename})" if e.filename and Path(e.filename) != run_dir
                         else "")


def _unreadable_stale(path: Path, mtime: float, stale_after_s: float) -> str:
    """Why an unparsable lock file may be replaced; raises RunLockError while it is recent."""
    age = time.time() - mtime
    if age <= stale_after_s:
        raise RunLockError(f"{path} is not a lock this program wrote and was changed {age:.0f} s "
                           f"ago; remove it if no run uses {path.parent}")
    return f"an unreadable lock file untouched for {age:.0f} s"


def _write_new(tmp: Path, info: dict) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _link(tmp: Path, path: Path) -> bool:
    """Publish ``tmp`` as ``path`` unless ``path`` exists; True when we did."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        # NFS: a retried LINK whose first reply was lost answers EEXIST though it worked.
        return os.stat(tmp).st_nlink == 2


def _move_aside(path: Path, aside: Path) -> str | None | bool:
    """Rename the lock at ``path`` to ``aside``; the token of what was moved (None: not a lock
    we wrote), or False when there was nothing to move."""
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    found = read_lock(aside)
    return found[0]["token"] if found and found[0] else None


def _put_back(aside: Path, path: Path) -> None:
    """Undo ``_move_aside`` for a lock that was not the one meant."""
    try:
        os.link(aside, path)
    except FileExistsError:
        pass  # a third launcher got in between: the rare double holder of the module docstring
    aside.unlink(missing_ok=True)


def _move_stale_aside(path: Path, stale_token: str | None, my_token: str) -> bool:
    """Rename the lock at ``path``, judged stale with token ``stale_token``, out of the way;
    True when what we moved was that lock (we won the takeover). A fresh lock a rival put
    there in the meantime is linked straight back; a lock that vanished returns False."""
    aside = path.with_name(f".{path.name}.stale-{my_token}")
    moved = _move_aside(path, aside)
    if moved is False:
        return False
    if moved == stale_token:
        aside.unlink(missing_ok=True)
        return True
    _put_back(aside, path)
    return False


def _remove_if(path: Path, token: str) -> bool:
    """Delete the lock at ``path`` if it carries ``token``; anyone else's stays in place."""
    aside = path.with_name(f".{path.name}.release-{token}")
    moved = _move_aside(path, aside)
    if moved is False:
        return False
    if moved != token:
        _put_back(aside, path)
        return False
    aside.unlink(missing_ok=True)
    return True
