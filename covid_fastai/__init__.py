"""covid_fastai: fastai + timm rapid experiments for chest X-ray classification (infected vs normal).

`from covid_fastai import *` gives the layered API: data (`find_xray_folders`, `xray_dls`), models
(`xray_learner`), image reading (`open_xray`), fine-tune plans (`head`, `layers`, `full`, `freeze_to`,
`apply_plan`), recipes (`Recipe`, `load_recipe`, `run_recipe`), interpretation (`Evaluation`), evaluation of
finished runs (`evaluate_run`, `predict_run`) and ensembles of them (`evaluate_ensemble`,
`predict_ensemble`), balanced sampling (`balance_weights`), EMA of weights (`WeightsEMA`), sweeps (`run_sweep`, `resume_sweep`, `compare_runs`),
cross-validation (`run_cv`, `plan_cv`) and reports.
"""
__version__ = "0.1.0"

import re
import warnings

# fastai's import calls torch.jit.script, which torch 2.14 deprecates with a FutureWarning on every command.
# The filter holds while this package imports fastai and comes off again after: the process's filters stay as
# they were (a user's own torch.jit.script still warns), and those fastai and torch add stay in place.
_JIT_DEPRECATION = ("ignore", re.compile(r".*torch\.jit\.script.*is deprecated", re.I), FutureWarning, None, 0)
_jit_filter_added = _JIT_DEPRECATION not in warnings.filters
if _jit_filter_added: warnings.filters.insert(0, _JIT_DEPRECATION)

try:  # the filter comes off however the imports end (a broken optional install must not leave it behind)
    from .errors import *  # noqa: E402,F401,F403
    from .images import open_xray, scan_images, UnreadableImage  # noqa: E402,F401
    from .augment import *  # noqa: E402,F401,F403
    from .data import *  # noqa: E402,F401,F403
    from .labels import read_labels, read_labels_csv  # noqa: E402,F401
    from .demo import demo_data, make_demo_data  # noqa: E402,F401
    from .models import *  # noqa: E402,F401,F403
    from .plans import *  # noqa: E402,F401,F403
    from .recipes import *  # noqa: E402,F401,F403
    from .callbacks import *  # noqa: E402,F401,F403
    from .interpret import *  # noqa: E402,F401,F403
    from .rundir import *  # noqa: E402,F401,F403
    from .learner import *  # noqa: E402,F401,F403
    from .checkpoint import EpochCheckpoint  # noqa: E402,F401
    from .export import load_export  # noqa: E402,F401
    from .train import *  # noqa: E402,F401,F403
    from .evaluate import evaluate_run, predict_run  # noqa: E402,F401
    from .ensemble import evaluate_ensemble, predict_ensemble  # noqa: E402,F401
    from .sampling import balance_weights  # noqa: E402,F401
    from .ema import WeightsEMA  # noqa: E402,F401
    from .sweep import compare_runs, resume_sweep, run_sweep  # noqa: E402,F401
    from .audit import audit_data, audit_run  # noqa: E402,F401
    from .cv import plan_cv, run_cv  # noqa: E402,F401
    from .modelcard import model_card, write_model_card  # noqa: E402,F401
finally:
    if _jit_filter_added: warnings.filters.remove(_JIT_DEPRECATION)
del _jit_filter_added
