"""The fit stage: the proximity estimator (VLA positive, VLM pool negative) trained on frozen features."""
