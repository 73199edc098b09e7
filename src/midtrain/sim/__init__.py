"""Simulation corpora: a Meta-World robot corpus (``sim collect``, a LeRobot v3.0 dataset) and a
synthetic VLM pool of known character (``sim pool``, LLaVA-JSON sources with images)."""
