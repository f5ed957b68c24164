"""TB detection on TBX11K: boxes of active and of latent (obsolete pulmonary) tuberculosis.

The few boxes TBX11K marks ``PulmonaryTuberculosis`` (TB of undetermined activity) belong to
neither class the paper evaluates; they are left out of training and evaluation, and the stage
says so at start.
"""

from .base import DetectionTask

TASK = DetectionTask(name="tbx", dataset="tbx11k",
                     categories={1: (1, "active"), 2: (2, "latent")})
