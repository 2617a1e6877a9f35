"""Architecture families, one per file; each registers itself with ``zoo.registry.register_family``."""
from . import resnet9, wideresnet  # noqa: F401
