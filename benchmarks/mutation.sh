#!/usr/bin/env bash
# Mutation testing of the selection and budget code (sparsecore/backend_numpy.py,
# sparsecore/redistribute.py, sparsecore/modes.py) against the core tests; setup.cfg [mutmut]
# lists the files and the tests. mutmut writes a mutants/ tree, so this runs on a copy of the
# committed tree at HEAD (uncommitted edits, anyone's, are left out: the result belongs to one
# commit) and leaves the working tree alone. Usage:
#   benchmarks/mutation.sh [workdir]        (default: a new temporary directory)
# Environment: PYTHON (default: python), JOBS (parallel mutants, default: nproc),
# SPARSECORE_MAX_EXAMPLES (hypothesis examples per property test, default 40; 10 keeps it short).
set -euo pipefail
repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
work=${1:-$(mktemp -d -t sparsecore-mutation.XXXXXX)}
python=${PYTHON:-python}
jobs=${JOBS:-$(nproc)}
mkdir -p "$work"
git -C "$repo" archive HEAD | tar -x -C "$work"
cd "$work"
echo "mutation testing of commit $(git -C "$repo" rev-parse --short HEAD) in $work"
"$python" -m mutmut run --max-children "$jobs" || true
"$python" -m mutmut results --all true > mutmut-results.txt || "$python" -m mutmut results > mutmut-results.txt
"$python" - <<'PY'
import collections, re
counts = collections.Counter()
per_function = collections.defaultdict(collections.Counter)
for line in open("mutmut-results.txt"):
    match = re.match(r"\s*(\S+__mutmut_\d+): (.+)", line)
    if not match:
        continue
    name, status = match.groups()
    counts[status] += 1
    module, function = re.match(r"(.*)\.x[ǁ_]?(.+)__mutmut_\d+", name).groups()
    per_function[f"{module}.{function}"][status] += 1
total = sum(counts.values())
killed = counts["killed"] + counts["timeout"]
print(f"mutants: {total}, killed: {killed} ({100 * killed / max(total, 1):.1f}%), {dict(counts)}")
for function, c in sorted(per_function.items()):
    print(f"  {function}: {dict(c)}")
PY
