"""Fused pruning ops: Triton kernels with exact PyTorch references."""
