"""
Benchmark VMAML-UNet against VM-UNet and the MONAI networks a user would pick instead, and the bundle's selective
scan against a sequential reference, side by side in one process and one run.

Command line (``python -m scripts.benchmark [options]``)::

    python -m scripts.benchmark                                   # CPU: docs/benchmark.md, docs/benchmark_latency.png
    python -m scripts.benchmark --quick                           # tiny sizes, about 2 minutes: runs/benchmark_quick/
    python -m scripts.benchmark --device cuda                     # GPU: docs/benchmark_gpu.md, with AMP training
    python -m scripts.benchmark --repeats 9 --threads 2
    python -m scripts.benchmark --autocast bfloat16               # networks in bf16 autocast: docs/benchmark_bf16.md

Every time is the median of several runs after one warm-up run (:func:`measure`). The headline numbers are ratios
to SwinUNETR measured in the same run, which carry over between machines better than absolute times.
"""

from __future__ import annotations

import ctypes
import logging
import math
import multiprocessing
import operator
import os
import platform
import shlex
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import monai
import torch
import torch.nn as nn
from monai.bundle import ConfigParser
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.networks.nets import BasicUNet, SegResNet, SwinUNETR, UNet
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from scripts.backend_agreement import BackendAgreement
from scripts.backend_agreement import main as compare_backends_on_network
from scripts.backend_agreement import relative_error
from scripts.networks.selective_scan import mamba_ssm_unavailable_reason, selective_scan
from scripts.networks.selective_scan_cpu import load_cpu_scan_kernel
from scripts.networks.selective_scan_reference import selective_scan_reference
from scripts.networks.ss2d import SS2D, with_scan_backend

__all__ = [
    "FULL",
    "NETWORKS",
    "QUICK",
    "BenchmarkSettings",
    "NetworkResult",
    "Report",
    "ScanFit",
    "ScanResult",
    "ScanSettings",
    "Timing",
    "benchmark_network",
    "check_scan_backends",
    "benchmark_scan",
    "build_network",
    "count_macs",
    "cpu_peak_memory",
    "describe_machine",
    "evaluate_targets",
    "main",
    "make_scan_inputs",
    "measure",
    "network_channels",
    "output_names",
    "peak_cuda_increase",
    "peak_memory",
    "peak_rss_increase",
    "plot_latency",
    "power_law_exponent",
    "render_markdown",
    "scaling_exponent",
    "scan_gradient_error",
]

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
INFERENCE_CONFIG = REPO / "configs" / "inference.json"
# The --autocast values, and the suffix of their output files.
AUTOCAST_DTYPES = {"bfloat16": (torch.bfloat16, "bf16"), "float16": (torch.float16, "fp16")}

# The switches of configs/inference.json's network_def that turn every VMAML-UNet addition off: VM-UNet.
VM_UNET_OVERRIDES = {"wavelet_fusion": "none", "use_wcaa": False, "kan_side_heads": False}
# MONAI networks with the constructor arguments a user would start from: the constructor defaults, SwinUNETR's
# feature size 48 of its papers, and (UNet having no defaults) the settings of MONAI's 2D segmentation example
# (examples/segmentation_2d/unet_training_array.py). in_channels and out_channels come from the bundle's config.
MONAI_NETWORKS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "SwinUNETR": (SwinUNETR, {"spatial_dims": 2, "feature_size": 48}),
    "BasicUNet": (BasicUNet, {"spatial_dims": 2}),
    "SegResNet": (SegResNet, {"spatial_dims": 2}),
    "UNet": (
        UNet,
        {"spatial_dims": 2, "channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2},
    ),
}
NETWORKS = ("VMAML-UNet", "VM-UNet", *MONAI_NETWORKS)
BASELINE = "SwinUNETR"
GPU_TRAINING_NETWORKS = ("VMAML-UNet", "VM-UNet", BASELINE)
# the network whose TorchScript form (models/model.ts) is timed too
TORCHSCRIPT_NETWORK = "VMAML-UNet"

# The recurrence's multiply(-add)s per (batch, channel, step, state) that FlopCounterMode cannot see because they are
# elementwise: dt * A, (dt * u) * B and the state update decay * h + input. The output contraction with C is a
# batched matmul in the PyTorch scan, which the counter does count (the exp is not a MAC).
SCAN_ELEMENTWISE_MACS = 3

TARGET_SCAN_SPEEDUP = 50.0
TARGET_SCAN_ERROR = 1e-5
TARGET_LATENCY_RATIO_SMALL = 1.5
TARGET_LATENCY_RATIO_LARGE = 1.0
TARGET_EXPONENT = 1.1
TARGET_COMPARISONS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, "<": operator.lt}


@dataclass(frozen=True)
class ScanSettings:
    """
    Sizes of the selective-scan benchmark.

    Args:
        batch: batch size of the scanned sequences.
        dim: channels ``D`` (VM-UNet's first stage: 4 directions x expand 2 x 96 = 768).
        groups: groups of ``B`` and ``C`` (SS2D's 4 scan directions).
        d_state: state size ``N``.
        lengths: sequence lengths ``L`` timed (the first one is the target's).
        reference_backward_max_length: the longest ``L`` at which the reference's forward+backward, quadratic in
            ``L``, is run; longer ones are extrapolated from it as ``L**2``.
        error_dim: channels of the gradient check against the float64 reference (its backward is quadratic too).
    """

    batch: int
    dim: int
    groups: int
    d_state: int
    lengths: tuple[int, ...]
    reference_backward_max_length: int
    error_dim: int


@dataclass(frozen=True)
class BenchmarkSettings:
    """
    What a benchmark run measures.

    Args:
        sides: square image sides of the latency and throughput measurements; the first is also the side of the
            MACs, the training step and the peak memory.
        throughput_batch: batch size of the throughput measurements.
        cpu_throughput_max_side: the largest side whose throughput is measured on the CPU.
        train_batch: batch size of the timed training step.
        gpu_train_batch: batch size of the mixed-precision training throughput on a GPU.
        repeats: timed runs per measurement after the warm-up.
        budget_s: a measurement stops adding runs once it has taken this long (see :func:`measure`).
        scan: sizes of the selective-scan benchmark.
        autocast: the dtype in which the networks' timed passes (latency, throughput, training step) run under
            ``torch.autocast``, or None for float32. Peak memory, the scan benchmark and the backend check stay float32.
    """

    sides: tuple[int, ...]
    throughput_batch: int
    cpu_throughput_max_side: int
    train_batch: int
    gpu_train_batch: int
    repeats: int
    budget_s: float
    scan: ScanSettings
    autocast: torch.dtype | None = None


