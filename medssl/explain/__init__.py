"""Explanations of model outputs: attention / grounding maps and their file contract."""
