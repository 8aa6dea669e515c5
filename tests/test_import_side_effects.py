"""Importing seemore_ds changes nothing outside it: every module, imported in a fresh process, leaves other
libraries' settings, the warning filters, the environment and the loggers as they were, and no DeepSpeed."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

IMPORT_EVERYTHING = r"""
import importlib, json, logging, os, pkgutil, sys, warnings

# The libraries seemore_ds imports at module level, first: what they do on import is theirs, not ours.
import matplotlib, matplotlib.figure, numpy, pandas, PIL.Image, safetensors.torch, torch, tqdm, yaml


def snapshot():
    loggers = {name: logger.level for name, logger in logging.Logger.manager.loggerDict.items()
               if isinstance(logger, logging.Logger)}
    return {
        "PIL.Image.MAX_IMAGE_PIXELS": PIL.Image.MAX_IMAGE_PIXELS,
        "warnings.filters": [repr(f) for f in warnings.filters],
        "os.environ": dict(os.environ),
        "root logger": [logging.root.level, [repr(h) for h in logging.root.handlers]],
        "logger levels": {name: level for name, level in loggers.items() if level != logging.NOTSET},
        "matplotlib backend": str(dict.__getitem__(matplotlib.rcParams, "backend")),
        "torch": [str(torch.get_default_dtype()), torch.get_float32_matmul_precision(), torch.get_num_threads()],
        "deepspeed imported": "deepspeed" in sys.modules,
    }


before = snapshot()
import seemore_ds

names = sorted(m.name for m in pkgutil.walk_packages(seemore_ds.__path__, "seemore_ds."))
for name in names:
    importlib.import_module(name)
after = snapshot()


def changes(old, new):
    if isinstance(old, dict):  # only the entries that differ: the environment is long
        return {k: [old.get(k), new.get(k)] for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
    return [old, new]


print(json.dumps({"modules": names, "changed": {k: changes(before[k], after[k]) for k in before if before[k] != after[k]}}))
"""


def test_importing_every_module_changes_no_global_state(tmp_path):
    result = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {"seemore_ds.trainer", "seemore_ds.data.images", "seemore_ds.backends.deepspeed_backend",
            "seemore_ds.backends.deepspeed_compat", "seemore_ds.launching"} <= set(report["modules"])
    assert report["changed"] == {}, json.dumps(report["changed"], indent=1)[:3000]