FULL = BenchmarkSettings(
    sides=(256, 512, 1024),
    throughput_batch=8,
    # batch 8 at 1024x1024 would take minutes per run on a few CPU cores (and several GB for the Mamba networks)
    cpu_throughput_max_side=512,
    train_batch=2,
    gpu_train_batch=32,
    repeats=5,
    budget_s=30.0,
    scan=ScanSettings(
        batch=1, dim=768, groups=4, d_state=16, lengths=(1024, 4096), reference_backward_max_length=1024, error_dim=64
    ),
)
QUICK = BenchmarkSettings(
    # 64 px is the least at which SwinUNETR trains: its instance norm needs more than 1x1 at 1/32 of the side
    sides=(64, 96),
    throughput_batch=2,
    cpu_throughput_max_side=64,
    train_batch=2,
    gpu_train_batch=2,
    repeats=1,
    budget_s=0.5,
    scan=ScanSettings(
        batch=1, dim=32, groups=4, d_state=4, lengths=(64, 128), reference_backward_max_length=64, error_dim=16
    ),
)


@dataclass(frozen=True)
class Timing:
    """The median ``seconds`` of ``runs`` timed runs, and whether a warm-up run preceded them."""

    seconds: float
    runs: int
    warmed_up: bool = True


@dataclass
class NetworkResult:
    """Everything measured for one network; ``None`` where a measurement was skipped (see ``skipped``)."""

    name: str
    parameters: int
    macs: int
    scan_macs: int
    latency: dict[int, Timing | None] = field(default_factory=dict)
    throughput: dict[int, Timing | None] = field(default_factory=dict)
    train_step: Timing | None = None
    memory: tuple[int, int] | None = None
    gpu_train_step: Timing | None = None
    torchscript_latency: Timing | None = None
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class ScanResult:
    """
    Selective-scan timings and the forward's error against the float64 reference at one sequence length.
    ``reference_forward_backward`` is None where the reference's forward+backward was not run and
    ``reference_forward_backward_s`` is extrapolated (:class:`ScanFit`).
    """

    length: int
    forward: Timing
    reference_forward: Timing
    forward_backward: Timing
    reference_forward_backward: Timing | None
    reference_forward_backward_s: float
    forward_error: float

    @property
    def speedup_forward(self) -> float:
        return self.reference_forward.seconds / self.forward.seconds

    @property
    def speedup_forward_backward(self) -> float:
        return self.reference_forward_backward_s / self.forward_backward.seconds


# how the sequential reference's forward+backward time grows with L (see benchmark_scan)
REFERENCE_BACKWARD_EXPONENT = 2.0


@dataclass(frozen=True)
class ScanFit:
    """The power law ``t ~ L**exponent`` by which the reference's forward+backward is extrapolated from ``lengths``."""

    exponent: float
    lengths: list[int]


