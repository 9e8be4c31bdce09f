"""
ONNX export: MONAI's ``onnx_export`` of the bundle's network run by onnxruntime, and the export path of the selective
scan that makes it possible (the eager scan's in-place chunk loop does not export faithfully).
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from bundle_test_utils import CONFIGS, REPO, TINY_NETWORK, inference_parser, randomise_parameters
from monai.bundle import onnx_export

from scripts.networks.parallel_scan import parallel_selective_scan
from scripts.networks.selective_scan import selective_scan
from scripts.networks.ss2d import SS2D

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the torch.export-based exporter, torch.onnx.export's default, translates with it

META_FILE = str(CONFIGS / "metadata.json")
INFERENCE_FILE = str(CONFIGS / "inference.json")
TOLERANCE = 1e-4


def _run_onnxruntime(path: str, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})


def _max_abs_diff(actual: np.ndarray, expected: torch.Tensor) -> float:
    assert actual.shape == tuple(expected.shape)
    return float(np.abs(actual - expected.numpy()).max())


def _scan_inputs(length: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of ``selective_scan`` with 4 groups, laid out time-major as SS2D passes them."""
    generator = torch.Generator().manual_seed(seed)
    batch, dim, d_state, groups = 2, 8, 4, 4

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return {
        "u": randn(length, batch, dim).permute(1, 2, 0),
        "delta": randn(length, batch, dim).permute(1, 2, 0),
        "A": -torch.exp(randn(dim, d_state)),
        "B": randn(length, batch, groups, d_state).permute(1, 2, 3, 0),
        "C": randn(length, batch, groups, d_state).permute(1, 2, 3, 0),
        "D": randn(dim),
        "delta_bias": randn(dim),
    }


@pytest.mark.parametrize(
    "length, chunk_size, softplus, optional",
    [
        (1, 1024, True, True),
        (5, 1024, False, True),
        (70, 1024, True, False),
        (70, 16, True, True),
        (70, 7, False, False),
    ],
)
def test_parallel_scan_matches_selective_scan(length, chunk_size, softplus, optional):
    """Any length, chunking, softplus or not, with or without D and delta_bias: the eager scan's result, in float64."""
    args = _scan_inputs(length, torch.float64)
    if not softplus:  # step sizes must stay positive without the softplus
        args["delta"] = args["delta"].abs()
        args["delta_bias"] = args["delta_bias"].abs()
    if not optional:
        args["D"] = args["delta_bias"] = None
    expected = selective_scan(**args, delta_softplus=softplus, backend="torch")
    actual = parallel_selective_scan(**args, delta_softplus=softplus, chunk_size=chunk_size)
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_parallel_scan_dtypes():
    """float32 arithmetic for 16- and 32-bit inputs with the dtype of u out; float64 as soon as any input is float64."""
    args = _scan_inputs(9, torch.float32)
    assert parallel_selective_scan(**{**args, "u": args["u"].half()}).dtype == torch.float16
    out = parallel_selective_scan(**{**args, "D": args["D"].double()})
    assert out.dtype == torch.float64
    expected = selective_scan(**{k: v.double() for k, v in args.items()}, backend="torch")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


class _Scan(torch.nn.Module):
    """``selective_scan`` with A, D and delta_bias as parameters, as SS2D calls it."""

    def __init__(self, args: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.A = torch.nn.Parameter(args["A"])
        self.D = torch.nn.Parameter(args["D"])
        self.delta_bias = torch.nn.Parameter(args["delta_bias"])

    def forward(self, u: torch.Tensor, delta: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return selective_scan(u, delta, self.A, b, c, self.D, self.delta_bias, True, "auto")


@pytest.mark.parametrize("dynamo", [True, False])
def test_selective_scan_exports_to_onnx(tmp_path, dynamo):
    """
    Both of torch's ONNX exporters reproduce the scan: while exporting, ``selective_scan`` takes the parallel scan,
    without which the TorchScript-based exporter (``dynamo=False``) records the output as a constant.
    """
    args = _scan_inputs(70, torch.float32)
    scan = _Scan(args).eval()
    inputs = (args["u"], args["delta"], args["B"], args["C"])
    with torch.no_grad():
        expected = scan(*inputs)
    path = str(tmp_path / "scan.onnx")
    torch.onnx.export(scan, inputs, path, dynamo=dynamo)
    assert _max_abs_diff(_run_onnxruntime(path, inputs)[0], expected) <= TOLERANCE
    # other inputs give other outputs: nothing was frozen into the graph at export time
    other = _scan_inputs(70, torch.float32, seed=1)
    other_inputs = (other["u"], other["delta"], other["B"], other["C"])
    with torch.no_grad():
        assert _max_abs_diff(_run_onnxruntime(path, other_inputs)[0], scan(*other_inputs)) <= TOLERANCE


@pytest.mark.parametrize("exporting", ["torch.onnx.is_in_onnx_export", "torch.compiler.is_exporting"])
def test_selective_scan_takes_parallel_scan_only_when_exporting(exporting):
    """The ONNX exporters and torch.export each switch to the parallel scan; eager calls never do."""
    args = _scan_inputs(70, torch.float32)
    with mock.patch("scripts.networks.selective_scan.parallel_selective_scan", wraps=parallel_selective_scan) as spy:
        eager = selective_scan(**args, backend="torch")
        spy.assert_not_called()
        with mock.patch(exporting, return_value=True):
            exported = selective_scan(**args, backend="torch")
        spy.assert_called_once()
    torch.testing.assert_close(exported, eager, rtol=1e-4, atol=1e-4)


def test_ss2d_with_random_parameters_exports_to_onnx(tmp_path):
    """SS2D (wavelet convolution, cross-scan, scan, cross-merge) with O(1) random parameters, so no branch is small."""
    ss2d = SS2D(8, d_state=4, wavelet_levels=2).eval()
    randomise_parameters(ss2d)
    x = torch.randn(1, 8, 12, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ss2d(x)
    path = str(tmp_path / "ss2d.onnx")
    torch.onnx.export(ss2d, (x,), path, dynamo=True)
    assert _max_abs_diff(_run_onnxruntime(path, (x,))[0], expected) <= TOLERANCE


def test_onnx_export_command_matches_eager(tmp_path):
    """
    ``python -m monai.bundle onnx_export network_def ...`` as docs/export.md gives it, on a tiny network from a
    checkpoint: the model takes the exported input shape and onnxruntime matches the eager network on a new input.
    """
    torch.manual_seed(0)
    network = inference_parser(**TINY_NETWORK).get_parsed_content("network_def").eval()
    ckpt_file = tmp_path / "model.pt"
    torch.save(network.state_dict(), ckpt_file)

    onnx_file = tmp_path / "model.onnx"
    onnx_export(
        net_id="network_def",
        filepath=str(onnx_file),
        ckpt_file=str(ckpt_file),
        meta_file=META_FILE,
        config_file=INFERENCE_FILE,
        input_shape=[1, 3, 64, 64],
        converter_kwargs={
            "verify": True,
            "use_ort": True,
            "rtol": 0.0,
            "atol": TOLERANCE,
            "input_names": ["image"],
            "output_names": ["pred"],
        },
        bundle_root=str(REPO),
        **TINY_NETWORK,
    )
    model = onnx.load(str(onnx_file))
    (graph_input,) = model.graph.input
    assert graph_input.name == "image" and [o.name for o in model.graph.output] == ["pred"]
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [1, 3, 64, 64]

    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = network(x)
    assert _max_abs_diff(_run_onnxruntime(str(onnx_file), (x,))[0], expected) <= TOLERANCE
