import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep import convert  # noqa: E402
from data_prep.datasets.base import DatasetSpec, Record, Scan  # noqa: E402


@pytest.fixture(autouse=True)
def restore_environ():
    """Stages run in-process export RANK, MASTER_PORT, ... (as DeepSpeed expects); keep them
    from leaking into later tests and the jobs those submit."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def make_flat_dataset(root: Path, name: str, n: int, value: int, role="pretrain") -> DatasetSpec:
    """``n`` images of constant gray ``value`` (one patient each) and a plug-in listing them."""
    folder = root / name
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((24, 40), value, np.uint8)).save(folder / f"{i:04d}.png")

    def scan(r: Path) -> Scan:
        return Scan([Record(p, p.stem, label=int(p.stem) % 2) for p in sorted(r.glob("*.png"))])

    return DatasetSpec(name, (name,), role, ("label",), scan, label_names=("a", "b"))


@pytest.fixture(scope="session")
def flat_shards(tmp_path_factory):
    """Two converted pre-training sets told apart by gray level: 'dark' (23 images of 40) and
    'bright' (11 images of 200), stored at 40x24."""
    base = tmp_path_factory.mktemp("flat")
    out = base / "shards"
    for name, n, value in (("dark", 23, 40), ("bright", 11, 200)):
        spec = make_flat_dataset(base / "src", name, n, value)
        convert.convert_dataset(spec, base / "src" / name, out, size=(40, 24), log=lambda *_: 0)
    return out


@pytest.fixture(scope="session")
def moco_shards(tmp_path_factory):
    """Two pre-training sets under real dataset names (the config only accepts those)."""
    base = tmp_path_factory.mktemp("moco")
    for name, n, value in (("nih", 23, 40), ("shenzhen", 11, 200)):
        spec = make_flat_dataset(base / "src", name, n, value)
        convert.convert_dataset(spec, base / "src" / name, base / "shards", size=(40, 24),
                                log=lambda *_: 0)
    return base / "shards"


@pytest.fixture(scope="session")
def task_shards(tmp_path_factory):
    """The four task sets of the tiny demo data, converted at 128x80 (pneumonia 32, mura 28,
    chestmasks 24, tbx11k 19 training images)."""
    from data_prep import synth
    from data_prep.datasets import get_spec

    base = tmp_path_factory.mktemp("tasks")
    synth.generate(base / "downloads", "tiny")
    for name in ("pneumonia", "mura", "chestmasks", "tbx11k"):
        spec = get_spec(name)
        folder = convert.find_dataset_folder(spec, base / "downloads")
        convert.convert_dataset(spec, folder, base / "shards", size=(128, 80),
                                log=lambda *_: 0)
    return base / "shards"


def moco_overrides(shards, run_dir, *extra):
    # 34 images, 17 per rank at 2 ranks: 4 steps of 4 per epoch on each rank.
    return [f"data.root={shards}", "data.datasets=nih,shenzhen", "data.batch_size=8",
            "model.K=32", "model.bn_groups=2", "optim.epochs=6", "run.log_every_steps=1",
            "run.checkpoint_every_steps=3", "run.image_grid_every_steps=4", "run.max_steps=0",
            "run.monitor_every_steps=0",  # these shards hold no task set to run the kNN on
            f"run.dir={run_dir}", *extra]


def start_ranks(stage: str, world: int, args, port=None) -> list[subprocess.Popen]:
    """``python -m muscle_hpc.stages.<stage> ARGS`` as ``world`` ranks, started the way torchrun
    starts them (RANK, WORLD_SIZE, MASTER_* in the environment), one thread each."""
    from muscle_hpc.dist import free_port

    port = port or free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, "-m", f"muscle_hpc.stages.{stage}", *args],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def finish_ranks(procs, timeout=300):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], outs


def stopped_at_step(stage: str, args, step: int) -> int:
    """Start ``stage`` on one rank, send it SIGTERM when it reports ``step``, and return the
    step it stopped after: the stop is agreed at the end of a step, that of ``step`` if the
    signal beat it, else the next."""
    (proc,) = start_ranks(stage, 1, args)
    for line in proc.stdout:
        if line.startswith(f"step {step}/"):
            proc.send_signal(signal.SIGTERM)
            break
    codes, outs = finish_ranks([proc])
    assert codes == [128 + signal.SIGTERM], outs[0][-2000:]
    stopped = re.search(r"stopped by signal 15 after step (\d+)", outs[0])
    assert stopped and int(stopped[1]) in (step, step + 1), outs[0][-2000:]
    return int(stopped[1])


def run_ranks(stage: str, world: int, args) -> str:
    """Rank 0's output of a run that must succeed on every rank."""
    codes, outs = finish_ranks(start_ranks(stage, world, args))
    assert codes == [0] * world, [o[-3000:] for o in outs]
    return outs[0]


