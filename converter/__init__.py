"""Offline conversion: one-shot N:M pruning (magnitude, Wanda, E-Sparse) and FasterTransformer export."""
