"""Test-wide settings: no network, deterministic, small thread pools (CI has 2 cores)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
