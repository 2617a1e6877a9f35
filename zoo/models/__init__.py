"""Architecture families, one per file; each registers itself with ``zoo.registry.register_family``."""
from . import eq_resnet9, resnet9, wideresnet  # noqa: F401
