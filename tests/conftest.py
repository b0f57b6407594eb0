import os
from pathlib import Path

# One torch thread, here and in the commands the tests start (unless the caller chose): the tests' models are
# tiny (32-64 px), where a second thread gains little, and where the cores are shared it costs a lot (a ResNet-18
# forward at 32 px took 1.4 s with two threads against 0.04 s with one, measured on a busy 2-core machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Real data lives beside the project root, never inside it.
REAL_DATA = Path(os.environ.get("COVID_FASTAI_REAL_DATA", Path(__file__).resolve().parents[1].parent / "shared/data/cxr"))


def bench_module(name: str):
    "A script of bench/ imported as a module (bench/ put on the path: the scripts import each other)."
    import importlib.util
    import sys
    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path: sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    "Tests never depend on (or fill) the user's cache: demo data and weights go to a fresh folder."
    old = os.environ.get("COVID_FASTAI_CACHE")
    os.environ["COVID_FASTAI_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None: os.environ.pop("COVID_FASTAI_CACHE", None)
    else: os.environ["COVID_FASTAI_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    "A tiny synthetic ImageFolder set (train/valid/test x infected/normal), 64 px."
    from covid_fastai.demo import make_demo_data
    return make_demo_data(tmp_path_factory.mktemp("tiny"), counts={"train": 12, "valid": 6, "test": 6}, size=64)


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """One finished run, shared by the tests that only read a run (evaluate, predict, report, export).
    64 px: ResNet's layer4 is 2x2 there, so Grad-CAM has something to show; a higher lr so it learns a bit."""
    from covid_fastai.train import run_recipe
    return run_recipe("resnet18_head", out=tmp_path_factory.mktemp("runs"), data=str(tiny_data), epochs=2,
                      pretrained=False, size=64, bs=8, lr=0.01)


class FineLabelled:
    "A copy of tiny_data with a labels.csv of three fine labels (covid / pneumonia / normal); `write()` saves edits."
    def __init__(self, src: Path, root: Path):
        import shutil
        shutil.copytree(src, root)
        self.root = root
        self.files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
        self.fine = [("covid" if i % 2 else "pneumonia") if f.split("/")[1] == "infected" else "normal"
                     for i, f in enumerate(self.files)]
        self.write()

    def write(self):
        import pandas as pd
        pd.DataFrame({"file": self.files, "fine_label": self.fine}).to_csv(self.root / "labels.csv", index=False)

    def relabel_one_training_film(self):
        i = next(i for i, f in enumerate(self.files) if f.startswith("train/infected"))
        self.fine[i] = "pneumonia" if self.fine[i] == "covid" else "covid"
        self.write()


@pytest.fixture
def fine_labelled(tiny_data, tmp_path) -> FineLabelled:
    return FineLabelled(tiny_data, tmp_path / "fine")


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "train").is_dir():
        pytest.skip(f"real X-ray data not found at {REAL_DATA} (set COVID_FASTAI_REAL_DATA to its folder)")
    return REAL_DATA


@pytest.fixture(scope="session")
def labelled_run(tiny_data, tmp_path_factory):
    """(run folder, what it printed) of one tiny run on a copy of tiny_data with a labels.csv: source siteA holds the
    24 infected films and one normal one (96% infected), siteB the other 23 normal films, each with its licence.
    Its body is frozen and its features cached, so every phase around training happens; stdout is not a tty."""
    import contextlib
    import io
    import shutil

    import pandas as pd
    import torch
    from covid_fastai.train import run_recipe
    root = tmp_path_factory.mktemp("labelled") / "data"
    shutil.copytree(tiny_data, root)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    src = ["siteA" if f.split("/")[1] == "infected" or f == "test/normal/synthetic_test_normal_000.png" else "siteB"
           for f in files]
    pd.DataFrame({"file": files, "source": src, "patient_id": [f"p{i}" for i in range(len(files))],
                  "licence": ["CC BY 4.0" if s == "siteA" else "research use only" for s in src]}
                 ).to_csv(root / "labels.csv", index=False)
    n, out = torch.get_num_threads(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out):
            d = run_recipe("resnet18_head", out=root.parent / "runs", data=str(root), epochs=1, pretrained=False,
                           size=32, bs=8, lr=0.01, cache_features="on")
    finally:
        torch.set_num_threads(n)
    return d, out.getvalue()


# The few long tests start first: pytest-xdist hands tests out in collection order, and the real-data fit (about
# 2 minutes on 2 busy cores) collected near the end left one worker running it alone at the end of the suite.
LONG_FIRST = ("test_realdata.py", "test_distributed.py", "test_ray_sweep.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda it: next((i for i, name in enumerate(LONG_FIRST) if it.nodeid.startswith(f"tests/{name}")),
                                   len(LONG_FIRST)))
