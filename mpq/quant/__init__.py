"""Quantization math: groups, sensitivity, allocation, outliers, packing (format v1)."""
