"""Experiments that chain stages: ``midtrain study`` (:mod:`midtrain.experiments.study`) and
``midtrain recipes`` (:mod:`midtrain.experiments.recipes`)."""