_BENCHMARK_MODELS = """
import json, sys
import torch
from bench.stages import moco_workload, task_workload
from muscle_hpc import dist
dist.init_distributed(dist.DistEnv(0, 1, 0, "127.0.0.1", dist.free_port()), backend="gloo")
out = []
for stage, task in json.loads(sys.argv[1]):
    w = (moco_workload("resnet18", 2, (64, 48), 4, torch.device("cpu")) if stage == "mdmoco"
         else task_workload(stage, task, "resnet18", 2, (64, 48), 4, torch.device("cpu")))
    out.append({k: list(v.shape) for k, v in w.model.state_dict().items()})
print(json.dumps(out))
"""


def benchmark_models(*workloads: tuple[str, str | None]) -> list[dict[str, tuple]]:
    """The tensors (name: shape) of the models ``bench.stages`` times for each ``(stage,
    task)``, at ResNet-18, built as its timing mode builds them (workloads on 64x48 random
    images: no module depends on the size), in a one-rank process of their own (DeepSpeed keeps
    the first process group it meets, so a second one in this process would fail)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _BENCHMARK_MODELS, json.dumps(workloads)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [{k: tuple(v) for k, v in shapes.items()}
            for shapes in json.loads(done.stdout.splitlines()[-1])]


def assert_same_model(stage_state: dict, shapes: dict[str, tuple], skip=()) -> None:
    """A benchmark's model (its tensors' ``shapes``) is the one a stage trained (its
    checkpoint's ``stage_state``): every tensor under the same name with the same shape, so the
    same modules and as many parameters. ``skip``: tensors whose size is a setting, not the
    architecture (MoCo's queue of ``model.K``)."""
    stages = {k: tuple(v.shape) for k, v in stage_state.items() if k not in skip}
    assert {k: v for k, v in shapes.items() if k not in skip} == stages


class Tmpfs:
    """Real tmpfs mounts under one folder, for what only a real file system shows: a full one
    (``size``), a read-only one. Needs the right to mount (root outside a locked-down
    container); without it the test is skipped, saying so."""

    def __init__(self, base: Path):
        self.base, self.mounted = base, []

    def mount(self, size: str, name: str = "fs") -> Path:
        """A fresh tmpfs of ``size`` (mount's syntax: 1m, 200m) at ``base/name``."""
        where = self.base / name
        where.mkdir()
        self._mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
        self.mounted.append(where)
        return where

    def read_only(self, where: Path) -> None:
        self._mount("-o", "remount,ro", str(where))

    @staticmethod
    def _mount(*args: str) -> None:
        try:
            done = subprocess.run(["mount", *args], capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command here, and the test needs a real tmpfs")
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}), and the test "
                        f"needs a real one")

    def unmount_all(self) -> None:
        for where in reversed(self.mounted):
            subprocess.run(["umount", "--lazy", str(where)], check=False)


@pytest.fixture
def tmpfs(tmp_path):
    mounts = Tmpfs(tmp_path)
    yield mounts
    mounts.unmount_all()
