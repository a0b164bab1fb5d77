"""Triton kernels for format v1 (mpq/quant/format.py): decode GEMV, skinny tensor-core GEMM, dequantize for prefill.

`mixed_matmul` in dispatch.py picks the kernel and its configuration for a given M; the launchers take the
format's tensors as flat arguments so that mpq/runtime/ops.py can wrap them in one torch custom op.
"""

from kernels.dispatch import KernelConfig, choose_config, mixed_matmul

__all__ = ["KernelConfig", "choose_config", "mixed_matmul"]
