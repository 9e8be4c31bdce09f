"""Building, caching and loading the fused CPU selective-scan kernel, and the fallback where it cannot be built."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_test_utils import REPO
from torch.utils.cpp_extension import is_ninja_available

import scripts.networks.selective_scan_cpu as selective_scan_cpu

LOAD_AND_SCAN = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
from scripts.networks.selective_scan import selective_scan
from scripts.networks.selective_scan_cpu import load_cpu_scan_kernel, cpu_scan_kernel_library_path
ops, err = load_cpu_scan_kernel()
u, delta = torch.randn(1, 8, 12), torch.randn(1, 8, 12)
y = selective_scan(u, delta, -torch.rand(8, 4), torch.randn(1, 2, 4, 12), torch.randn(1, 2, 4, 12))
print("LOADED" if ops is not None else "UNAVAILABLE", bool(torch.isfinite(y).all()), cpu_scan_kernel_library_path())
"""


def run_loader(extensions_dir: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir), **env}
    return subprocess.run(
        [sys.executable, "-c", LOAD_AND_SCAN], cwd=REPO, env=environment, capture_output=True, text=True, timeout=300
    )


def test_kernel_builds_where_a_compiler_is_available() -> None:
    """The kernel tests elsewhere skip without the kernel; on a machine with a compiler it must therefore build."""
    if shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available():
        pytest.skip("no C++ compiler or no ninja on this machine")
    ops, err = selective_scan_cpu.load_cpu_scan_kernel()
    assert err is None and ops is not None
    assert selective_scan_cpu.cpu_scan_kernel_library_path().is_file()


def test_fresh_build_is_cached_and_reused(tmp_path: Path) -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available():
        pytest.skip("no C++ compiler or no ninja on this machine")
    first = run_loader(tmp_path)
    assert first.returncode == 0, first.stderr
    assert "Building the CPU selective-scan kernel" in first.stdout and "LOADED True" in first.stdout
    library = Path(first.stdout.split()[-1])
    assert library.is_file() and library.parent.parent == tmp_path
    # The build folder and the temporary copy are gone: only the finished library is left in the cache.
    assert [p.name for p in library.parent.iterdir()] == [library.name]
    second = run_loader(tmp_path)
    assert second.returncode == 0, second.stderr
    assert "Building" not in second.stdout and "LOADED True" in second.stdout


