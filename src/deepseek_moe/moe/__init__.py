"""The DeepSeekMoE layer.

Shape legend for tensors in this package (suffixes on names in hot code):
    B batch, S sequence length, T tokens (B * S), D model dim (``dim``), F expert hidden dim
    (``moe_inter_dim``), E routed experts, G expert groups (DeepSeek-V2's "devices": its D and M are our G
    and M), K activated experts per token, A token-expert assignments kept after dropping (<= T * K),
    r the real (unpadded) tokens of a padded batch.
"""
