"""``midtrain study``: the comparison of VLA initialisations, end to end (issue 14).

- :mod:`midtrain.experiments.study.config`: ``StudyConfig`` - the world, the VLM, the shared recipes, the rows
  (checked, and named as stage folders: ``row_stages``);
- :mod:`midtrain.experiments.study.plan`: stage folders, and data references (``selection:<scorer>``,
  ``robot_text``, ``etc:<domain>``) resolved to ``midtrain sft`` / ``midtrain vla`` inputs;
- :mod:`midtrain.experiments.study.stage`: ``run_study``, the recipe top to bottom;
- :mod:`midtrain.experiments.study.models`: the study VLM and its random-weights twin;
- :mod:`midtrain.experiments.study.cka` / :mod:`midtrain.experiments.study.drift`: linear CKA per layer (reusable) and the
  study's ``cka`` stage;
- :mod:`midtrain.experiments.study.stats`: intervals (two-way bootstrap over seeds and episodes, paired);
- :mod:`midtrain.experiments.study.results` / :mod:`midtrain.experiments.study.html`: ``study.json``, figures, the report section.
- :mod:`midtrain.experiments.study.calibration`: ``calibrate: true`` - the baseline and the controls only, and the
  tasks to drop (``calibration/calibration.json``).
"""
