"""The run-directory lock, with real processes: a live holder refuses a second launch, a killed
one is taken over, racing launchers leave exactly one winner, a requeued Slurm job and a silent
other host are recognised as dead, release never removes another's lock."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from muscle_hpc import runlock

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()

# A launcher: takes the lock of RUN_DIR (after --go exists, when given) and prints WON or
# REFUSED; a winner then heartbeats until --until exists (LOST if the lock is taken from it)
# and releases.
CHILD = r"""
import argparse, pathlib, sys, time
from muscle_hpc import runlock
p = argparse.ArgumentParser()
p.add_argument("run_dir")
p.add_argument("--host")
p.add_argument("--stale", type=float, default=900.0)
p.add_argument("--every", type=float)
p.add_argument("--go")
p.add_argument("--until")
a = p.parse_args()
print("READY", flush=True)
if a.go:
    while not pathlib.Path(a.go).exists():  # spin: the rivals start within microseconds
        pass
try:
    lock = runlock.acquire(a.run_dir, stale_after_s=a.stale, heartbeat_every_s=a.every,
                           host=a.host, log=None)
except runlock.RunLockError as e:
    print("REFUSED", e, flush=True)
    sys.exit(3)
print("WON", lock.takeover or "", flush=True)
try:
    while not (a.until and pathlib.Path(a.until).exists()):
        lock.heartbeat()
        time.sleep(0.02)
except runlock.RunLockError as e:
    print("LOST", e, flush=True)
    sys.exit(4)
