"""Architecture families, one per file; each registers itself with ``zoo.registry.register_family``."""
from . import deeplab, eq_resnet9, eq_wideresnet, linknet, resnet9, scatternet, unet, unetpp, wideresnet  # noqa: F401
