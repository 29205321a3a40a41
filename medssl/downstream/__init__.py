"""Downstream heads fed by the pretrained encoders: segmentation, grounding, time-series classification."""
