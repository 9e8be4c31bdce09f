"""The fused CPU selective-scan kernel (``csrc/selective_scan_cpu.cpp``): built on first use, cached, loaded once.

The kernel is compiled with the C++ compiler that PyTorch's extension builder finds (``c++``, or ``$CXX``) for the CPU
it runs on, which takes about 10 s once per machine. The library is cached under PyTorch's extension folder
(``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) in a folder named after a hash of the source,
the flags, the torch version and the CPU, so a shared home folder never hands one CPU's build to another. Each
process builds in a private temporary folder and moves the finished library into the cache in one step: a build that
is interrupted, or two that run at once, leave no half-written library and no lock behind.

Where no compiler is available the kernel is reported unavailable once, with the reason, and the selective scan
falls back to its pure-PyTorch backend. ``$VMAML_UNET_SCAN_CFLAGS`` adds compiler flags (they are part of the cache
key too).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch

from scripts.atomic_file import atomic_write

__all__ = ["load_cpu_scan_kernel", "cpu_scan_kernel_library_path", "compile_flags", "openmp_flags"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.cpp"
# -march=native: the build is for this machine only (the cache key includes the CPU). -fno-trapping-math lets the
# compiler vectorise the kernel's branch-free selects.
COMPILE_FLAGS = ("-O3", "-march=native", "-fno-trapping-math")
# Flags appended to COMPILE_FLAGS, e.g. "-mno-avx512f" to build the 8-lane AVX2 variant on an AVX-512 CPU.
EXTRA_FLAGS_VARIABLE = "VMAML_UNET_SCAN_CFLAGS"
LIBRARY_NAME = "vmaml_unet_scan"


def _cpu_description() -> str:
    """The CPU model and instruction-set flags, as far as the platform tells them."""
    description = [platform.machine(), platform.processor()]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("model name", "flags", "Features", "CPU part") and line not in description:
                description.append(line)
    return "\n".join(description)


def openmp_flags() -> List[str]:
    """
    ``["-fopenmp"]`` where torch runs its intra-op threads on OpenMP (Linux), else none. The kernel then schedules its
    work on torch's own OpenMP pool through ``at::parallel_for`` (the library links ``libgomp.so.1``, which resolves to
    the copy torch has already loaded): threads of its own competed with that pool's spinning workers.
    """
    openmp_torch = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    return ["-fopenmp"] if openmp_torch and sys.platform.startswith("linux") else []


def compile_flags() -> List[str]:
    """:data:`COMPILE_FLAGS`, :func:`openmp_flags` and the flags in ``$VMAML_UNET_SCAN_CFLAGS``."""
    return list(COMPILE_FLAGS) + openmp_flags() + shlex.split(os.environ.get(EXTRA_FLAGS_VARIABLE, ""))


def cpu_scan_kernel_library_path() -> Path:
    """Where the kernel's library for this source, these flags, this torch and this CPU is cached."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(compile_flags()).encode())
    key.update(torch.__version__.encode())
    key.update(_cpu_description().encode())
    # As torch.utils.cpp_extension: $TORCH_EXTENSIONS_DIR, else the user's cache folder. Imported here, as in _build,
    # because the module imports setuptools, which inference with a cached kernel never needs.
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    folder = Path(root) / f"{LIBRARY_NAME}_{key.hexdigest()[:16]}"
    return folder / f"{LIBRARY_NAME}.so"


def _build(library: Path) -> None:
    from torch.utils.cpp_extension import load

    logger.info("Building the CPU selective-scan kernel (once per machine, about 10 s) into %s.", library.parent)
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=library.parent) as build_dir:
        # load() builds with ninja in build_dir and loads the library into this process.
        built = load(
            name=LIBRARY_NAME,
            sources=[str(SOURCE)],
            extra_cflags=compile_flags(),
            extra_ldflags=openmp_flags(),
            build_directory=build_dir,
            is_python_module=False,
        )
        with open(built, "rb") as source, atomic_write(str(library)) as target:
            shutil.copyfileobj(source, target)


def _first_error_line(message: str) -> str:
    """The line of a build log that says what failed: the first compiler or linker error, else the first line.

    A failed build's message is the whole ninja log, whose last line only says that the build stopped.
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and not line.lower().startswith("error building")]
    return errors[0] if errors else (lines[0] if lines else "")


@functools.lru_cache(maxsize=None)
def load_cpu_scan_kernel() -> Tuple[Optional[Any], Optional[BaseException]]:
    """
    The kernel's operators (``torch.ops.vmaml_unet``), building them first if they are not cached.

    Returns:
        ``(ops, None)`` when the kernel is loaded, or ``(None, error)`` when it cannot be built or loaded on this
        machine; the error is logged once as a warning.
    """
    try:
        library = cpu_scan_kernel_library_path()
        if library.is_file():
            torch.ops.load_library(str(library))
        else:
            _build(library)
    except (ImportError, OSError, RuntimeError, subprocess.SubprocessError) as err:
        logger.warning(
            "The CPU selective-scan kernel cannot be built or loaded (%s: %s); the slower PyTorch scan is used. "
            "It needs a C++ compiler and ninja (pip install ninja). The full message is logged at DEBUG level.",
            type(err).__name__,
            _first_error_line(str(err)),
        )
        logger.debug("The CPU selective-scan kernel failed with:\n%s", err)
        return None, err
    return torch.ops.vmaml_unet, None
