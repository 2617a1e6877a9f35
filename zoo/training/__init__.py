"""Private training: the engine (:mod:`zoo.training.engine`: train, fine-tune, evaluate, run folders and resume),
built around the one DP step (:mod:`zoo.dp.step`), and recipes derived from a privacy budget
(:mod:`zoo.training.auto_recipe`)."""
