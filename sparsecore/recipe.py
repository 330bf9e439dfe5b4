"""Moved to :mod:`sparsecore.job.recipe`; this name stays for code that imports it.

The old name is the same module object (so attributes, private helpers and monkeypatching
work through either name).
"""

import sys

from .job import recipe as _moved

sys.modules[__name__] = _moved
