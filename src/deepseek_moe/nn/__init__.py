"""Building blocks below both the MoE layer and the language model: bf16 compute copies and the Linear that
uses them. Nothing here imports the rest of the package, so ``deepseek_moe.moe`` needs nothing of ``model``."""
