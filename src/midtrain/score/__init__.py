"""The score stage: every VLM pool sample scored by the proximity estimator or a baseline scorer."""