def test_without_a_compiler_the_scan_falls_back_to_pytorch(tmp_path: Path) -> None:
    result = run_loader(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert result.returncode == 0, result.stderr
    assert "WARNING The CPU selective-scan kernel cannot be built or loaded" in result.stdout
    assert "UNAVAILABLE True" in result.stdout
    assert not list(tmp_path.rglob("*.so"))


def test_a_failed_build_names_the_compiler_error(tmp_path: Path) -> None:
    """The warning quotes the compiler's error, not the last line of the ninja log ("build stopped")."""
    if shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available():
        pytest.skip("no C++ compiler or no ninja on this machine")
    result = run_loader(tmp_path, VMAML_UNET_SCAN_CFLAGS="-include no_such_header_for_the_test.h")
    assert result.returncode == 0, result.stderr
    warning = next(line for line in result.stdout.splitlines() if line.startswith("WARNING The CPU selective-scan"))
    assert "no_such_header_for_the_test.h" in warning and "error" in warning.lower()
    assert "UNAVAILABLE True" in result.stdout


def test_cache_key_depends_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    here = selective_scan_cpu.cpu_scan_kernel_library_path()
    monkeypatch.setattr(selective_scan_cpu, "_cpu_description", lambda: "another CPU")
    elsewhere = selective_scan_cpu.cpu_scan_kernel_library_path()
    assert here != elsewhere and here.name == elsewhere.name and here.parent.parent == elsewhere.parent.parent


KERNEL_AGAINST_PYTORCH = """
import torch
torch.set_num_threads(2)  # the work is split between threads, whichever way they are run
from scripts.networks.selective_scan import selective_scan
from scripts.networks.selective_scan_cpu import load_cpu_scan_kernel
assert load_cpu_scan_kernel()[0] is not None
g = torch.Generator().manual_seed(0)
# 21 channels per group: whole vectors and single channels past them
u, delta = torch.randn(2, 42, 150, generator=g), torch.randn(2, 42, 150, generator=g)
a = -torch.rand(42, 16, generator=g) * 4
b, c = torch.randn(2, 2, 16, 150, generator=g), torch.randn(2, 2, 16, 150, generator=g)
d, bias = torch.randn(42, generator=g), torch.randn(42, generator=g)
inputs = [t.requires_grad_() for t in (u, delta, a, b, c, d, bias)]
kernel = selective_scan(*inputs, backend="cpu_kernel")
grads = torch.autograd.grad(kernel.sum(), inputs)
pytorch = selective_scan(*inputs, backend="torch")
torch.testing.assert_close(kernel, pytorch, rtol=1e-5, atol=1e-5)
for g, g_ref in zip(grads, torch.autograd.grad(pytorch.sum(), inputs)):
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4 * g_ref.abs().max().item())
print("AGREE")
"""


def build_variant_and_compare(cache: Path, flags: str) -> Path:
    """Build the kernel with ``$VMAML_UNET_SCAN_CFLAGS=flags`` into ``cache`` in a fresh process, check it against the
    PyTorch scan (forward and gradients) there, and return the library it built."""
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache), selective_scan_cpu.EXTRA_FLAGS_VARIABLE: flags}
    result = subprocess.run(
        [sys.executable, "-c", KERNEL_AGAINST_PYTORCH],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "AGREE" in result.stdout, result.stderr
    (library,) = cache.rglob("*.so")
    return library


def test_eight_lane_build_on_an_avx512_cpu(tmp_path: Path) -> None:
    """An AVX-512 CPU builds the kernel with 16 lanes; the 8-lane variant, which AVX2 CPUs build, is checked here
    (forward and gradients) by building it with AVX-512 switched off."""
    if shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available():
        pytest.skip("no C++ compiler or no ninja on this machine")
    if "avx512f" not in selective_scan_cpu._cpu_description():
        pytest.skip("the CPU has no AVX-512: the default build is the 8-lane one, tested everywhere else")
    build_variant_and_compare(tmp_path, "-mno-avx512f")


def test_kernel_runs_on_torch_openmp_pool_and_on_its_own_threads_without_openmp(tmp_path: Path) -> None:
    """Where torch uses OpenMP (Linux) the kernel is built with it and runs on torch's pool through at::parallel_for;
    built without it (-fno-openmp, as with a compiler that lacks OpenMP) it starts threads of its own. Both agree."""
    if shutil.which(os.environ.get("CXX", "c++")) is None or not is_ninja_available():
        pytest.skip("no C++ compiler or no ninja on this machine")
    if not selective_scan_cpu.openmp_flags():
        pytest.skip("torch does not use OpenMP here: the kernel is built without it anyway")
    default = selective_scan_cpu.cpu_scan_kernel_library_path()
    if selective_scan_cpu.load_cpu_scan_kernel()[0] is None or not default.is_file():
        pytest.skip("the default kernel cannot be built here")
    assert b"GOMP_parallel" in default.read_bytes(), "the default build runs on torch's OpenMP pool"
    library = build_variant_and_compare(tmp_path, "-fno-openmp")
    assert b"GOMP_parallel" not in library.read_bytes(), "built without OpenMP, the kernel uses std::thread"


def test_extra_flags_change_the_cache_key(monkeypatch: pytest.MonkeyPatch) -> None:
    default = selective_scan_cpu.cpu_scan_kernel_library_path()
    monkeypatch.setenv(selective_scan_cpu.EXTRA_FLAGS_VARIABLE, "-mno-avx512f -DEXAMPLE")
    assert selective_scan_cpu.compile_flags()[-2:] == ["-mno-avx512f", "-DEXAMPLE"]
    assert selective_scan_cpu.cpu_scan_kernel_library_path() != default
