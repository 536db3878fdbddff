import json
import os
from types import SimpleNamespace

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
def session_home(tmp_path_factory):
    """The BYOM_LAB_HOME of this test session, so that no test reads or writes the user's cache."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture(autouse=True)
def _isolated_home(session_home, monkeypatch):
    """Every test runs with BYOM_LAB_HOME at the session's home, restored afterwards.

    Set per test, never for the whole session: the notebook kernels that nbval starts later in
    the same run inherit the environment, and must see the real (built) cache.
    """
    monkeypatch.setenv("BYOM_LAB_HOME", str(session_home))


@pytest.fixture(scope="session")
def reduced(session_home):
    """A reduced tiny suite (2 tasks, 96 training images, 1 epoch) built cold in the session's home, with build time."""
    import time

    import byom_lab as bl
    from byom_lab.finetune import FinetuneConfig

    old = os.environ.get("BYOM_LAB_HOME")  # a session fixture is set up before the per-test home
    os.environ["BYOM_LAB_HOME"] = str(session_home)
    try:
        start = time.time()
        suite = bl.load_suite("tiny", finetune=FinetuneConfig(epochs=1), **QUICK)
        seconds = time.time() - start
    finally:
        if old is None:
            del os.environ["BYOM_LAB_HOME"]
        else:
            os.environ["BYOM_LAB_HOME"] = old
    return suite, seconds


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the calls of the fused merge and selection kernels (byom_lab.merging.native) during a test."""
    from byom_lab.merging import native

    counts = {"merge": 0, "select": 0}
    for name in counts:
        original = getattr(native, name)

        def spy(*a, _name=name, _original=original, **k):
            counts[_name] += 1
            return _original(*a, **k)

        monkeypatch.setattr(native, name, spy)
    return counts


SMALL_CLIP = {"embed_dim": 32, "quick_gelu": True,
              "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="session")
def small_clip(tmp_path_factory):
    """A small open_clip CLIP (2 layers, 2 heads, QuickGELU, 32 px, seed 0) from a custom config.

    Returns (model, name, config): the config is registered with open_clip under `name`. The model is shared
    by the whole session: tests read it and never change its weights (copy it first).
    """
    from byom_lab.model import open_clip

    oc = open_clip()
    name = "byom-small-test-clip"
    path = tmp_path_factory.mktemp("cfg") / f"{name}.json"
    path.write_text(json.dumps(SMALL_CLIP))
    oc.add_model_config(path)
    torch.manual_seed(0)
    return SimpleNamespace(model=oc.create_model(name).eval(), name=name, config=SMALL_CLIP)
