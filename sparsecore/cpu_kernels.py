"""Moved to :mod:`sparsecore.kernels.cpu` (beside the CUDA kernels, with their shared
structures); this name stays for code that imports it.

The old name is the same module object (so attributes, private helpers and monkeypatching
work through either name).
"""

import sys

from .kernels import cpu as _moved

sys.modules[__name__] = _moved
