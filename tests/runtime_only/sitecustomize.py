"""Loaded at start-up by every process the tests start (tests/conftest.py puts this folder on
their PYTHONPATH): they run with the run-time dependencies only, as users install mlx-gemma.

torch and torchvision are test-only (the reference stack), but transformers imports torch
whenever it is installed (mlx-lm's tokenizer wrapper imports transformers), which would both
hide an accidental run-time dependency on torch and add ~2.5 s to every CLI run of the suite.
A `None` entry in sys.modules makes `import torch` fail and `importlib.util.find_spec` report it
missing, which is how transformers decides.
"""

import sys

for _name in ("torch", "torchvision", "torchaudio"):
    sys.modules[_name] = None
