"""``make bench``: budgetd's decision path measured against a no-op floor (issue 7, DESIGN §11).

Run as ``python -m bench.run`` from the repository root. The harness reuses the test suite's
throwaway Postgres and Redis (``tests/services.py``), so ``tests/`` is put on ``sys.path``
here, before any ``bench`` module imports from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (the bench's subprocesses run from here)."""

_TESTS = str(ROOT / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
