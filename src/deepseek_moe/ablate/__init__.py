"""The DeepSeekMoE ablation (paper §4): models that differ only in the FFN of their MoE layers, trained alike.

``run_ablation(AblationConfig(...), out)`` (``deepseek-moe ablate``) trains every variant for every seed through
the training loop and writes results.json, results.md and plots; ``variant_config(name, AblationShape())`` is
one variant's ModelConfig; ``altered_routing(model, skip_top=..., extra=..., drop_shared=...)`` the
evaluation-time routing of the paper's §4.5 analyses.
"""

from deepseek_moe.ablate.config import AblationConfig, full, quick
from deepseek_moe.ablate.routing import AlteredRouter, altered_routing
from deepseek_moe.ablate.run import run_ablation
from deepseek_moe.ablate.variants import VARIANTS, AblationShape, Counts, count_variant, variant_config

__all__ = ["VARIANTS", "AblationConfig", "AblationShape", "AlteredRouter", "Counts", "altered_routing",
           "count_variant", "full", "quick", "run_ablation", "variant_config"]
