"""The select stage: the top-K (or sampled) mixture chosen from the pool scores, with a selection report."""
