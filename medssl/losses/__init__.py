"""Objectives: one module per objective, tensors in, scalar out."""
