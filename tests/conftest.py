import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny-model tests: tiny convolutions are dominated by
    thread hand-offs (tens of times slower on a busy 2-core box). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_avdigits(tmp_path_factory) -> Path:
    """A data dir holding a small generated + prepared avdigits (cpu preset): 10 classes x (6 train, 1 val, 3 test)."""
    from cign_runtime.spec import get_preset
    from cign_train.data import definitions as defs
    from cign_train.data.avdigits import AvdigitsConfig, generate
    from cign_train.data.ingest import store_dir
    from cign_train.data.prepare import prepare_store

    data_dir = tmp_path_factory.mktemp("data")
    root = data_dir / "avdigits"
    index = generate(root, AvdigitsConfig(train_per_class=6, val_per_class=1, test_per_class=3), seed=0,
                     workers=2, progress=False)
    candidates, rejected = defs.avdigits_candidates(index, root / "clips")
    prepare_store(store_dir(data_dir, "avdigits", "cpu"), "avdigits", get_preset("cpu"), defs.AVDIGITS_CLASSES,
                  candidates, rejected, workers=2, progress=False)
    return data_dir


@pytest.fixture(scope="session")
def tiny_run(tiny_avdigits, tmp_path_factory) -> Path:
    """A finished 2-task CIGN run (5 + 5 classes, D 32, the cpu preset's cnn8 encoders) trained on ``tiny_avdigits``."""
    from cign_train.config import CIGNConfig
    from cign_train.settings import TrainSettings
    from cign_train.trainer import Trainer

    run = tmp_path_factory.mktemp("runs") / "avdigits-cign-seed0"
    settings = TrainSettings(dataset="avdigits", data_dir=str(tiny_avdigits), spec="cpu", tasks=2, epochs=2, batch_size=8,
                             lr=1e-3, buffer_per_class=2, workers=0,
                             model=CIGNConfig(encoder="cnn8", dim=32, depth=1, heads=4))
    Trainer(settings, run, progress=False).run()
    return run


@pytest.fixture
def torchless_env(tmp_path) -> dict:
    """Environment for a subprocess in which ``import torch`` fails ("torch is blocked") and the checkout imports."""
    import os

    fake = tmp_path / "torchless"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch is blocked: the runtime must not need it')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), str(Path(__file__).parents[1])])}


@pytest.fixture(scope="session")
def pulse(tmp_path_factory):
    """A private PulseAudio daemon whose null sink's monitor is the default capture device (``tests/pulse.py``).

    Fails in CI (set-up installs PulseAudio), skips elsewhere when PulseAudio cannot run.
    """
    from pulse import PulseUnavailable, null_sink

    try:
        with null_sink(tmp_path_factory.mktemp("pulse")) as server:
            yield server
    except PulseUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"PulseAudio is required in CI: {e}")
        pytest.skip(str(e))
