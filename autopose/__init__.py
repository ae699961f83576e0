"""autopose: differentiable augmentation-policy search for top-down pose estimation.

Layers (imports point one way, top to bottom):
``data`` → ``augment`` / ``models`` → ``engine`` → ``platform`` → ``cli``.
Only ``autopose.platform`` imports Ray and MLflow; the rest imports without them.
"""

from autopose.errors import AutoposeError

__all__ = ["AutoposeError"]
__version__ = "0.1.0"
