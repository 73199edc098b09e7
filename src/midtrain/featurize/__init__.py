"""Frozen-VLM features of every catalog sample (the ``featurize`` stage): local and Ray backends."""
