"""provenance.json: code version from git (or the package), software versions, hosts and GPUs,
one entry appended per start."""

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from muscle_hpc import provenance

ROOT = Path(__file__).resolve().parents[1]


def git(cwd, *args) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
                          cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_the_code_version_of_this_checkout_is_what_git_says():
    code = provenance.code_version()  # the package's own directory: this worktree
    assert code["commit"] == git(ROOT, "rev-parse", "HEAD").strip()
    assert code["dirty"] == bool(git(ROOT, "status", "--porcelain", "--untracked-files=no")
                                 .strip())
    assert code["version"] == importlib.metadata.version("muscle-hpc")
    assert "git_error" not in code


def test_dirty_means_a_tracked_file_changed(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "pkg/a.py")
    git(tmp_path, "commit", "-q", "-m", "one")
    head = git(tmp_path, "rev-parse", "HEAD").strip()

    assert provenance.code_version(tmp_path / "pkg") == {
        "commit": head, "dirty": False, "version": importlib.metadata.version("muscle-hpc")}
    (tmp_path / "pkg" / "run_output.json").write_text("{}")  # untracked: still clean
    assert provenance.code_version(tmp_path / "pkg")["dirty"] is False
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert provenance.code_version(tmp_path / "pkg")["dirty"] is True
    git(tmp_path, "commit", "-q", "-am", "two")
    code = provenance.code_version(tmp_path / "pkg")
    assert code["dirty"] is False and code["commit"] != head


def test_outside_a_git_checkout_the_package_version_is_recorded(tmp_path):
    code = provenance.code_version(tmp_path)
    assert code["commit"] is None and code["dirty"] is None
    assert code["version"] == importlib.metadata.version("muscle-hpc")
    assert "not a git repository" in code["git_error"]


def test_an_untracked_directory_inside_a_checkout_is_not_that_checkouts_code(tmp_path):
    # A copy installed into a virtualenv that sits, untracked, inside some other repository.
    git(tmp_path, "init", "-q")
    (tmp_path / "tracked.txt").write_text("x")
    git(tmp_path, "add", "tracked.txt")
    git(tmp_path, "commit", "-q", "-m", "other project")
    site = tmp_path / ".venv" / "site-packages" / "muscle_hpc"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    code = provenance.code_version(site)
    assert code["commit"] is None and "holds no file tracked by git" in code["git_error"]


def test_software_versions_are_the_installed_ones():
    versions = provenance.software_versions()
    for name in ("torch", "torchvision", "deepspeed", "ffcv", "numpy"):
        assert versions[name] == importlib.metadata.version(name), name
    assert versions["python"] == platform.python_version()
    assert versions["cuda"] == torch.version.cuda


def test_this_rank_names_host_pid_and_gpu():
    me = provenance.this_rank()
    gpu = torch.cuda.get_device_name(torch.cuda.current_device()) \
        if torch.cuda.is_available() else None
    assert me == {"host": socket.gethostname(), "pid": os.getpid(), "gpu": gpu}


def test_record_appends_one_entry_per_start(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "moco"
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    first = provenance.record(run_dir, [{"host": "node2", "pid": 1, "gpu": "NVIDIA H200"},
                                        {"host": "node1", "pid": 2, "gpu": "NVIDIA H200"},
                                        {"host": "node2", "pid": 3, "gpu": "NVIDIA A100"}],
                              3, "mdmoco")
    assert first["hosts"] == ["node1", "node2"]
    assert first["gpus"] == {"NVIDIA A100": 1, "NVIDIA H200": 2}
    assert first["world_size"] == 3 and first["stage"] == "mdmoco"
    assert first["slurm_job_id"] is None and first["slurm_restart_count"] == 0
    assert first["code"] == provenance.code_version()
    assert first["versions"] == provenance.software_versions()

    # resumed on another node after a requeue
    monkeypatch.setenv("SLURM_JOB_ID", "5678")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    second = provenance.record(run_dir, [provenance.this_rank()], 1, "mdmoco")
    assert second["hosts"] == [socket.gethostname()]
    assert second["slurm_job_id"] == "5678" and second["slurm_restart_count"] == 1
    assert second["gpus"] == {(provenance.this_rank()["gpu"] or "cpu"): 1}

    assert json.loads((run_dir / "provenance.json").read_text()) == [first, second]
    assert provenance.read(run_dir / "provenance.json") == [first, second]
    assert sorted(os.listdir(run_dir)) == ["provenance.json"]  # no temp file left


def test_record_refuses_a_partial_gather(tmp_path):
    with pytest.raises(ValueError, match="provenance of 1 ranks for a world of 2"):
        provenance.record(tmp_path, [provenance.this_rank()], 2, "finetune")
    assert not (tmp_path / "provenance.json").exists()


def test_a_hand_broken_file_is_kept_aside_and_a_new_list_started(tmp_path):
    path = tmp_path / "provenance.json"
    path.write_text('{"not": "a list"}')
    with pytest.warns(UserWarning, match="was not a JSON list"):
        entry = provenance.record(tmp_path, [provenance.this_rank()], 1, "continual")
    assert json.loads(path.read_text()) == [entry]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("provenance.json.unreadable-")]
    assert len(kept) == 1 and kept[0].read_text() == '{"not": "a list"}'
