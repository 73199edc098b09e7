"""VLA policies: a VLM backbone (any ``AutoModelForImageTextToText`` checkpoint) with an action head.

- :class:`VLAPolicy` (``modeling``): LeRobot's policy contract (``forward``, ``predict_action_chunk``,
  ``select_action``, ``reset``, ``save_pretrained`` / ``from_pretrained``);
- heads (``heads``): ``mlp`` (OpenVLA-OFT / VLM4VLA regression), ``flow`` (pi0-style flow-matching
  expert), ``tokens`` (action next-token prediction);
- :class:`Normalizer` (``normalize``): per-dimension ``mean_std | min_max | q01_q99``, gripper binarised;
- :class:`PolicyProcessor` (``processor``): prompts, targets and observations to model inputs;
- :class:`PolicyConfig` / :class:`PolicySettings` (``configuration``): what a checkpoint is.

Importing this package loads torch; ``midtrain.policy.configuration`` alone does not.
"""

from .configuration import PolicyConfig, PolicySettings
from .modeling import VLAPolicy
from .normalize import Normalizer, compute_stats
from .processor import PolicyProcessor

__all__ = ["Normalizer", "PolicyConfig", "PolicyProcessor", "PolicySettings", "VLAPolicy", "compute_stats"]
