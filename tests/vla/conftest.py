"""Fixtures of the vla tests: one torch thread per module (see ``robot_data.one_torch_thread``)."""

from robot_data import one_torch_thread  # noqa: F401
