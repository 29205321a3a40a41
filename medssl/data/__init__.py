"""Data layer: readers, manifests, the synthetic hospital, volume and signal pipelines."""
