"""Build (once per machine) and load the C++ CPU kernels with ``torch.utils.cpp_extension.load``.

The sources are compiled on first use into torch's extensions directory (``TORCH_EXTENSIONS_DIR``
or ``~/.cache/torch_extensions``) under a name that carries a hash of the sources and flags, so a
changed source tree builds into a new directory instead of racing an older build. Concurrent
builders (e.g. pytest-xdist workers) are serialised by torch's lock file in that directory: one
compiles, the others wait and then load the finished library.

No ``-march=native``: each ISA's kernels are compiled for that ISA with target pragmas and chosen
at run time (``__builtin_cpu_supports``), so a build cached on a shared home directory also runs on
an older CPU.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("lowbit_cpu.cpp", "gemm_scalar.cpp", "gemm_avx2.cpp", "gemm_avx2_vnni.cpp", "gemm_avx512.cpp",
           "gguf_search.cpp")
HEADERS = ("kernels.h", "common.h", "gemm_avx2_impl.h")
CFLAGS = ("-O3", "-fopenmp", "-std=c++17", "-Wno-unused-function")
LDFLAGS = ("-fopenmp",)


class BuildError(RuntimeError):
    """The C++ kernels could not be compiled or loaded on this machine."""


def extension_name() -> str:
    """``lowbit_cpu_<hash>``: the hash covers every source, header, flag and the torch version."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode())
        digest.update((CSRC / name).read_bytes())
    digest.update(" ".join((*CFLAGS, *LDFLAGS, torch.__version__)).encode())
    return f"lowbit_cpu_{digest.hexdigest()[:12]}"


@functools.lru_cache(maxsize=None)
def load_library(verbose: bool = False) -> str:
    """Compile (if not cached) and load the kernels; registers the ``torch.ops.lowbit_cpu`` ops.

    Returns the path of the loaded shared library. Raises :class:`BuildError` with the reason
    (no C++ compiler, compile error …).
    """
    from torch.utils import cpp_extension

    if shutil.which((os.environ.get("CXX") or "c++").split()[0]) is None:
        raise BuildError("no C++ compiler found (set CXX or install g++/clang++) to build the lowbit CPU kernels")
    name = extension_name()
    try:
        built = (Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    except Exception:  # a private torch helper: if it moves, just say nothing
        built = True
    if not built and not verbose:  # a first-time cost: say so rather than sit silent for minutes
        import sys

        print("lowbit: compiling the C++ CPU kernels (once per machine and lowbit version, 1-3 minutes) ...",
              file=sys.stderr, flush=True)
    try:
        path = cpp_extension.load(
            name=name,
            sources=[str(CSRC / name) for name in SOURCES],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            extra_include_paths=[str(CSRC)],
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as err:  # subprocess/compiler/loader failures all surface here
        raise BuildError(f"building the lowbit CPU kernels failed: {err}") from err
    return str(path)
