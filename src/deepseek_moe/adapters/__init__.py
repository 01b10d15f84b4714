"""Adapters: LoRA on our modules, including a per-expert pair inside the routed experts' grouped products.

``apply_lora(model, LoRAConfig(...))`` adds the pairs (base unchanged, zero-initialised B), ``mark_trainable``
freezes all but them, ``merge_lora`` folds them into the weights, ``remove_lora`` drops them,
``narrow_frozen_matrices`` stores the frozen base's matrices in bf16.
"""

from deepseek_moe.adapters.config import GROUPS, LoRAConfig
from deepseek_moe.adapters.frozen_base import narrow_frozen_embedding, narrow_frozen_matrices
from deepseek_moe.adapters.lora import ExpertLoRA, LoRALinear, set_saved_activations
from deepseek_moe.adapters.targets import (
    apply_lora,
    lora_modules,
    mark_trainable,
    merge_lora,
    remove_lora,
    resolve_targets,
)

__all__ = ["GROUPS", "ExpertLoRA", "LoRAConfig", "LoRALinear", "apply_lora", "lora_modules", "mark_trainable",
           "merge_lora", "narrow_frozen_embedding", "narrow_frozen_matrices", "remove_lora", "resolve_targets",
           "set_saved_activations"]
