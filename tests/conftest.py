import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def moco_overrides(shards, run_dir, *extra):
    # 34 images, 17 per rank at 2 ranks: 4 steps of 4 per epoch on each rank.
    return [f"data.root={shards}", "data.datasets=nih,shenzhen", "data.batch_size=8",
            "model.K=32", "optim.epochs=6", "run.log_every_steps=1",
            "run.checkpoint_every_steps=3", "run.image_grid_every_steps=4", "run.max_steps=0",
            f"run.dir={run_dir}", *extra]
