"""Embodied trajectory-coupled (ETC) VQA: ``midtrain etc`` turns a robot dataset's frames and
ground truth into vision-language questions tagged by ETC category and capability domain."""
