"""The catalog: the model card schema (:mod:`zoo.catalog.cards`), the model registry and the one path from a name
to a verified model (:mod:`zoo.catalog.registry`), and checkpoints, safetensors with a hashed JSON sidecar
(:mod:`zoo.catalog.checkpoint`)."""
