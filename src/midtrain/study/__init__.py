"""``midtrain study``: the comparison of VLA initialisations, end to end (issue 14).

- :mod:`midtrain.study.config`: ``StudyConfig`` - the world, the VLM, the shared recipes, the rows;
- :mod:`midtrain.study.plan`: rows as stage folders, and data references (``selection:<scorer>``,
  ``robot_text``, ``etc:<domain>``) resolved to ``midtrain sft`` / ``midtrain vla`` inputs;
- :mod:`midtrain.study.stage`: ``run_study``, the recipe top to bottom;
- :mod:`midtrain.study.models`: the study VLM and its random-weights twin;
- :mod:`midtrain.study.cka` / :mod:`midtrain.study.drift`: linear CKA per layer (reusable) and the
  study's ``cka`` stage;
- :mod:`midtrain.study.stats`: intervals (two-way bootstrap over seeds and episodes, paired);
- :mod:`midtrain.study.results` / :mod:`midtrain.study.html`: ``study.json``, figures, the report section.
"""
