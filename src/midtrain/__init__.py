"""midtrain: a mid-training data engine that bridges VLM pre-training data and VLA robot data."""

__version__ = "0.1.0"
