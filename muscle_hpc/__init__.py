"""muscle-hpc: MUSCLE pre-training of X-ray backbones (Liao et al., MICCAI 2022) on Slurm."""

__version__ = "0.1.0"
