"""Tests of the benchmark command (scripts.benchmark) and the sequential selective-scan reference."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from bundle_test_utils import REPO
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from scripts import benchmark
from scripts.backend_agreement import BackendAgreement, relative_error
from scripts.benchmark import NETWORKS, NetworkResult, Report, ScanResult, Timing
from scripts.networks.selective_scan import selective_scan
from scripts.networks.selective_scan_cpu import load_cpu_scan_kernel
from scripts.networks.selective_scan_reference import selective_scan_reference
from scripts.networks.ss2d import SS2D

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MARKDOWN_NAME, PLOT_NAME = benchmark.output_names(torch.device("cpu"))


def table_rows(markdown: str, first_header_cell: str, second_header_cell: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the Markdown table whose header starts with the two given cells."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header_cell} | {second_header_cell}"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return header, rows


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """One quick benchmark run: its output folder, Markdown and returned summary."""
    pytest.importorskip("matplotlib")
    output_dir = tmp_path_factory.mktemp("benchmark")
    threads = torch.get_num_threads()
    try:
        # one thread: the quick run must not depend on how busy the machine's other cores are
        summary = benchmark.main(quick=True, output_dir=str(output_dir), threads=1)
    finally:
        torch.set_num_threads(threads)
    return output_dir, (output_dir / MARKDOWN_NAME).read_text(), summary


def test_quick_run_states_machine_command_and_targets(quick_run: tuple[Path, str, str]) -> None:
    output_dir, markdown, summary = quick_run
    machine = next(line for line in markdown.splitlines() if line.startswith("- Machine: "))
    assert "logical cores" in machine and "1 torch threads" in machine and f"torch {torch.__version__}" in machine
    assert f"- Command: `python -m scripts.benchmark --quick --output_dir {output_dir} --threads 1`" in markdown
    assert "- Precision: float32\n" in markdown
    targets = re.findall(r"^- (PASS|FAIL): (.*)$", markdown, flags=re.MULTILINE)
    assert len(targets) == 5
    assert "speed-up over the sequential reference at L=64" in targets[0][1]
    assert "scaling exponent" in targets[4][1]
    # the run's real error is far below the target whatever the machine
    assert targets[1][0] == "PASS"
    assert summary.count("PASS") + summary.count("FAIL") == 5 and str(output_dir) in summary


def test_a_quick_run_does_not_replace_the_published_results(quick_run: tuple[Path, str, str]) -> None:
    _, _, summary = quick_run
    assert summary.startswith("quick run:") and "mean nothing here" in summary
    assert benchmark.default_output_dir(quick=False) == REPO / "docs"
    assert benchmark.default_output_dir(quick=True) == REPO / "runs" / "benchmark_quick"
    assert "runs/" in (REPO / ".gitignore").read_text().splitlines(), "the quick run's folder must be git-ignored"


def test_quick_run_has_a_row_per_network_in_each_table(quick_run: tuple[Path, str, str]) -> None:
    _, markdown, _ = quick_run
    expected_headers = {
        ("Network", "64 px"): ["64 px", "96 px", "64 px (ms)", "96 px (ms)", "Scaling exponent 64-96"],
        ("Network", "Parameters (M)"): [
            "Parameters (M)",
            "GMACs (counted)",
            "GMACs (scan recurrence)",
            "Training step, batch 2 (ms)",
            "Training step / SwinUNETR",
            "Peak memory, inference (MB)",
            "Peak memory, training step (MB)",
        ],
    }
    for (first, second), columns in expected_headers.items():
        header, rows = table_rows(markdown, first, second)
        assert header[1:] == columns
        assert [row[0] for row in rows] == list(NETWORKS)
        assert all(len(row) == len(header) for row in rows)
    _, rows = table_rows(markdown, "Network", "64 px")
    swin = rows[NETWORKS.index("SwinUNETR")]
    assert swin[1:3] == ["1.00x", "1.00x"]
    _, rows = table_rows(markdown, "L", "Forward")
    assert [row[0] for row in rows] == ["64", "128"]
    assert "(extrapolated)" in rows[1][5] and "(extrapolated)" not in rows[0][5]


def test_quick_run_counts_parameters_macs_and_training_memory(quick_run: tuple[Path, str, str]) -> None:
    _, markdown, _ = quick_run
    _, rows = table_rows(markdown, "Network", "Parameters (M)")
    by_name = {row[0]: row for row in rows}
    assert by_name["VM-UNet"][1] == f"{27_427_561 / 1e6:.2f}"
    assert float(by_name["VMAML-UNet"][3]) > 0 and float(by_name["SwinUNETR"][3]) == 0
    vmaml_train_mb = by_name["VMAML-UNet"][7].replace(",", "")
    if vmaml_train_mb == "n/a":
        pytest.skip("peak memory is not measured on this system")
    # a first AdamW step holds gradients and two moments: at least three float32 copies of the parameters
    parameters = sum(p.numel() for p in benchmark.build_network("VMAML-UNet").parameters())
    assert float(vmaml_train_mb) >= 0.95 * 3 * 4 * parameters / 2**20


def test_quick_run_writes_a_png(quick_run: tuple[Path, str, str]) -> None:
    output_dir, markdown, _ = quick_run
    path = output_dir / PLOT_NAME
    assert path.read_bytes()[: len(PNG_SIGNATURE)] == PNG_SIGNATURE
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    assert f"]({PLOT_NAME})" in markdown


def test_quick_run_times_the_torchscript_network(quick_run: tuple[Path, str, str]) -> None:
    _, markdown, _ = quick_run
    match = re.search(
        r"^VMAML-UNet scripted with torch.jit.script, .*: ([\d.,]+) ms at 64x64, ([\d.]+)x the eager", markdown, re.M
    )
    assert match is not None
    assert float(match.group(1).replace(",", "")) > 0 and float(match.group(2)) > 0


def test_quick_run_checks_the_cpu_kernel_against_the_pytorch_scan_on_the_network(
    quick_run: tuple[Path, str, str],
) -> None:
    _, markdown, _ = quick_run
    lines = markdown.splitlines()
    line = lines[lines.index("## Scan backends on the full network") + 4]
    if load_cpu_scan_kernel()[0] is None:
        assert line == "- cpu_kernel not checked: the C++ kernel did not build"
        return
    assert line.startswith("- cpu_kernel vs torch: inference output ") and line.endswith(": agree")


def test_power_law_exponent_recovers_known_exponents() -> None:
    sides = [256, 512, 1024]
    for exponent in (0.5, 1.0, 1.07, 2.0):
        latencies = [3e-9 * (side * side) ** exponent for side in sides]
        assert benchmark.power_law_exponent([s * s for s in sides], latencies) == pytest.approx(exponent, rel=1e-9)
        result = NetworkResult("net", 1, 1, 0, latency={s: Timing(t, 1) for s, t in zip(sides, latencies)})
        assert benchmark.scaling_exponent(result) == pytest.approx(exponent, rel=1e-9)


def test_macs_of_a_convolution_are_analytic() -> None:
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    counted, scan = benchmark.count_macs(conv, torch.zeros(2, 3, 16, 20))
    assert counted == 2 * 8 * 3 * 3 * 3 * 16 * 20
    assert scan == 0


def test_macs_add_the_scan_recurrence_of_each_ss2d_call() -> None:
    ss2d = SS2D(dim=8, d_state=4, wavelet_fusion="none")
    counted, scan = benchmark.count_macs(ss2d, torch.zeros(2, 5, 6, 8))
    channels = 4 * 2 * 8  # four directions of d_inner = expand * dim
    assert scan == benchmark.SCAN_ELEMENTWISE_MACS * 2 * channels * 5 * 6 * 4
    assert counted > 0


def test_flop_counter_sees_only_the_output_contraction_of_the_scan() -> None:
    # What SCAN_ELEMENTWISE_MACS leaves to the counter: one MAC per (batch, channel, step, state) for <C_t, h_t>.
    inputs = benchmark.make_scan_inputs(2, 8, 2, 4, 70)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        selective_scan(*inputs, backend="torch")
    assert counter.get_total_flops() // 2 == 2 * 8 * 70 * 4


def test_vm_unet_is_vmaml_unet_with_every_addition_off() -> None:
    vmaml, vm = benchmark.build_network("VMAML-UNet"), benchmark.build_network("VM-UNet")
    assert sum(p.numel() for p in vm.parameters()) == 27_427_561
    assert vm.wcaa is None and vm.side_heads is None
    assert vmaml.wcaa is not None and vmaml.side_heads is not None
    with pytest.raises(ValueError, match="unknown network 'VMUNet'"):
        benchmark.build_network("VMUNet")


def test_measure_takes_the_median_after_a_warm_up() -> None:
    durations = iter([10.0, 1.0, 3.0, 2.0])
    now = [0.0]
    timing = benchmark.measure(
        lambda: now.__setitem__(0, now[0] + next(durations)), repeats=3, budget_s=100.0, clock=lambda: now[0]
    )
    assert timing == Timing(2.0, 3, warmed_up=True)


def test_measure_stops_at_the_budget() -> None:
    now = [0.0]

    def run(durations: list[float], repeats: int, budget_s: float) -> Timing:
        queue = iter(durations)
        return benchmark.measure(
            lambda: now.__setitem__(0, now[0] + next(queue)), repeats, budget_s, clock=lambda: now[0]
        )

    assert run([1.0, 5.0, 6.0], repeats=5, budget_s=4.0) == Timing(5.0, 1)
    assert run([1.0, 1.0, 1.0, 9.0], repeats=5, budget_s=3.0) == Timing(1.0, 2)
    # a warm-up as long as the budget is the measurement itself
    assert run([7.0], repeats=5, budget_s=4.0) == Timing(7.0, 1, warmed_up=False)


def test_peak_rss_increase_sees_a_large_allocation() -> None:
    try:
        benchmark.peak_rss_increase(lambda: None)
    except OSError as error:
        pytest.skip(f"no resettable peak resident set size here: {error}")
    # In a fresh process, as the benchmark measures: this one's allocator may serve the block from memory that
    # earlier tests freed and that is still resident.
    size = 64 * 2**20
    measure = (
        "import torch; from scripts import benchmark; "
        f"print(benchmark.peak_rss_increase(lambda: torch.ones({size // 4})))"
    )
    result = subprocess.run([sys.executable, "-c", measure], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 0.95 * size <= int(result.stdout.split()[-1]) <= size + 32 * 2**20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_optional", [True, False])
@pytest.mark.parametrize("delta_softplus", [True, False])
def test_reference_equals_selective_scan(dtype: torch.dtype, with_optional: bool, delta_softplus: bool) -> None:
    inputs: list[Tensor | None] = [t.to(dtype) for t in benchmark.make_scan_inputs(2, 8, 2, 4, 70, seed=3)]
    inputs[2] = inputs[2] * torch.linspace(0.5, 2.0, 8, dtype=dtype)[:, None]  # channels with different decays
    if not with_optional:
        inputs[5] = inputs[6] = None
    if not delta_softplus:
        # step sizes must stay positive without softplus: |delta| and the bias's own softplus, 0.001 to 0.1
        inputs[1] = inputs[1].abs()
        inputs[6] = None if inputs[6] is None else torch.nn.functional.softplus(inputs[6])
    leaves = [t.requires_grad_() if t is not None else None for t in inputs]
    present = [t for t in leaves if t is not None]
    y = selective_scan(*leaves, delta_softplus=delta_softplus, backend="torch")
    y_ref = selective_scan_reference(*leaves, delta_softplus=delta_softplus)
    assert y_ref.dtype == dtype and y_ref.shape == y.shape
    assert relative_error(y, y_ref) < 1e-5
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    grads = torch.autograd.grad(y, present, grad_y)
    grads_ref = torch.autograd.grad(y_ref, present, grad_y)
    for g, g_ref in zip(grads, grads_ref):
        assert relative_error(g, g_ref) < 1e-5


def test_reference_computes_in_float64_when_any_input_is() -> None:
    inputs = benchmark.make_scan_inputs(1, 4, 1, 2, 5)
    inputs[2] = inputs[2].double()
    assert selective_scan_reference(*inputs).dtype == torch.float64
    half = [t.half() for t in benchmark.make_scan_inputs(1, 4, 1, 2, 5)]
    assert selective_scan_reference(*half).dtype == torch.float16


def synthetic_report(gpu_name: str | None) -> Report:
    """A report with made-up timings whose ratios and targets are known."""
    settings = benchmark.QUICK
    small, large = settings.sides

    def network(name: str, latency_small: float, latency_large: float, gpu_step: float | None) -> NetworkResult:
        return NetworkResult(
            name,
            parameters=2_000_000,
            macs=3_000_000_000,
            scan_macs=0,
            latency={small: Timing(latency_small, 1), large: Timing(latency_large, 1)},
            throughput={small: Timing(4 * latency_small, 1), large: None},
            train_step=Timing(3 * latency_small, 1),
            memory=(2**20, 5 * 2**20),
            gpu_train_step=None if gpu_step is None else Timing(gpu_step, 3),
            skipped={f"throughput {large}": "skipped on the CPU, see Method"},
        )

    # VMAML-UNet: 1.6x SwinUNETR at the small side (FAIL), 0.9x at the large one (PASS)
    swin_large = 0.1 * (large / small) ** 2
    networks = [
        network("VMAML-UNet", 0.16, 0.9 * swin_large, 0.5),
        network("VM-UNet", 0.12, swin_large, 0.4),
        network("SwinUNETR", 0.1, swin_large, 0.25),
        network("UNet", 0.01, 0.02, None),
    ]
    scan = ScanResult(
        length=64,
        forward=Timing(0.001, 1),
        reference_forward=Timing(0.01, 1),
        forward_backward=Timing(0.002, 1),
        reference_forward_backward=Timing(0.2, 1),
        reference_forward_backward_s=0.2,
        forward_error=2e-7,
    )
    return Report(
        settings=settings,
        device=torch.device("cuda" if gpu_name else "cpu"),
        machine="test machine",
        command="python -m scripts.benchmark --quick",
        date="2026-01-01 00:00 UTC",
        quick=True,
        networks=networks,
        memory_note="made up.",
        scans=[scan],
        scan_fit=None,
        scan_gradient_error=3e-6,
        backend_agreement=(
            BackendAgreement("mamba_ssm", "torch", 2e-6, 3e-6, 4e-4, "encoder.0.0.ss2d.A_log")
            if gpu_name
            else "cpu_kernel not checked: the C++ kernel did not build"
        ),
        gpu_name=gpu_name,
    )


def test_targets_pass_and_fail_on_known_values() -> None:
    targets = benchmark.evaluate_targets(synthetic_report(None))
    assert [passed for passed, _ in targets] == [True, True, False, True, True]
    assert targets[0][1].endswith(": 100x (target >= 50x)")
    assert targets[1][1].endswith(": 3.0e-06 (target < 1.0e-05)")
    assert targets[2][1].endswith(": 1.60x (target <= 1.50x)")
    assert targets[3][1].endswith(": 0.90x (target <= 1.00x)")


def test_gpu_section_is_rendered_with_the_gpu_model() -> None:
    markdown = benchmark.render_markdown(synthetic_report("Fake GPU 80GB"))
    assert "## GPU: Fake GPU 80GB" in markdown
    header, rows = table_rows(markdown, "Network", "Training (images/s)")
    assert [row[0] for row in rows] == ["VMAML-UNet", "VM-UNet", "SwinUNETR"]
    batch = benchmark.QUICK.gpu_train_batch
    assert rows[0][1:3] == [f"{batch / 0.5:.3g}", "0.50x"]
    assert rows[2][2] == "1.00x"
    assert (
        "- mamba_ssm vs torch: inference output 2.0e-06, training output 3.0e-06 (tolerance 1e-04), largest gradient "
        "4.0e-04 in encoder.0.0.ss2d.A_log (tolerance 1e-03): agree\n" in markdown
    )
    assert "](benchmark_gpu_latency.png)" in markdown
    cpu_markdown = benchmark.render_markdown(synthetic_report(None))
    assert "## GPU" not in cpu_markdown and "](benchmark_latency.png)" in cpu_markdown
    assert "- cpu_kernel not checked: the C++ kernel did not build\n" in cpu_markdown


def test_output_names_keep_gpu_and_reduced_precision_runs_beside_the_cpu_page() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert benchmark.output_names(cpu) == ("benchmark.md", "benchmark_latency.png")
    assert benchmark.output_names(cpu, torch.bfloat16) == ("benchmark_bf16.md", "benchmark_bf16_latency.png")
    assert benchmark.output_names(cuda) == ("benchmark_gpu.md", "benchmark_gpu_latency.png")
    assert benchmark.output_names(cuda, torch.float16)[0] == "benchmark_gpu_fp16.md"


class _DtypeRecorder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        self.dtypes.append(y.dtype)
        return y


@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16])
def test_timed_passes_run_in_the_requested_autocast(autocast: torch.dtype | None) -> None:
    network = _DtypeRecorder()
    images = torch.randn(2, 1, 8, 8)
    benchmark._inference(network, images, autocast)()
    before = network.conv.weight.detach().clone()
    benchmark._training_step(network, images, out_channels=1, autocast=autocast)()
    assert network.dtypes == [autocast or torch.float32] * 2
    assert not torch.equal(network.conv.weight, before), "the step updated the weights"
    assert network.conv.weight.dtype == torch.float32


def test_reduced_precision_page_says_so() -> None:
    report = synthetic_report(None)
    report.settings = replace(report.settings, autocast=torch.bfloat16)
    markdown = benchmark.render_markdown(report)
    assert "- Precision: the networks' latency, throughput and training step in bfloat16 autocast" in markdown
    assert "](benchmark_bf16_latency.png)" in markdown


def test_main_rejects_bad_arguments_before_measuring() -> None:
    with pytest.raises(ValueError, match="--device must be 'cpu' or 'cuda', got 'tpu'"):
        benchmark.main(device="tpu")
    with pytest.raises(ValueError, match="--repeats must be a positive integer, got 0"):
        benchmark.main(repeats=0)
    with pytest.raises(ValueError, match="--autocast must be one of \\['bfloat16', 'float16'\\], got 'int8'"):
        benchmark.main(autocast="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch.cuda.is_available"):
            benchmark.main(device="cuda")
