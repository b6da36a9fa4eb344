"""Helpers shared by the test modules (imported as ``tests.helpers.<module>``; pytest collects nothing here)."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
