"""FLUX.1 (MMDiT) on megatron-core with a forward-mode path; see model.py."""