print("RELEASED" if lock.release() else "NOT-OURS", flush=True)
"""


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def launch(run_dir, *args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), *args], cwd=ROOT,
                            env=env or _clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def said(p: subprocess.Popen) -> str:
    line = p.stdout.readline()
    assert line, f"launcher {p.pid} ended without a word: rc {p.wait()}"
    return line.rstrip("\n")


def hold(run_dir, *args, env=None) -> subprocess.Popen:
    """A launcher that has taken the lock and keeps it until killed."""
    p = launch(run_dir, *args, env=env)
    assert said(p) == "READY"
    assert said(p).startswith("WON"), "the holder could not take the lock"
    return p


def kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stdout.close()


@pytest.fixture(autouse=True)
def no_slurm(monkeypatch):
    for k in list(os.environ):
        if k.startswith("SLURM_"):
            monkeypatch.delenv(k)


def write_lock(run_dir: Path, age_s: float = 0.0, **fields) -> Path:
    """A lock file as another launcher would leave it, last touched ``age_s`` ago."""
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"host": "node-elsewhere", "pid": 4321, "start_time": 123, "boot_id": "b",
            "slurm_job_id": None, "slurm_array_id": None, "slurm_restart_count": 0,
            "acquired": time.time() - age_s, "token": "f" * 32, **fields}
    path = run_dir / runlock.LOCK_NAME
    path.write_text(json.dumps(info))
    t = time.time() - age_s
    os.utime(path, (t, t))
    return path


def lock_content(run_dir: Path) -> dict:
    return json.loads((run_dir / runlock.LOCK_NAME).read_text())


def test_second_launch_is_refused_while_the_holder_lives_and_takes_over_once_it_is_killed(
        tmp_path):
    run_dir = tmp_path / "runs" / "x"
    holder = hold(run_dir)
    try:
        second = launch(run_dir)
        assert said(second) == "READY"
        refusal = said(second)
        assert second.wait() == 3
        second.stdout.close()
        assert refusal.startswith(f"REFUSED {run_dir} is in use by pid {holder.pid} on {HOST}")
        assert "stop it first" in refusal

        with pytest.raises(runlock.RunLockError) as e:
            runlock.acquire(run_dir)
        assert "\n" not in str(e.value) and f"pid {holder.pid} on {HOST}" in str(e.value)
        assert lock_content(run_dir)["pid"] == holder.pid  # the refused launches left it alone
    finally:
        kill(holder)

    notices = []
    with runlock.acquire(run_dir, log=notices.append) as lock:
        assert lock_content(run_dir)["pid"] == os.getpid()
        assert lock_content(run_dir)["token"] == lock.info["token"]
        assert notices == [lock.takeover]
        assert f"took over the lock of pid {holder.pid} on {HOST}, dead: no such process" in (
            lock.takeover)
    assert sorted(os.listdir(run_dir)) == []  # released, and no temp or moved-aside files left


def test_a_killed_holder_not_yet_reaped_counts_as_dead(tmp_path):
    holder = hold(tmp_path)
    holder.send_signal(signal.SIGKILL)
    deadline = time.time() + 10
    while runlock._proc_stat(holder.pid)[0] != "Z":  # a zombie until its parent waits for it
        assert time.time() < deadline
        time.sleep(0.01)
    try:
        with runlock.acquire(tmp_path, log=None) as lock:
            assert "zombie" in lock.takeover
    finally:
        holder.wait()
        holder.stdout.close()


@pytest.mark.parametrize("round_", range(6))
def test_two_launchers_racing_on_a_stale_lock_leave_exactly_one_winner(tmp_path, round_):
    # Whether the two really interleave inside the takeover varies from round to round; the
    # losing interleaving is forced in test_moving_aside_a_lock_that_is_not_the_stale_one_...
    run_dir = tmp_path / "run"
    kill(hold(run_dir))  # its lock stays behind, stale
    dead_token = lock_content(run_dir)["token"]
    go, until = tmp_path / "go", tmp_path / "until"
    rivals = [launch(run_dir, "--go", str(go), "--until", str(until)) for _ in range(2)]
    try:
        assert [said(p) for p in rivals] == ["READY"] * 2
        go.touch()
        words = [said(p) for p in rivals]
        winners = [p for p, w in zip(rivals, words) if w.startswith("WON")]
        assert len(winners) == 1, words
        assert lock_content(run_dir)["pid"] == winners[0].pid
        assert lock_content(run_dir)["token"] != dead_token
        for p, w in zip(rivals, words):
            if p is not winners[0]:
                assert w.startswith(f"REFUSED {run_dir} is in use by pid {winners[0].pid} "), w
                assert p.wait() == 3
        until.touch()
        assert said(winners[0]) == "RELEASED"
        assert winners[0].wait() == 0
    finally:
        for p in rivals:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()
    assert os.listdir(run_dir) == []


def test_the_same_slurm_job_requeued_on_another_node_takes_over(tmp_path, monkeypatch):
    job = _clean_env(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="0")
    holder = hold(tmp_path, "--host", "nodeA", "--every", "0.1", env=job)
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        # A second launch inside the same allocation (no requeue): the holder may be alive.
        monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
        with pytest.raises(runlock.RunLockError, match=rf"in use by pid {holder.pid} on nodeA "
                                                       r"\(Slurm job 4242\)"):
            runlock.acquire(tmp_path, host="nodeB")
        # Requeued: Slurm has ended the old run, whatever its heartbeat says.
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        lock = runlock.acquire(tmp_path, host="nodeB", log=None)
        assert "Slurm job 4242 was requeued (restart 0 -> 1)" in lock.takeover
        assert lock_content(tmp_path)["slurm_restart_count"] == 1
        # The displaced holder (here alive, which Slurm would not allow) learns it at its next
        # heartbeat and stops; our lock stays.
        lost = said(holder)
        assert lost.startswith(f"LOST lost the lock of {tmp_path}: it is now held by pid "
                               f"{os.getpid()} on nodeB (Slurm job 4242)"), lost
        assert holder.wait() == 4
        assert lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()
        holder.stdout.close()


def test_the_same_slurm_job_on_this_host_with_a_live_holder_is_refused(tmp_path, monkeypatch):
    # torchrun's agent killed, its workers alive, a relaunch in the same job on the same node:
    # the case the lock exists for.
    holder = hold(tmp_path, env=_clean_env(SLURM_JOB_ID="77", SLURM_ARRAY_JOB_ID="70",
                                           SLURM_ARRAY_TASK_ID="7"))
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "77")
        with pytest.raises(runlock.RunLockError,
                           match=rf"pid {holder.pid} on {HOST} \(Slurm job 70_7\)"):
            runlock.acquire(tmp_path)
        # Stuck (no heartbeat for long) but alive on this host: still the holder.
        os.utime(tmp_path / runlock.LOCK_NAME, (time.time() - 3600,) * 2)
        with pytest.raises(runlock.RunLockError, match=r"heartbeat 3600 s ago; stop it first$"):
            runlock.acquire(tmp_path, stale_after_s=60)
    finally:
        kill(holder)
    with runlock.acquire(tmp_path, log=None) as lock:
        assert "no such process" in lock.takeover


def test_another_hosts_lock_is_live_while_its_heartbeat_is_fresh(tmp_path):
    write_lock(tmp_path, age_s=5, slurm_job_id="5678")
    with pytest.raises(runlock.RunLockError) as e:
        runlock.acquire(tmp_path, stale_after_s=60)
    assert str(e.value) == (f"{tmp_path} is in use by pid 4321 on node-elsewhere (Slurm job "
                            f"5678), heartbeat 5 s ago; stop it first, or retry in 55 s if it "
                            f"is dead")

    write_lock(tmp_path, age_s=61)
    with runlock.acquire(tmp_path, stale_after_s=60, log=None) as lock:
        assert lock.takeover == (f"{tmp_path}: took over the lock of pid 4321 on "
                                 f"node-elsewhere, dead: heartbeat 61 s ago, over 60 s")


def test_a_heartbeating_holder_on_another_host_stays_live_and_is_taken_over_once_silent(
        tmp_path):
    holder = hold(tmp_path, "--host", "nodeA", "--stale", "2", "--every", "0.2")
    try:
        time.sleep(3)  # longer than stale_after_s: only its heartbeats keep the lock live
        with pytest.raises(runlock.RunLockError, match=f"pid {holder.pid} on nodeA"):
            runlock.acquire(tmp_path, stale_after_s=2, host="nodeB")
    finally:
        kill(holder)
    time.sleep(2.5)
    with runlock.acquire(tmp_path, stale_after_s=2, host="nodeB", log=None) as lock:
        assert lock.takeover.startswith(f"{tmp_path}: took over the lock of pid {holder.pid} "
                                        f"on nodeA, dead: heartbeat ")
        assert lock.takeover.endswith(" s ago, over 2 s")


def test_heartbeat_touches_the_file_at_most_every_heartbeat_every_s(tmp_path):
    lock = runlock.acquire(tmp_path, stale_after_s=10, heartbeat_every_s=0.5)
    path = tmp_path / runlock.LOCK_NAME
    os.utime(path, (1000, 1000))
    lock.heartbeat()
    assert path.stat().st_mtime == 1000  # too soon after acquiring
    time.sleep(0.6)
    lock.heartbeat()
    assert abs(path.stat().st_mtime - time.time()) < 5
    os.utime(path, (1000, 1000))
    lock.heartbeat(force=True)
    assert path.stat().st_mtime > 1000
    lock.release()
    with pytest.raises(RuntimeError):
        lock.heartbeat()


def test_release_removes_only_our_own_lock(tmp_path):
    lock = runlock.acquire(tmp_path, host="nodeA", stale_after_s=10)
    assert (tmp_path / runlock.LOCK_NAME).exists()
    assert lock.release() is True
    assert not (tmp_path / runlock.LOCK_NAME).exists()
    assert lock.release() is False

    # nodeA goes silent, nodeB takes over; nodeA's release must leave nodeB's lock in place.
    old = runlock.acquire(tmp_path, host="nodeA", stale_after_s=10)
    os.utime(tmp_path / runlock.LOCK_NAME, (time.time() - 11,) * 2)
    new = runlock.acquire(tmp_path, host="nodeB", stale_after_s=10, log=None)
    assert "on nodeA, dead: heartbeat 11 s ago" in new.takeover
    assert old.release() is False
    assert lock_content(tmp_path)["token"] == new.info["token"]
    new.heartbeat(force=True)  # still nodeB's
    with new:
        pass
    assert os.listdir(tmp_path) == []


def test_a_holder_that_was_taken_over_is_told_at_its_next_heartbeat(tmp_path):
    old = runlock.acquire(tmp_path, host="nodeA", stale_after_s=10)
    os.utime(tmp_path / runlock.LOCK_NAME, (time.time() - 11,) * 2)
    new = runlock.acquire(tmp_path, host="nodeB", stale_after_s=10, log=None)
    with pytest.raises(runlock.RunLockError) as e:
        old.heartbeat(force=True)
    assert str(e.value) == (f"lost the lock of {tmp_path}: it is now held by pid {os.getpid()} "
                            f"on nodeB; stop, the directory belongs to them")
    assert lock_content(tmp_path)["token"] == new.info["token"]
    assert new.release()


def test_keep_alive_beats_from_a_thread_and_reports_a_lost_lock_without_raising(tmp_path):
    """The stages' holder beats from a thread (long validations never make it look dead);
    losing the lock is a flag for the training loop to stop on, not an exception in a thread."""
    old = runlock.acquire(tmp_path, host="nodeA", stale_after_s=2, heartbeat_every_s=0.2)
    path = tmp_path / runlock.LOCK_NAME
    old.keep_alive()
    os.utime(path, (1000, 1000))
    time.sleep(0.6)
    assert abs(path.stat().st_mtime - time.time()) < 5 and old.lost is None
    old.release()  # stops the thread first: the file is gone and stays gone
    assert not path.exists()
    time.sleep(0.4)
    assert not path.exists()

    old = runlock.acquire(tmp_path, host="nodeA", stale_after_s=2, heartbeat_every_s=0.2)
    old.keep_alive()
    os.remove(path)  # as a takeover leaves it: the file is no longer ours
    new = runlock.acquire(tmp_path, host="nodeB", stale_after_s=2, log=None)
    time.sleep(1.0)
    assert old.lost == (f"lost the lock of {tmp_path}: it is now held by pid {os.getpid()} on "
                        f"nodeB; stop, the directory belongs to them")
    assert not old.release() and new.release()


def test_the_context_manager_releases_on_an_exception(tmp_path):
    with pytest.raises(KeyError), runlock.acquire(tmp_path / "a" / "b"):
        assert (tmp_path / "a" / "b" / runlock.LOCK_NAME).exists()
        raise KeyError("boom")
    assert os.listdir(tmp_path / "a" / "b") == []


def test_a_recycled_pid_counts_as_dead(tmp_path):
    me = runlock.describe_self()
    assert me["start_time"] == runlock.process_start_time(os.getpid()) is not None
    write_lock(tmp_path, host=HOST, pid=os.getpid(), start_time=me["start_time"],
               boot_id=me["boot_id"])
    with pytest.raises(runlock.RunLockError, match=f"in use by pid {os.getpid()} on {HOST}"):
        runlock.acquire(tmp_path)  # that is us: alive

    write_lock(tmp_path, host=HOST, pid=os.getpid(), start_time=me["start_time"] - 1,
               boot_id=me["boot_id"])
    with runlock.acquire(tmp_path, log=None) as lock:
        assert lock.takeover.endswith(f"dead: pid {os.getpid()} now belongs to another process")

    write_lock(tmp_path, host=HOST, pid=os.getpid(), start_time=me["start_time"],
               boot_id="another-boot")
    with runlock.acquire(tmp_path, log=None) as lock:
        assert lock.takeover.endswith("dead: the host rebooted since")


def test_an_unreadable_lock_file_is_kept_until_it_is_old(tmp_path):
    path = tmp_path / runlock.LOCK_NAME
    path.write_text("not json")
    with pytest.raises(runlock.RunLockError, match="is not a lock this program wrote"):
        runlock.acquire(tmp_path, stale_after_s=60)
    assert path.read_text() == "not json"
    os.utime(path, (time.time() - 61,) * 2)
    with runlock.acquire(tmp_path, stale_after_s=60, log=None) as lock:
        assert "took over the lock of an unknown holder" in lock.takeover


def test_moving_aside_a_lock_that_is_not_the_stale_one_puts_it_back(tmp_path):
    # The race's losing side: a rival judged the old lock stale, but the winner's lock is in
    # place by the time it renames; the rival must link the winner's lock straight back.
    winner = runlock.acquire(tmp_path, stale_after_s=10)
    path = tmp_path / runlock.LOCK_NAME
    inode = path.stat().st_ino
    assert runlock._move_stale_aside(path, "a-dead-token", "rival") is False
    assert path.stat().st_ino == inode
    winner.heartbeat(force=True)  # still ours
    assert runlock._move_stale_aside(path, winner.info["token"], "rival") is True
    assert not path.exists() and os.listdir(tmp_path) == []


def test_heartbeat_every_s_must_be_below_stale_after_s(tmp_path):
    with pytest.raises(ValueError, match="must be positive and below"):
        runlock.acquire(tmp_path, stale_after_s=5, heartbeat_every_s=5)
    assert runlock.acquire(tmp_path, stale_after_s=900).heartbeat_every_s == 30


def test_the_lock_is_released_when_the_holder_ends_by_an_exception(tmp_path):
    crash = ("import sys\nfrom muscle_hpc import runlock\nrunlock.acquire(sys.argv[1])\n"
             "raise RuntimeError('diverged')")
    r = subprocess.run([sys.executable, "-c", crash, str(tmp_path)], cwd=ROOT, env=_clean_env(),
                       capture_output=True, text=True)
    assert r.returncode == 1 and "diverged" in r.stderr
    assert os.listdir(tmp_path) == []


def test_a_forked_child_that_exits_leaves_the_parents_lock(tmp_path):
    fork = ("import os, sys\nfrom muscle_hpc import runlock\n"
            "lock = runlock.acquire(sys.argv[1])\n"
            "pid = os.fork()\n"
            "if pid == 0:\n    lock.release()\n    sys.exit(0)\n"  # release and atexit: no-ops
            "os.waitpid(pid, 0)\n"
            "print(os.path.exists(lock.path), lock.release(), os.path.exists(lock.path))")
    r = subprocess.run([sys.executable, "-c", fork, str(tmp_path)], cwd=ROOT, env=_clean_env(),
                       capture_output=True, text=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, "True True False\n", "")
