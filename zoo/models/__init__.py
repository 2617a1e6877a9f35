"""Architecture families, one per file; each registers itself with ``zoo.registry.register_family``."""
from . import eq_resnet9, eq_wideresnet, resnet9, wideresnet  # noqa: F401
