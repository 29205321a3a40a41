"""medssl: self-supervised pretraining on hospital data (3D volumes and physiological signals)."""

__version__ = "0.1.0"
