"""Shared test helpers: where the read-only fixtures live and how to compare tensors."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("INPFORMER_SHARED", ROOT.parent / "shared"))
sys.path.insert(0, str(ROOT))


def shared(*parts) -> Path:
    """Path of a file under ../shared; the test fails loudly (never skips) when it is missing."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"missing shared fixture {p} (set INPFORMER_SHARED to the shared/ folder)")
    return p
