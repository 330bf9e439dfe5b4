"""`import sparsecore` must not pull in any deep-learning framework (checked in a fresh process)."""

from __future__ import annotations

import subprocess
import sys


def test_import_sparsecore_imports_no_framework() -> None:
    code = (
        "import sys, numpy as np, sparsecore as sc\n"
        "sc.update([sc.Layer('a', np.ones((2,2),'f4'), np.eye(2, dtype=bool), np.ones((2,2),'f4'))],"
        " prune_rate=0.5)\n"
        "bad = [m for m in ('torch', 'tensorflow', 'keras', 'cupy', 'jax') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
