import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture
def one_thread():
    """Run a test with one torch thread (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tmp_home(tmp_path, monkeypatch):
    """A fresh, empty BYOM_LAB_HOME."""
    home = tmp_path / "home"
    monkeypatch.setenv("BYOM_LAB_HOME", str(home))
    return home


QUICK = dict(tasks=["textures", "signs"], max_train=96)


@pytest.fixture(scope="session")
def reduced(tmp_path_factory):
    """A reduced tiny suite (2 tasks, 96 training images, 1 epoch) built cold in its own cache, with build time."""
    import time

    import byom_lab as bl
    from byom_lab.finetune import FinetuneConfig

    old = os.environ.get("BYOM_LAB_HOME")
    os.environ["BYOM_LAB_HOME"] = str(tmp_path_factory.mktemp("home"))
    start = time.time()
    try:
        suite = bl.load_suite("tiny", finetune=FinetuneConfig(epochs=1), **QUICK)
        yield suite, time.time() - start
    finally:
        if old is None:
            del os.environ["BYOM_LAB_HOME"]
        else:
            os.environ["BYOM_LAB_HOME"] = old