def measure(
    fn: Callable[[], object],
    repeats: int,
    budget_s: float,
    synchronize: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """
    Time ``fn``: one warm-up run, then up to ``repeats`` timed runs, of which the median is returned.

    Timed runs stop once warm-up and runs together have taken ``budget_s`` (at least one timed run is made). A
    warm-up that alone takes ``budget_s`` or more is the only run: one-time costs are negligible at that length.

    Args:
        fn: the work to time.
        repeats: the most timed runs.
        budget_s: seconds after which no further run is started.
        synchronize: waits for asynchronous work, e.g. ``torch.cuda.synchronize``.
        clock: the clock, in seconds.
    """

    def run() -> float:
        start = clock()
        fn()
        synchronize()
        return clock() - start

    spent = run()
    if spent >= budget_s:
        return Timing(spent, 1, warmed_up=False)
    times: list[float] = []
    while len(times) < repeats and (not times or spent < budget_s):
        times.append(run())
        spent += times[-1]
    return Timing(statistics.median(times), len(times))


def power_law_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The exponent ``e`` of ``y ~ x**e``: the least-squares slope of ``log y`` on ``log x`` (two points or more)."""
    return statistics.linear_regression([math.log(x) for x in xs], [math.log(y) for y in ys]).slope


def output_names(device: torch.device, autocast: torch.dtype | None = None) -> tuple[str, str]:
    """
    The names of the Markdown page and the PNG plot of a run on ``device`` with ``autocast``: ``benchmark.md`` and
    ``benchmark_latency.png`` for float32 on the CPU, and suffixed by ``_gpu`` and the autocast dtype otherwise, so
    that a GPU or reduced-precision run is written beside the CPU page instead of over it.
    """
    suffix = "_gpu" if device.type == "cuda" else ""
    suffix += "".join(f"_{short}" for dtype, short in AUTOCAST_DTYPES.values() if dtype == autocast)
    return f"benchmark{suffix}.md", f"benchmark{suffix}_latency.png"


def build_network(name: str, config_file: str | os.PathLike = INFERENCE_CONFIG) -> nn.Module:
    """
    One of :data:`NETWORKS`, on the CPU: VMAML-UNet is ``network_def`` of ``config_file``, VM-UNet the same with
    :data:`VM_UNET_OVERRIDES`, and the MONAI networks take ``in_channels`` and ``out_channels`` from the config.
    """
    parser = ConfigParser()
    parser.read_config(str(config_file))
    if name in MONAI_NETWORKS:
        network_class, kwargs = MONAI_NETWORKS[name]
        channels = {key: parser.get_parsed_content(key) for key in ("in_channels", "out_channels")}
        return network_class(**channels, **kwargs)
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose one of {NETWORKS}.")
    if name == "VM-UNet":
        for key, value in VM_UNET_OVERRIDES.items():
            parser[key] = value
    return parser.get_parsed_content("network_def")


def count_macs(network: nn.Module, image: Tensor) -> tuple[int, int]:
    """
    Multiply-accumulates of one forward pass of ``network`` on ``image`` ``(B, C, H, W)``, in its current mode.

    Returns:
        ``(counted, scan)``: what :class:`~torch.utils.flop_counter.FlopCounterMode` counts (its FLOPs / 2: matmuls
        and convolutions, no elementwise op), and the selective scans' elementwise multiply(-add)s, counted
        analytically at each :class:`~scripts.networks.ss2d.SS2D` call (:data:`SCAN_ELEMENTWISE_MACS`).
    """
    scan_macs: list[int] = []

    def count_scan(module: SS2D, args: tuple[Tensor, ...], output: Tensor) -> None:
        batch, height, width = args[0].shape[:3]
        channels = module.num_directions * module.d_inner
        scan_macs.append(SCAN_ELEMENTWISE_MACS * batch * channels * height * width * module.d_state)

    # Counted on the PyTorch scan, whose contraction with C is a visible batched matmul: the CPU kernel's work is
    # invisible to the counter, and MACs are a property of the network, not of the backend.
    network = with_scan_backend(network, "torch")
    handles = [m.register_forward_hook(count_scan) for m in network.modules() if isinstance(m, SS2D)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            network(image)
    finally:
        for handle in handles:
            handle.remove()
    return counter.get_total_flops() // 2, sum(scan_macs)


def network_channels(config_file: str | os.PathLike = INFERENCE_CONFIG) -> tuple[int, int]:
    """``(in_channels, out_channels)`` of ``config_file``."""
    parser = ConfigParser()
    parser.read_config(str(config_file))
    return parser.get_parsed_content("in_channels"), parser.get_parsed_content("out_channels")


def _inference(network: nn.Module, images: Tensor, autocast: torch.dtype | None = None) -> Callable[[], None]:
    def infer() -> None:
        with torch.no_grad(), torch.autocast(images.device.type, dtype=autocast, enabled=autocast is not None):
            network(images)

    return infer


def _training_step(
    network: nn.Module, images: Tensor, out_channels: int, autocast: torch.dtype | None = None
) -> Callable[[], None]:
    """
    One training step of ``network`` on ``images`` ``(B, C, H, W)``: forward, DiceCE loss against random labels
    (summed over VMAML-UNet's deep-supervision outputs with MONAI's ``DeepSupervisionLoss``), backward and an AdamW
    step; the forward in ``autocast`` when given, with gradient scaling for float16 (mixed-precision training). The
    optimizer's state appears at the first call.
    """
    binary = out_channels == 1
    label_shape = (images.shape[0], 1, *images.shape[2:])
    labels = torch.randint(0, 2 if binary else out_channels, label_shape, device=images.device).float()
    loss_function = DeepSupervisionLoss(DiceCELoss(sigmoid=binary, softmax=not binary, to_onehot_y=not binary))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(images.device.type, enabled=autocast == torch.float16)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=autocast, enabled=autocast is not None):
            output = network(images)
        # VMAML-UNet in training mode stacks its main and side logits on dim 1: (B, levels, C, H, W).
        outputs = list(output.unbind(1)) if output.dim() == images.dim() + 1 else output
        scaler.scale(loss_function(outputs, labels)).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def _read_proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no {key} line")


def _reset_peak_rss() -> None:
    # Linux >= 4.0: writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current one (VmRSS).
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_increase(fn: Callable[[], None]) -> int:
    """Bytes by which this process's peak resident set size rises above its size before ``fn`` while it runs (Linux)."""
    _reset_peak_rss()
    before = _read_proc_status_kb("VmRSS")
    fn()
    return (_read_proc_status_kb("VmHWM") - before) * 1024


def peak_cuda_increase(fn: Callable[[], None]) -> int:
    """Bytes by which the peak of allocated CUDA memory rises above the allocation before ``fn`` while it runs."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def peak_memory(
    network: nn.Module,
    side: int,
    train_batch: int,
    channels: tuple[int, int],
    device: torch.device,
    tracker: Callable[[Callable[[], None]], int],
) -> tuple[int, int]:
    """
    Peak memory above the network's weights, in bytes, of inference at batch 1 (after one warm-up pass, so that
    one-time buffers are left out) and of a first training step at batch ``train_batch`` (gradients and AdamW state
    included), both on ``side x side`` images; ``tracker`` runs a callable and returns its peak increase.
    """
    in_channels, out_channels = channels
    network.eval()
    infer = _inference(network, torch.randn(1, in_channels, side, side, device=device))
    infer()
    inference = tracker(infer)
    network.train()
    images = torch.randn(train_batch, in_channels, side, side, device=device)
    training = tracker(_training_step(network, images, out_channels))
    return inference, training


def _return_freed_memory_to_system() -> None:
    # glibc keeps freed blocks for reuse, which would hide a later measurement's allocations from the peak resident
    # set; served by mmap (M_MMAP_THRESHOLD = -3) and trimmed (M_TRIM_THRESHOLD = -1) from 64 KiB up, they go back.
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(-3, 64 * 1024)
        mallopt(-1, 64 * 1024)


def cpu_peak_memory(
    names: Sequence[str], config_file: str, side: int, train_batch: int, threads: int
) -> dict[str, tuple[int, int]] | str:
    """
    :func:`peak_memory` of each network on the CPU by :func:`peak_rss_increase`, meant to run in a fresh process
    (:func:`main` spawns one) whose allocator has not cached the memory of other work.

    Returns:
        the peaks by network name, or why they cannot be measured on this system.
    """
    torch.set_num_threads(threads)
    try:
        _reset_peak_rss()
    except OSError as error:
        return f"needs Linux's /proc/self/clear_refs ({error})"
    _return_freed_memory_to_system()
    channels = network_channels(config_file)
    peaks = {}
    for name in names:
        torch.manual_seed(0)
        peaks[name] = peak_memory(
            build_network(name, config_file), side, train_batch, channels, torch.device("cpu"), peak_rss_increase
        )
    return peaks


def _cpu_peak_memory_in_child(
    names: Sequence[str], config_file: str, side: int, train_batch: int
) -> dict[str, tuple[int, int]] | str:
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(cpu_peak_memory, (list(names), config_file, side, train_batch, torch.get_num_threads()))


class _Measurer:
    """Times callables with the run's settings on its device, recording CUDA out-of-memory as a skip."""

    def __init__(self, settings: BenchmarkSettings, device: torch.device) -> None:
        self.settings = settings
        self.synchronize: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def time(self, fn: Callable[[], None], result: NetworkResult, what: str) -> Timing | None:
        try:
            timing = measure(fn, self.settings.repeats, self.settings.budget_s, self.synchronize)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            result.skipped[what] = "out of GPU memory"
            logger.info("%s %s: out of GPU memory", result.name, what)
            return None
        logger.info("%s %s: %.4g s (%d runs)", result.name, what, timing.seconds, timing.runs)
        return timing


