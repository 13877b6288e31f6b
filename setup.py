"""Build step of fkv_jax: the optional x86 CPU attention kernel (``--attention-backend cpu_ffi``).

Everything else about the package is in pyproject.toml. ``pip install -e .`` (or a wheel build) compiles
``csrc/cpu_attention.cc`` into ``fkv_jax/kernels/_cpu_attention<ext suffix>`` against the XLA FFI headers of the
jaxlib in the build environment (pyproject's ``[build-system] requires``). The library is compiled for
``-march=x86-64-v3`` (AVX2 + FMA: any x86-64 CPU since 2013-2015; set ``FKV_CPU_ARCH``, e.g. ``native``, to
change it) and checks at load time that the running CPU has what it was compiled for. ``native`` is not the
default: on the AMD EPYC (Zen 4) this was measured on, letting GCC 12 use AVX-512 made the kernel ~20 %
slower (docs/cpu_kernel.md).

The kernel is optional: on a non-x86 machine, without a C++20 compiler or without jaxlib's headers the build
prints a warning and installs fkv_jax without it (the ``cpu_ffi`` backend then reports why it cannot run;
every other backend is unaffected).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNEL = "fkv_jax.kernels._cpu_attention"


def _jaxlib_include() -> str | None:
    """jaxlib's bundled headers (``xla/ffi/api/ffi.h``), found without importing jaxlib."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        inc = os.path.join(root, "include")
        if os.path.isfile(os.path.join(inc, "xla", "ffi", "api", "ffi.h")):
            return inc
    return None


class BuildKernel(build_ext):
    """Compiles the kernel with -march=$FKV_CPU_ARCH (default x86-64-v3), retrying with -mavx2 -mfma -mf16c (a
    compiler without x86-64-v3); any failure is a warning, never a failed install."""

    def build_extension(self, ext):
        inc = _jaxlib_include()
        if inc is None:
            self._skip(ext, "jaxlib's XLA FFI headers were not found in the build environment")
            return
        ext.include_dirs = [inc, "csrc", *ext.include_dirs]
        arch = os.environ.get("FKV_CPU_ARCH", "x86-64-v3")
        base = [
            "-std=c++20",
            "-O3",
            "-g0",
            "-fvisibility=hidden",
            "-Wno-attributes",
            "-Wno-return-type",
            "-Wno-sign-compare",
        ]
        errors = []
        for flags in ([f"-march={arch}"], ["-mavx2", "-mfma", "-mf16c"]):
            ext.extra_compile_args = base + flags
            try:
                super().build_extension(ext)
                return
            except Exception as e:  # compiler missing or refusing the flags: try the next, then give up
                errors.append(f"{' '.join(flags)}: {type(e).__name__}: {str(e).splitlines()[-1][-160:]}")
        self._skip(ext, "; ".join(errors))

    def _skip(self, ext, why: str) -> None:
        print(
            f"WARNING: fkv_jax's CPU attention kernel ({ext.name}) was not built ({why}); "
            f"--attention-backend cpu_ffi will be unavailable, every other backend works.",
            file=sys.stderr,
        )


def _extensions() -> list[Extension]:
    if platform.machine().lower() not in ("x86_64", "amd64") or os.environ.get("FKV_NO_CPU_KERNEL"):
        return []
    return [
        Extension(
            KERNEL,
            sources=["csrc/cpu_attention.cc"],
            depends=["csrc/cpu_attention.h"],
            language="c++",
            optional=True,
        )
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildKernel})
