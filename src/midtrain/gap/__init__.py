"""The gap stage: MMD between every pair of datasets (with permutation p-values) and feature maps.

The MMD estimators live in :mod:`midtrain.gap.mmd` (also used by the selection report)."""
