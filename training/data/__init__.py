"""Datasets in their real on-disk layouts, synthetic twins, samplers and transforms."""