def benchmark_network(
    name: str, settings: BenchmarkSettings, device: torch.device, config_file: str | os.PathLike = INFERENCE_CONFIG
) -> NetworkResult:
    """Parameters, MACs (on the CPU), latencies, throughputs and training steps of one network on ``device``."""
    torch.manual_seed(0)
    channels = network_channels(config_file)
    in_channels, out_channels = channels
    network = build_network(name, config_file).eval()
    first = settings.sides[0]
    macs, scan_macs = count_macs(network, torch.randn(1, in_channels, first, first))
    result = NetworkResult(name, sum(p.numel() for p in network.parameters()), macs, scan_macs)
    network.to(device)
    measurer = _Measurer(settings, device)

    def images(batch: int, side: int) -> Tensor:
        return torch.randn(batch, in_channels, side, side, device=device)

    for side in settings.sides:
        result.latency[side] = measurer.time(
            _inference(network, images(1, side), settings.autocast), result, f"latency {side}"
        )
    if name == TORCHSCRIPT_NETWORK:
        # what models/model.ts and the MONAI Deploy app run: TorchScript reaches neither kernel, only the PyTorch scan
        scripted = torch.jit.script(network)
        result.torchscript_latency = measurer.time(
            _inference(scripted, images(1, first), settings.autocast), result, f"TorchScript latency {first}"
        )
    for side in settings.sides:
        what = f"throughput {side}"
        if device.type == "cpu" and side > settings.cpu_throughput_max_side:
            result.throughput[side] = None
            result.skipped[what] = "skipped on the CPU, see Method"
            continue
        result.throughput[side] = measurer.time(
            _inference(network, images(settings.throughput_batch, side), settings.autocast), result, what
        )
    if device.type == "cuda":
        # before any training step, so that no gradients or optimizer state are counted as weights
        try:
            result.memory = peak_memory(network, first, settings.train_batch, channels, device, peak_cuda_increase)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            result.skipped["memory"] = "out of GPU memory"
    network.train()
    step = _training_step(network, images(settings.train_batch, first), out_channels, settings.autocast)
    result.train_step = measurer.time(step, result, f"training step {first}")
    if device.type == "cuda" and name in GPU_TRAINING_NETWORKS:
        step = _training_step(network, images(settings.gpu_train_batch, first), out_channels, torch.float16)
        result.gpu_train_step = measurer.time(step, result, f"AMP training step {first}")
    return result


def make_scan_inputs(
    batch: int, dim: int, groups: int, d_state: int, length: int, device: torch.device | str = "cpu", seed: int = 0
) -> list[Tensor]:
    """
    float32 inputs ``[u, delta, A, B, C, D, delta_bias]`` of :func:`selective_scan` drawn as SS2D's are at
    initialisation: ``A = -(1..N)``, ``D = 1`` and step sizes ``softplus(delta + delta_bias)`` around a log-uniform
    draw from [0.001, 0.1]; ``u``, ``B`` and ``C`` standard normal, ``delta`` normal with standard deviation 0.1.
    """
    generator = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(dim, generator=generator) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    inputs = [
        torch.randn(batch, dim, length, generator=generator),
        0.1 * torch.randn(batch, dim, length, generator=generator),
        -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(dim, 1),
        torch.randn(batch, groups, d_state, length, generator=generator),
        torch.randn(batch, groups, d_state, length, generator=generator),
        torch.ones(dim),
        dt + torch.log(-torch.expm1(-dt)),
    ]
    return [t.to(device) for t in inputs]


def _scan_forward(scan: Callable[..., Tensor], inputs: Sequence[Tensor]) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            scan(*inputs)

    return forward


def _scan_forward_backward(scan: Callable[..., Tensor], inputs: Sequence[Tensor]) -> Callable[[], None]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    grad_y = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(inputs[0].device)

    def forward_backward() -> None:
        torch.autograd.grad(scan(*leaves), leaves, grad_y)

    return forward_backward


def scan_gradient_error(settings: ScanSettings, device: torch.device) -> float:
    """
    The largest :func:`relative_error` over the seven input gradients of :func:`selective_scan` in float32 against
    those of :func:`selective_scan_reference` in float64, at the first length with ``error_dim`` channels.
    """
    inputs = make_scan_inputs(
        settings.batch, settings.error_dim, settings.groups, settings.d_state, settings.lengths[0], device
    )
    leaves = [t.clone().requires_grad_() for t in inputs]
    leaves64 = [t.double().requires_grad_() for t in inputs]
    grad_y = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).to(device)
    grads = torch.autograd.grad(selective_scan(*leaves), leaves, grad_y)
    grads64 = torch.autograd.grad(selective_scan_reference(*leaves64), leaves64, grad_y.double())
    return max(relative_error(g, g64) for g, g64 in zip(grads, grads64))


