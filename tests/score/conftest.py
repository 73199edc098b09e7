"""Fixtures of the score tests (defined in ``run_fixtures.py``, shared with the other stages on feature runs)."""

from run_fixtures import one_torch_thread, synthetic_run  # noqa: F401
