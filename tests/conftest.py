"""Shared fixtures. Tests needing ../shared/data skip when it is absent, unless
SATS_REQUIRE_SHARED_DATA=1 (as in CI), where they fail instead."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SATS_SHARED_DATA", REPO.parent / "shared" / "data"))


def _shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        if os.environ.get("SATS_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"{path} is missing and SATS_REQUIRE_SHARED_DATA=1")
        pytest.skip(f"{path} not present (shared data is optional outside CI)")
    return path


@pytest.fixture
def openkbp() -> Path:
    """The OpenKBP head-and-neck dataset (nnU-Net raw layout)."""
    return _shared("openkbp")


@pytest.fixture
def lung_dicom() -> Path:
    """The real 4D-Lung DICOM CT series + RTSTRUCT folder."""
    return _shared("dicom/4d-lung")
