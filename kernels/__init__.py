"""Triton kernels for format v1 (mpq/quant/format.py) and the decode step around it.

`mixed_matmul` in dispatch.py picks the matmul kernel and its configuration for a given M (decode GEMV on CUDA cores
or on tensor cores, skinny tensor-core GEMM, dequantize + cuBLAS for prefill); the launchers take the format's tensors as flat arguments so
that mpq/runtime/ops.py can wrap them in one torch custom op. decode_attention.py, step_ops.py and
exit_predictor.py are the decode step's other kernels.

On sm_90+ the step's kernels launch as programmatic dependents (`dispatch.pdl_enabled`). They keep one rule, which
is what makes any trigger point safe: before `griddepcontrol.wait` a kernel reads only weights (never written
during a step) and writes nothing. Then a kernel that passed its wait sees every earlier kernel of its stream
complete, since each of those finished only after passing its own wait.
"""

from kernels.dispatch import KernelConfig, choose_config, mixed_matmul

__all__ = ["KernelConfig", "choose_config", "mixed_matmul"]