def benchmark_scan(
    settings: ScanSettings, repeats: int, budget_s: float, device: torch.device
) -> tuple[list[ScanResult], ScanFit | None]:
    """
    Time :func:`selective_scan` and :func:`selective_scan_reference` at each length (forward without gradients,
    forward+backward of all inputs) and measure the forward's error against the float64 reference.

    Returns:
        the results by length, and the power law by which the reference's forward+backward time is extrapolated
        from ``reference_backward_max_length`` to longer lengths (None when every length was run).
    """
    synchronize: Callable[[], None] = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    scan_sizes = (settings.batch, settings.dim, settings.groups, settings.d_state)

    def timed(fn: Callable[[], None], what: str) -> Timing:
        timing = measure(fn, repeats, budget_s, synchronize)
        logger.info("scan %s: %.4g s (%d runs)", what, timing.seconds, timing.runs)
        return timing

    longest = settings.reference_backward_max_length
    reference_lengths = {length for length in settings.lengths if length <= longest}
    extrapolate = any(length > longest for length in settings.lengths)
    if extrapolate:
        reference_lengths.add(longest)
    reference_times = {}
    for length in sorted(reference_lengths):
        inputs = make_scan_inputs(*scan_sizes, length, device)
        reference_times[length] = timed(
            _scan_forward_backward(selective_scan_reference, inputs), f"reference forward+backward L={length}"
        )
    fit = None
    if extrapolate:
        # Quadratic, not a fit: autograd through the reference's loop accumulates a full (batch, D, L, N) gradient at
        # each of its L steps. Fits between two short lengths overstate it: there the working set drops out of cache.
        fit = ScanFit(REFERENCE_BACKWARD_EXPONENT, [longest])

    results = []
    for length in settings.lengths:
        inputs = make_scan_inputs(*scan_sizes, length, device)
        with torch.no_grad():
            error = relative_error(selective_scan(*inputs), selective_scan_reference(*[t.double() for t in inputs]))
        measured = reference_times.get(length)
        results.append(
            ScanResult(
                length=length,
                forward=timed(_scan_forward(selective_scan, inputs), f"forward L={length}"),
                reference_forward=timed(
                    _scan_forward(selective_scan_reference, inputs), f"reference forward L={length}"
                ),
                forward_backward=timed(_scan_forward_backward(selective_scan, inputs), f"forward+backward L={length}"),
                reference_forward_backward=measured,
                reference_forward_backward_s=(
                    measured.seconds
                    if measured is not None
                    else reference_times[longest].seconds * (length / longest) ** fit.exponent
                ),
                forward_error=error,
            )
        )
    return results, fit


def check_scan_backends(
    settings: BenchmarkSettings, device: torch.device, config_file: str | os.PathLike = INFERENCE_CONFIG
) -> BackendAgreement | str:
    """
    The kernel scan backend of ``device`` (``cpu_kernel`` or ``mamba_ssm``) against the PyTorch scan on VMAML-UNet
    (:func:`scripts.backend_agreement.main`), at batch ``train_batch`` of the first side; or why
    the kernel cannot be checked here.
    """
    if device.type == "cuda":
        backend, reason = "mamba_ssm", mamba_ssm_unavailable_reason()
    else:
        backend = "cpu_kernel"
        reason = None if load_cpu_scan_kernel()[0] is not None else "the C++ kernel did not build"
    if reason is not None:
        return f"{backend} not checked: {reason}"
    agreement = compare_backends_on_network(
        backend, "torch", device.type, settings.sides[0], settings.train_batch, config_file
    )
    logger.info(agreement.summary())
    return agreement


@dataclass
class Report:
    """A benchmark run: its context and results, from which the Markdown and the plot are made."""

    settings: BenchmarkSettings
    device: torch.device
    machine: str
    command: str
    date: str
    quick: bool
    networks: list[NetworkResult]
    memory_note: str
    scans: list[ScanResult]
    scan_fit: ScanFit | None
    scan_gradient_error: float
    backend_agreement: BackendAgreement | str
    gpu_name: str | None = None

    def network(self, name: str) -> NetworkResult:
        return next(result for result in self.networks if result.name == name)

    def latency_ratio(self, result: NetworkResult, side: int) -> float | None:
        timing, baseline = result.latency.get(side), self.network(BASELINE).latency.get(side)
        return None if timing is None or baseline is None else timing.seconds / baseline.seconds


def scaling_exponent(result: NetworkResult) -> float | None:
    """The exponent of batch-1 latency against pixel count over the measured sides (1.0 = linear)."""
    points = [(side * side, timing.seconds) for side, timing in result.latency.items() if timing is not None]
    return power_law_exponent(*zip(*points)) if len(points) >= 2 else None


def _target(
    description: str, value: float | None, symbol: str, limit: float, spec: str, unit: str = ""
) -> tuple[bool | None, str]:
    shown = "not measured" if value is None else format(value, spec) + unit
    passed = None if value is None else TARGET_COMPARISONS[symbol](value, limit)
    return passed, f"{description}: {shown} (target {symbol} {format(limit, spec)}{unit})"


def evaluate_targets(report: Report) -> list[tuple[bool | None, str]]:
    """``(passed, sentence)`` for each target of the benchmark; ``passed`` is None where it was not measured."""
    first, last = report.settings.sides[0], report.settings.sides[-1]
    scan = report.scans[0]
    vmaml = report.network("VMAML-UNet")
    error = max([s.forward_error for s in report.scans] + [report.scan_gradient_error])
    return [
        _target(
            f"selective scan forward+backward speed-up over the sequential reference at L={scan.length}",
            scan.speedup_forward_backward,
            ">=",
            TARGET_SCAN_SPEEDUP,
            ",.0f",
            "x",
        ),
        _target(
            "selective scan relative error against the float64 reference (forward and gradients)",
            error,
            "<",
            TARGET_SCAN_ERROR,
            ".1e",
        ),
        _target(
            f"VMAML-UNet / {BASELINE} latency at {first}x{first}",
            report.latency_ratio(vmaml, first),
            "<=",
            TARGET_LATENCY_RATIO_SMALL,
            ".2f",
            "x",
        ),
        _target(
            f"VMAML-UNet / {BASELINE} latency at {last}x{last}",
            report.latency_ratio(vmaml, last),
            "<=",
            TARGET_LATENCY_RATIO_LARGE,
            ".2f",
            "x",
        ),
        _target(
            f"VMAML-UNet latency scaling exponent in pixels from {first} to {last} px (1.0 = linear)",
            scaling_exponent(vmaml),
            "<=",
            TARGET_EXPONENT,
            ".2f",
        ),
    ]


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _speedup(value: float) -> str:
    return f"{value:,.0f}x" if value >= 10 else f"{value:.1f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _memory_cells(result: NetworkResult) -> list[str]:
    if result.memory is None:
        return ["n/a", "n/a"]
    return [f"{bytes_ / 2**20:,.0f}" for bytes_ in result.memory]


