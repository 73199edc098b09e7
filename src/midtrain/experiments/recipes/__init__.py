"""``midtrain recipes``: staged recipes (ETC pathway, Rethinking route, ablations) from a VLM to
policies for a held-out target split.

- :mod:`midtrain.experiments.recipes.config`: ``RecipesConfig`` (a light import, for ``--help``);
- :mod:`midtrain.experiments.recipes.stage`: ``run_recipes``, top to bottom.
"""
