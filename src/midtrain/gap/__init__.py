"""The gap stage: MMD between every pair of datasets (with permutation p-values) and feature maps."""

from .mmd import MMDMatrix, bandwidths, median_heuristic, mmd_matrix, mmd_matrix_rff, rbf_kernel

__all__ = ["MMDMatrix", "bandwidths", "median_heuristic", "mmd_matrix", "mmd_matrix_rff", "rbf_kernel"]
