"""Moved to :mod:`sparsecore.job.cli`; this name stays for code that imports it (and for console
scripts installed by earlier versions, which call ``sparsecore.cli:main``).

The old name is the same module object (so attributes, private helpers and monkeypatching
work through either name); ``python -m sparsecore.cli`` still runs the command.
"""

import sys

from .job import cli as _moved

if __name__ == "__main__":
    sys.exit(_moved.main())
sys.modules[__name__] = _moved
