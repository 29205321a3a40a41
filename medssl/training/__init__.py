"""The shared training machinery: run directory, checkpoints, the loop, torch.distributed."""