def render_markdown(report: Report) -> str:
    """The Markdown page of a benchmark run: machine, command, targets, tables and method."""
    settings = report.settings
    sides, first = settings.sides, settings.sides[0]
    baseline = report.network(BASELINE)
    gpu = report.gpu_name is not None
    lines = [
        "# Benchmark: VMAML-UNet, VM-UNet and MONAI networks",
        "",
        f"- Machine: {report.machine}",
        f"- Date: {report.date}",
        f"- Command: `{report.command}`",
        f"- Precision: {_precision(settings)}",
    ]
    if report.quick:
        lines.append(
            "- QUICK MODE: tiny sizes and a single run per measurement, to check that the benchmark runs; "
            "its numbers mean nothing."
        )
    lines += [
        "",
        f"Ratios are to {BASELINE} in the same run (below 1 = faster than {BASELINE}). Times are medians of up to "
        f"{settings.repeats} runs after one warm-up run (see Method).",
        "",
        "## Targets",
        "",
    ]
    for passed, sentence in evaluate_targets(report):
        lines.append(f"- {'n/a' if passed is None else 'PASS' if passed else 'FAIL'}: {sentence}")

    lines += ["", f"## Inference latency, batch 1 (ratio to {BASELINE}, then ms)", ""]
    header = ["Network"] + [f"{side} px" for side in sides] + [f"{side} px (ms)" for side in sides]
    header.append(f"Scaling exponent {sides[0]}-{sides[-1]}")
    rows = []
    for result in report.networks:
        exponent = scaling_exponent(result)
        rows.append(
            [result.name]
            + [_ratio(report.latency_ratio(result, side)) for side in sides]
            + [_ms(t.seconds) if (t := result.latency.get(side)) else "n/a" for side in sides]
            + ["n/a" if exponent is None else f"{exponent:.2f}"]
        )
    lines += _table(header, rows)

    scripted = report.network(TORCHSCRIPT_NETWORK)
    eager = scripted.latency.get(first)
    if scripted.torchscript_latency is not None and eager is not None:
        seconds = scripted.torchscript_latency.seconds
        lines += [
            "",
            f"{TORCHSCRIPT_NETWORK} scripted with torch.jit.script, as models/model.ts and the MONAI Deploy app run "
            f"it (TorchScript reaches neither scan kernel, only the PyTorch scan): {_ms(seconds)} ms at "
            f"{first}x{first}, {seconds / eager.seconds:.2f}x the eager network's time.",
        ]

    lines += ["", f"## Inference throughput, batch {settings.throughput_batch} (images/s, ratio to {BASELINE})", ""]
    rows = []
    for result in report.networks:
        row = [result.name]
        for side in sides:
            timing, reference = result.throughput.get(side), baseline.throughput.get(side)
            if timing is None:
                row.append(f"n/a ({result.skipped.get(f'throughput {side}', 'not measured')})")
                continue
            ratio = None if reference is None else reference.seconds / timing.seconds
            row.append(f"{settings.throughput_batch / timing.seconds:.3g} ({_ratio(ratio)})")
        rows.append(row)
    lines += _table(["Network"] + [f"{side} px" for side in sides], rows)

    lines += ["", f"## Size, cost and memory at {first}x{first}", ""]
    header = [
        "Network",
        "Parameters (M)",
        "GMACs (counted)",
        "GMACs (scan recurrence)",
        f"Training step, batch {settings.train_batch} (ms)",
        f"Training step / {BASELINE}",
        "Peak memory, inference (MB)",
        "Peak memory, training step (MB)",
    ]
    rows = []
    for result in report.networks:
        step, reference = result.train_step, baseline.train_step
        rows.append(
            [
                result.name,
                f"{result.parameters / 1e6:.2f}",
                f"{result.macs / 1e9:.2f}",
                f"{result.scan_macs / 1e9:.2f}",
                "n/a" if step is None else _ms(step.seconds),
                _ratio(None if step is None or reference is None else step.seconds / reference.seconds),
                *_memory_cells(result),
            ]
        )
    lines += _table(header, rows)

    scan_settings = settings.scan
    lines += [
        "",
        "## Selective scan against the sequential reference",
        "",
        f"batch {scan_settings.batch}, D = {scan_settings.dim} channels in {scan_settings.groups} groups, "
        f"N = {scan_settings.d_state}, float32; ms, speed-up = reference / ours.",
        "",
    ]
    rows = []
    for scan in report.scans:
        reference = _ms(scan.reference_forward_backward_s)
        if scan.reference_forward_backward is None:
            reference = f"~{reference} (extrapolated)"
        rows.append(
            [
                str(scan.length),
                _ms(scan.forward.seconds),
                _ms(scan.reference_forward.seconds),
                _speedup(scan.speedup_forward),
                _ms(scan.forward_backward.seconds),
                reference,
                _speedup(scan.speedup_forward_backward),
                f"{scan.forward_error:.2e}",
            ]
        )
    lines += _table(
        [
            "L",
            "Forward",
            "Reference forward",
            "Speed-up",
            "Forward+backward",
            "Reference forward+backward",
            "Speed-up",
            "Forward error vs float64",
        ],
        rows,
    )
    lines += [
        "",
        f"Largest gradient error vs float64 (L = {scan_settings.lengths[0]}, {scan_settings.error_dim} "
        f"channels): {report.scan_gradient_error:.2e}.",
    ]

    if gpu:
        lines += [
            "",
            f"## GPU: {report.gpu_name}",
            "",
            f"Training throughput at {first}x{first}, batch {settings.gpu_train_batch}, mixed precision (float16 "
            f"autocast and gradient scaling), and inference latency at batch 1 in {_precision_name(settings)}.",
            "",
        ]
        rows = []
        gpu_baseline = baseline.gpu_train_step
        for result in report.networks:
            if result.name not in GPU_TRAINING_NETWORKS:
                continue
            step, latency = result.gpu_train_step, result.latency.get(first)
            rows.append(
                [
                    result.name,
                    "n/a" if step is None else f"{settings.gpu_train_batch / step.seconds:.3g}",
                    _ratio(None if step is None or gpu_baseline is None else gpu_baseline.seconds / step.seconds),
                    "n/a" if latency is None else _ms(latency.seconds),
                    _ratio(report.latency_ratio(result, first)),
                ]
            )
        lines += _table(
            [
                "Network",
                "Training (images/s)",
                f"Training throughput / {BASELINE}",
                f"Latency {first} px (ms)",
                f"Latency / {BASELINE}",
            ],
            rows,
        )

    lines += [
        "",
        "## Scan backends on the full network",
        "",
        f"VMAML-UNet at {first}x{first}, batch {settings.train_batch}, float32, the same weights and images: the "
        "kernel scan against the PyTorch scan (`python -m scripts.backend_agreement`). Relative errors of the "
        "eval-mode output (no gradients), of the training-mode outputs (main and side heads) and of the parameter "
        "gradient that differs most, from a fixed random cotangent.",
        "",
        "- "
        + (
            report.backend_agreement
            if isinstance(report.backend_agreement, str)
            else report.backend_agreement.summary()
        ),
    ]

    lines += ["", "## Method", ""] + [f"- {note}" for note in _method_notes(report)]
    lines += [
        "",
        f"![Inference latency against image side]({output_names(report.device, report.settings.autocast)[1]})",
        "",
    ]
    return "\n".join(lines)


