"""Hides the packages a GPU image lacks from this interpreter and its children, as if they were not installed.

``PYTHONPATH=tests/gpu_image`` makes Python import this file at start-up (``site``'s ``sitecustomize``); each
top-level name in ``GPU_IMAGE_HIDES`` (comma-separated) is set to None in ``sys.modules``, so ``import tritonclient``
raises ModuleNotFoundError and ``importlib.util.find_spec("tritonclient")`` returns None, as on a machine without it.
"""

import os
import sys

for _name in filter(None, os.environ.get("GPU_IMAGE_HIDES", "").split(",")):
    sys.modules[_name] = None
