"""Moved to :mod:`sparsecore.records.plots`; this name stays for code that imports it.

The old name is the same module object (so attributes, private helpers and monkeypatching
work through either name).
"""

import sys

from .records import plots as _moved

sys.modules[__name__] = _moved
