"""The architecture families of zoo.

``FAMILY_MODULES`` maps each family name to the module of ``zoo.models`` that registers it (with
:func:`zoo.registry.register_family`). The registry imports a module the first time a model of its family is built
or described, so that ``import zoo``, ``zoo.list_models()`` and ``zoo list`` need neither torch nor escnn. A test
checks that each module registers exactly the families listed for it.
"""
FAMILY_MODULES = {
    "wideresnet": "wideresnet",
    "resnet9": "resnet9",
    "scatternet": "scatternet",
    "eq-resnet9": "eq_resnet9",
    "eq-wideresnet": "eq_wideresnet",
    "unet": "unet",
    "eq-unet": "unet",
    "unetpp": "unetpp",
    "linknet": "linknet",
    "deeplabv3plus": "deeplab",
}
