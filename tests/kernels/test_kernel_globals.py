"""Every Triton kernel reads only globals the compiler accepts (`tl.constexpr` values, modules, other kernels,
`triton.language` objects). The interpreter accepts any Python global, so the CPU kernel tests alone would pass a
kernel that fails to compile on the GPU."""

import ast
import importlib
import inspect
import pkgutil
import textwrap
import types

import pytest
import triton.language as tl

import kernels


def _jit_functions():
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"kernels.{info.name}")
        for name, obj in vars(module).items():
            fn = getattr(obj, "fn", None)
            if isinstance(fn, types.FunctionType) and fn.__module__ == module.__name__ and hasattr(obj, "arg_names"):
                yield f"{info.name}.{name}", fn


def _accepted(value) -> bool:
    return (isinstance(value, (types.ModuleType, tl.constexpr, tl.dtype)) or hasattr(value, "arg_names")
            or getattr(value, "__module__", "").startswith("triton.language")
            or getattr(value, "__triton_builtin__", False))


KERNELS = dict(_jit_functions())


def test_kernels_are_found():
    assert "gemv_tc._gemv_tc_kernel" in KERNELS and len(KERNELS) > 10


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_reads_only_constexpr_globals(name):
    fn = KERNELS[name]
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    local = {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg)}
    local |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    bad = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
                  and n.id not in local and n.id in fn.__globals__ and not _accepted(fn.__globals__[n.id])})
    assert not bad, f"{name} reads non-constexpr globals {bad}: wrap them in tl.constexpr"
