"""HunyuanImage 3.0 (80B MoE) on megatron-core; see model.py."""