def _precision_name(settings: BenchmarkSettings) -> str:
    """ "float32", or e.g. "bfloat16 autocast"."""
    return "float32" if settings.autocast is None else f"{str(settings.autocast).removeprefix('torch.')} autocast"


def _precision(settings: BenchmarkSettings) -> str:
    if settings.autocast is None:
        return "float32"
    return (
        f"the networks' latency, throughput and training step in {_precision_name(settings)} (torch.autocast); "
        "peak memory, the selective scan and the backend check in float32"
    )


def _method_notes(report: Report) -> list[str]:
    settings = report.settings
    first = settings.sides[0]
    monai_specs = "; ".join(
        f"`{name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})`" for name, (_, kwargs) in MONAI_NETWORKS.items()
    )
    overrides = ", ".join(f"{k}={v!r}" for k, v in VM_UNET_OVERRIDES.items())
    notes = [
        "Networks: VMAML-UNet is `network_def` of configs/inference.json; VM-UNet is the same with "
        f"{overrides} (every addition off); MONAI {monai.__version__}: {monai_specs}, with in_channels and "
        "out_channels of configs/inference.json. UNet has no default channels: these are MONAI's 2D segmentation "
        "example's (examples/segmentation_2d/unet_training_array.py). All in eval mode for inference, training mode "
        "(VMAML-UNet with its deep-supervision heads) for the training step.",
        f"Timing: each measurement runs once to warm up, then up to {settings.repeats} times; the median is "
        f"reported. A measurement stops adding runs after {settings.budget_s:g} s, and one whose warm-up alone takes "
        "that long is run once (no separate warm-up). " + _short_measurements(report),
        f"Training step: forward, DiceCE loss against random labels (MONAI `DeepSupervisionLoss` over VMAML-UNet's "
        f"side outputs), backward and an AdamW step, batch {settings.train_batch} at {first}x{first}.",
        f"MACs at {first}x{first}, batch 1, eval mode, on the CPU: 'counted' is torch.utils.flop_counter."
        "FlopCounterMode's FLOPs / 2, which covers matmuls and convolutions but no elementwise op, so not the "
        "selective scan's recurrence; 'scan recurrence' adds that analytically: "
        f"{SCAN_ELEMENTWISE_MACS} multiply(-add)s per batch element, channel, step and state (dt*A, dt*u*B and the "
        "state update) at every SS2D call. The scan's output contraction with C is a batched matmul and counted.",
        "Peak memory: " + report.memory_note,
        "Selective scan: ours is scripts.networks.selective_scan with its default backend (on the CPU the fused C++ "
        "kernel for both passes, see the machine line; mamba-ssm's kernel "
        "on a GPU when installed); the Mamba networks' SS2D runs its four scans in one kernel call without gradients. "
        "The reference is scripts.networks.selective_scan_reference, a per-time-step loop "
        "like mamba-ssm's selective_scan_ref. Forward without gradients; forward+backward computes the gradients of "
        "all seven inputs. The reference's backward is autograd through a loop that indexes one step of (batch, D, "
        "L, N) tensors at a time, which is quadratic in L: the forward+backward speed-up grows with L. Errors are "
        "max |ours - reference| / max |reference| with the reference in float64 on the same inputs, drawn as SS2D's "
        "at initialisation.",
    ]
    if report.scan_fit is not None:
        lengths = ", ".join(str(length) for length in report.scan_fit.lengths)
        notes.append(
            f"The reference's forward+backward is run up to L = {settings.scan.reference_backward_max_length} only; "
            f"longer lengths are extrapolated from L = {lengths} as t ~ L^{report.scan_fit.exponent:.0f}, the growth "
            "of its backward's work (a full-size gradient accumulated at each step); an estimate, not a measurement."
        )
    if report.device.type == "cpu":
        notes.append(
            f"Throughput at batch {settings.throughput_batch} is not measured on the CPU above "
            f"{settings.cpu_throughput_max_side} px (minutes per run and several GB for the Mamba networks)."
        )
    plot = output_names(report.device, settings.autocast)[1]
    notes.append(f"Figure: {plot}, batch-1 latency against image side, log-log, made by the command above.")
    return notes


def _short(timing: Timing | None, report: Report) -> bool:
    return timing is not None and (timing.runs < report.settings.repeats or not timing.warmed_up)


def _runs(timing: Timing) -> str:
    return f"({timing.runs}{'' if timing.warmed_up else ', no warm-up'})"


def _short_measurements(report: Report) -> str:
    short = []
    for result in report.networks:
        timings = {f"latency {s}": t for s, t in result.latency.items()}
        timings |= {f"throughput {s}": t for s, t in result.throughput.items()}
        timings["training step"] = result.train_step
        timings["TorchScript latency"] = result.torchscript_latency
        short += [f"{result.name} {what} {_runs(t)}" for what, t in timings.items() if _short(t, report)]
    for scan in report.scans:
        timings = {
            "forward": scan.forward,
            "reference forward": scan.reference_forward,
            "forward+backward": scan.forward_backward,
            "reference forward+backward": scan.reference_forward_backward,
        }
        short += [f"scan {what} L={scan.length} {_runs(t)}" for what, t in timings.items() if _short(t, report)]
    if not short:
        return f"Every measurement was run {report.settings.repeats} times after its warm-up."
    return "Measurements run fewer times (runs): " + ", ".join(short) + "."


def _figure_class() -> type:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "the benchmark's latency plot needs matplotlib: pip install matplotlib (listed in requirements-dev.txt)"
        ) from error
    return Figure


