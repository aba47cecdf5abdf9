import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


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
