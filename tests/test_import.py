"""Importing covid_fastai changes nothing global: the matplotlib backend, the warning filters and the process
settings stay as the user had them, and the torch.jit.script deprecation fastai's import triggers stays quiet; the
names load on first use."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One fresh interpreter (a module imports once per process). The backend is pdf: not Agg, and it needs no
# display, standing for a notebook's inline backend or a desktop's Qt. torch, PIL and matplotlib come first so
# their own settings are in `before`; fastai does not, so its import-time jit warning would show on stderr.
IMPORT_AND_COMPARE = textwrap.dedent("""
    import json, sys, warnings
    import matplotlib, numpy, PIL.Image, torch
    def state():
        return {"backend": matplotlib.get_backend(), "threads": torch.get_num_threads(),
                "dtype": str(torch.get_default_dtype()), "deterministic": torch.are_deterministic_algorithms_enabled(),
                "max_pixels": PIL.Image.MAX_IMAGE_PIXELS, "recursion": sys.getrecursionlimit(),
                "numpy_print": numpy.get_printoptions()["linewidth"],
                "jit_filters": [repr(f) for f in warnings.filters if "jit" in repr(f[1])]}
    before = state()
    from covid_fastai import *
    import covid_fastai.cli, covid_fastai.report
    import matplotlib.pyplot
    print(json.dumps([before, state(), matplotlib.pyplot.get_fignums()]))
""")


def test_import_leaves_backend_warning_filters_and_settings_alone():
    env = {**os.environ, "MPLBACKEND": "pdf",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", IMPORT_AND_COMPARE], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    before, after, figures = json.loads(r.stdout)
    assert before["backend"] == "pdf" and after == before and figures == []
    # why the package touched warnings at all: fastai's import calls the deprecated torch.jit.script
    assert r.stderr == "", r.stderr[-3000:]


# The names load on first use: a recipe file's own imports and `list` need no fastai (about 8 s of a command's
# start on 2 cores); the one-line check below fails if a module on that path imports fastai at its top again.
LIGHT_PATH = textwrap.dedent("""
    import json, sys
    from covid_fastai import MODERN_POLICY, Recipe, freeze_to
    from covid_fastai.cli import main, script_main
    after_recipe_imports = "fastai" in sys.modules
    main(["list"])
    try: main(["recipe", "best", "--epochs", "x"])  # refused before the run (and fastai) starts
    except SystemExit as e: assert e.code == 2
    print(json.dumps([after_recipe_imports, "fastai" in sys.modules, "timm" in sys.modules]))
""")


def test_list_a_recipe_files_imports_and_a_bad_option_do_not_import_fastai():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", LIGHT_PATH], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    *listing, flags = r.stdout.strip().splitlines()
    assert json.loads(flags) == [False, False, False]
    assert any(line.startswith("best ") for line in listing)
    assert r.stderr == "error: --epochs must be a positive whole number, got 'x'\n"


def test_every_exported_name_resolves_from_one_module():
    import importlib

    import covid_fastai
    names = covid_fastai.__all__
    assert len(names) == len(set(names))  # one home per name: the lookup order cannot shadow one with another
    for name in names: assert getattr(covid_fastai, name) is not None
    for module in covid_fastai._STAR:  # each module's exports, from that module
        m = importlib.import_module(f"covid_fastai.{module}")
        assert all(getattr(covid_fastai, n) is getattr(m, n) for n in m.__all__)
    assert "Evaluation" in dir(covid_fastai) and "run_cv" in names
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"): covid_fastai.no_such_name