def plot_latency(report: Report, path: Path) -> None:
    """Write a log-log PNG of batch-1 latency against image side, one line per network, to ``path``."""
    figure = _figure_class()(figsize=(7.0, 4.5), layout="constrained")
    axes = figure.add_subplot()
    sides = report.settings.sides
    for result in report.networks:
        points = [(side, timing.seconds * 1e3) for side in sides if (timing := result.latency.get(side)) is not None]
        if points:
            axes.plot(*zip(*points), marker="o", label=result.name)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(sides, [str(side) for side in sides], minor=False)
    axes.set_xlabel("image side (px, square)")
    axes.set_ylabel("latency, batch 1 (ms)")
    machine = textwrap.fill(report.machine, width=110)
    axes.set_title(f"Inference latency, batch 1, {report.date}\n{machine}", fontsize=7)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def describe_machine(device: torch.device) -> str:
    """One line: GPU (with ``device`` on CUDA), CPU model, cores, torch threads, OS and library versions."""
    parts = [
        f"CPU {_cpu_model()}",
        f"{os.cpu_count()} logical cores",
        f"{torch.get_num_threads()} torch threads",
        f"{platform.system()} {platform.release()}",
        f"Python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"MONAI {monai.__version__}",
    ]
    if device.type == "cuda":
        reason = mamba_ssm_unavailable_reason()
        scan = "mamba-ssm's kernel" if reason is None else f"PyTorch (mamba-ssm cannot be used: {reason})"
        parts = [f"GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), GPU scan: {scan}"] + parts
    else:
        kernel, _ = load_cpu_scan_kernel()
        parts.append(
            "CPU scan: " + ("fused C++ kernel" if kernel is not None else "PyTorch (the C++ kernel did not build)")
        )
    return ", ".join(parts)


def _command(
    quick: bool, output_dir: str | None, device: str, repeats: int | None, threads: int | None, autocast: str | None
) -> str:
    words = ["python", "-m", "scripts.benchmark"] + (["--quick"] if quick else [])
    options = (
        ("output_dir", output_dir),
        ("device", device),
        ("repeats", repeats),
        ("threads", threads),
        ("autocast", autocast),
    )
    for option, value in options:
        if value is not None and not (option == "device" and value == "cpu"):
            words += [f"--{option}", str(value)]
    return shlex.join(words)


def default_output_dir(quick: bool) -> Path:
    """docs/ for a full run; a git-ignored folder for a quick one, whose numbers mean nothing."""
    return REPO / "runs" / "benchmark_quick" if quick else REPO / "docs"


def main(
    quick: bool = False,
    output_dir: str | None = None,
    device: str = "cpu",
    repeats: int | None = None,
    threads: int | None = None,
    autocast: str | None = None,
) -> str:
    """
    Run the benchmark and write ``benchmark.md`` and ``benchmark_latency.png`` (``benchmark_gpu.md`` and
    ``benchmark_gpu_latency.png`` on a GPU) into ``output_dir``.

    Args:
        quick: tiny sizes and one run per measurement (seconds), to check that everything runs.
        output_dir: where to write; by default the repository's docs/, and runs/benchmark_quick/ for ``quick`` (a
            smoke run must not replace the published results).
        device: ``"cpu"`` or ``"cuda"`` (adds mixed-precision training throughput on the GPU).
        repeats: timed runs per measurement after the warm-up (5 by default, 1 with ``quick``).
        threads: torch CPU threads (torch's default otherwise).
        autocast: ``"bfloat16"`` or ``"float16"``: the networks' latency, throughput and training step run in that
            ``torch.autocast`` (float32 otherwise); the page gets a ``_bf16`` or ``_fp16`` suffix.

    Returns:
        the target lines and the paths written.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu' or 'cuda', got {device!r}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False on this machine.")
    for option, value in (("repeats", repeats), ("threads", threads)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"--{option} must be a positive integer, got {value!r}.")
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"--autocast must be one of {list(AUTOCAST_DTYPES)}, got {autocast!r}.")
    _figure_class()  # fail before the measurements, not after them, when matplotlib is missing
    command = _command(quick, output_dir, device, repeats, threads, autocast)
    settings = QUICK if quick else FULL
    if repeats is not None:
        settings = replace(settings, repeats=repeats)
    if autocast is not None:
        settings = replace(settings, autocast=AUTOCAST_DTYPES[autocast][0])
    if threads is not None:
        torch.set_num_threads(threads)
    torch_device = torch.device(device)
    out = Path(output_dir) if output_dir is not None else default_output_dir(quick)
    out.mkdir(parents=True, exist_ok=True)

    networks = [benchmark_network(name, settings, torch_device) for name in NETWORKS]
    if torch_device.type == "cuda":
        memory_note = "torch.cuda.max_memory_allocated() during the pass minus the allocation before it."
    else:
        first = settings.sides[0]
        peaks = _cpu_peak_memory_in_child(NETWORKS, str(INFERENCE_CONFIG), first, settings.train_batch)
        if isinstance(peaks, str):
            memory_note = f"not measured: {peaks}."
        else:
            for result in networks:
                result.memory = peaks[result.name]
            memory_note = (
                "rise of the peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs) above the "
                "size before the pass, in one fresh process that builds the networks one after the other and "
                "returns freed memory to the system (glibc mallopt); inference after one warm-up pass, the training "
                "step as the first one (gradients and AdamW state included). Both are above the weights."
            )
    scans, scan_fit = benchmark_scan(settings.scan, settings.repeats, settings.budget_s, torch_device)
    report = Report(
        settings=settings,
        device=torch_device,
        machine=describe_machine(torch_device),
        command=command,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        quick=quick,
        networks=networks,
        memory_note=memory_note,
        scans=scans,
        scan_fit=scan_fit,
        scan_gradient_error=scan_gradient_error(settings.scan, torch_device),
        backend_agreement=check_scan_backends(settings, torch_device),
        gpu_name=torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else None,
    )
    markdown_path, plot_path = (out / name for name in output_names(torch_device, settings.autocast))
    markdown_path.write_text(render_markdown(report))
    plot_latency(report, plot_path)
    targets = [f"{'n/a' if p is None else 'PASS' if p else 'FAIL'}: {s}" for p, s in evaluate_targets(report)]
    if quick:
        targets.insert(0, "quick run: tiny sizes and single runs check that the benchmark runs; the targets below are")
        targets.insert(1, "for the full run and mean nothing here.")
    return "\n".join(targets + [f"wrote {markdown_path} and {plot_path}"])


if __name__ == "__main__":
    import fire

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        fire.Fire(main)
    except (ValueError, ImportError) as error:
        sys.exit(f"error: {error}")
