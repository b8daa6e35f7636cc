"""Merge methods: pure functions over state dicts (tensors in, tensors out).

Filled in by the merging-library issue (AvgMean, Task Arithmetic, TIES, DARE,
RegMean, Fisher, EMR, weight similarity, gate training).
"""
