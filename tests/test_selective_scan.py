"""Tests of scripts.networks.selective_scan against a plain float64 sequential reference."""

import itertools
import logging
import sys
import types
from pathlib import Path
from typing import List, Optional

import pytest
import torch
from bundle_test_utils import requires_cpu_kernel
from torch import Tensor

import scripts.networks.selective_scan as selective_scan_module
from scripts.networks.selective_scan import selective_scan
from scripts.networks.selective_scan_reference import selective_scan_reference

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")


def reference_scan(
    u: Tensor,
    delta: Tensor,
    a: Tensor,
    b: Tensor,
    c: Tensor,
    d: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = True,
) -> Tensor:
    """The sequential reference in float64, differentiable by autograd: the ground truth of these tests."""
    as_float64 = [None if t is None else t.double() for t in (u, delta, a, b, c, d, delta_bias)]
    return selective_scan_reference(*as_float64, delta_softplus=delta_softplus)


def make_inputs(
    batch: int = 2,
    dim: int = 8,
    groups: int = 2,
    d_state: int = 4,
    length: int = 65,
    dtype: torch.dtype = torch.float64,
    with_d: bool = True,
    with_bias: bool = True,
    delta_max: Optional[float] = None,
    a_max: float = 4.0,
    seed: int = 0,
) -> List[Optional[Tensor]]:
    """Random inputs ``[u, delta, A, B, C, D, delta_bias]``; ``delta_max`` draws delta from U(0, delta_max)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    delta = randn(batch, dim, length) if delta_max is None else rand(batch, dim, length) * delta_max
    inputs = [
        randn(batch, dim, length),
        delta,
        -(rand(dim, d_state) * (a_max - 0.1) + 0.1),
        randn(batch, groups, d_state, length),
        randn(batch, groups, d_state, length),
        randn(dim) if with_d else None,
        randn(dim) * 0.5 if with_bias else None,
    ]
    return [t.to(dtype).requires_grad_() if t is not None else None for t in inputs]


def grads_of(y: Tensor, inputs: List[Optional[Tensor]], grad_y: Tensor) -> List[Optional[Tensor]]:
    present = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, present, grad_y, allow_unused=True))
    return [next(grads) if t is not None and t.requires_grad else None for t in inputs]


def rel_err(x: Tensor, ref: Tensor) -> float:
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


def check_against_reference(inputs: List[Optional[Tensor]], delta_softplus: bool = True, tol: float = 1e-10) -> None:
    y = selective_scan(*inputs, delta_softplus=delta_softplus, backend="torch")
    y_ref = reference_scan(*inputs, delta_softplus=delta_softplus)
    assert y.shape == y_ref.shape
    assert torch.isfinite(y).all()
    # Tolerances relative to the largest magnitude: elements near zero are sums of much larger terms.
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    grad_y = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = grads_of(y, inputs, grad_y.to(y.dtype))
    grads_ref = grads_of(y_ref, inputs, grad_y)
    for name, g, g_ref in zip(ARG_NAMES, grads, grads_ref):
        if g_ref is None:
            assert g is None, name
            continue
        assert g is not None, name
        assert torch.isfinite(g).all(), name
        atol = tol * g_ref.abs().max().item()
        torch.testing.assert_close(g.double(), g_ref, rtol=tol, atol=atol, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("length", [1, 7, 64, 65, 130])
@pytest.mark.parametrize("d_state,groups", [(1, 1), (4, 2), (16, 4)])
def test_matches_reference_over_lengths_and_groups(length: int, d_state: int, groups: int) -> None:
    check_against_reference(make_inputs(d_state=d_state, groups=groups, length=length, seed=length))


@pytest.mark.parametrize("length", [65, 130])
@pytest.mark.parametrize("with_d,with_bias,delta_softplus", list(itertools.product([True, False], repeat=3)))
def test_matches_reference_with_optional_terms(
    length: int, with_d: bool, with_bias: bool, delta_softplus: bool
) -> None:
    # Without softplus the step sizes must stay positive, as they are in use.
    inputs = make_inputs(length=length, with_d=with_d, with_bias=with_bias, delta_max=None if delta_softplus else 2.0)
    if not delta_softplus and with_bias:
        inputs[6] = inputs[6].detach().abs().requires_grad_()
    check_against_reference(inputs, delta_softplus=delta_softplus)


@pytest.mark.parametrize("delta_softplus", [True, False])
@pytest.mark.parametrize("delta_max", [10.0, 60.0])
def test_large_step_sizes_stay_finite(delta_max: float, delta_softplus: bool) -> None:
    # dt * A down to -960: the decays underflow to exactly 0 (also in float64), which log-space scans turn into NaN.
    inputs = make_inputs(d_state=16, groups=4, length=130, delta_max=delta_max, a_max=16.0, with_bias=False)
    check_against_reference(inputs, delta_softplus=delta_softplus)
    inputs32 = [t.detach().float().requires_grad_() if t is not None else None for t in inputs]
    y32 = selective_scan(*inputs32, delta_softplus=delta_softplus, backend="torch")
    y32.sum().backward()
    assert torch.isfinite(y32).all()
    assert all(torch.isfinite(t.grad).all() for t in inputs32 if t is not None)


def test_float32_close_to_float64_reference() -> None:
    inputs = make_inputs(dim=16, groups=4, d_state=16, length=300, seed=3)
    inputs32 = [t.detach().float().requires_grad_() if t is not None else None for t in inputs]
    y_ref = reference_scan(*inputs)
    y32 = selective_scan(*inputs32, backend="torch")
    assert y32.dtype == torch.float32
    assert rel_err(y32, y_ref) < 1e-5
    grad_y = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for name, g, g_ref in zip(ARG_NAMES, grads_of(y32, inputs32, grad_y.float()), grads_of(y_ref, inputs, grad_y)):
        assert g is not None and g.dtype == torch.float32, name
        assert rel_err(g, g_ref) < 1e-5, name


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu_kernel", marks=requires_cpu_kernel)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_accumulate_in_float32(dtype: torch.dtype, backend: str) -> None:
    inputs = make_inputs(length=70, dtype=dtype)
    y = selective_scan(*inputs, backend=backend)
    assert y.dtype == dtype
    y_ref = reference_scan(*inputs)
    # Only the final rounding to 16 bits separates the result from the float64 reference of the same inputs.
    torch.testing.assert_close(y.double(), y_ref.to(dtype).double(), rtol=0, atol=y_ref.abs().max().item() * 1e-2)
    y.sum().backward()
    for name, t in zip(ARG_NAMES, inputs):
        assert t is not None and t.grad is not None and t.grad.dtype == dtype, name


def test_gradcheck() -> None:
    inputs = make_inputs(batch=2, dim=4, groups=2, d_state=2, length=6)
    assert torch.autograd.gradcheck(lambda *args: selective_scan(*args, backend="torch"), inputs)


def test_gradcheck_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunks of 3 steps: checkpoints, the carried adjoint and a partial last chunk, at a size gradcheck can afford.
    monkeypatch.setattr(selective_scan_module, "_chunk_size", lambda step_elements: 3)
    inputs = make_inputs(batch=1, dim=4, groups=2, d_state=3, length=8)
    assert torch.autograd.gradcheck(lambda *args: selective_scan(*args, backend="torch"), inputs)
    check_against_reference(make_inputs(length=20))


def test_only_requested_gradients_are_computed() -> None:
    inputs = make_inputs()
    inputs = [t.detach() if t is not None else None for t in inputs]
    inputs[0].requires_grad_()
    inputs[2].requires_grad_()
    y = selective_scan(*inputs, backend="torch")
    assert type(y.grad_fn).__name__ == "_SelectiveScanFunctionBackward"
    check_against_reference(inputs)


def test_non_contiguous_inputs() -> None:
    inputs = make_inputs(dim=8, groups=2, d_state=4, length=70)
    u, delta, a, b, c, d, delta_bias = (t.detach() for t in inputs)
    u_nc = u.transpose(0, 2).contiguous().transpose(0, 2)
    bc = torch.cat([b, c], dim=2)  # B and C as strided slices, as after a split of one projection
    y = selective_scan(u_nc, delta, a.t().contiguous().t(), bc[:, :, :4], bc[:, :, 4:], d, delta_bias)
    torch.testing.assert_close(y, reference_scan(u, delta, a, b, c, d, delta_bias), rtol=1e-10, atol=1e-10)


def time_major(t: Tensor) -> Tensor:
    """The same values with L outermost in memory, as SS2D hands its sequences to the scan."""
    return t.movedim(-1, 0).contiguous().movedim(0, -1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_time_major_inputs_are_read_in_place_and_give_the_same_result(dtype: torch.dtype) -> None:
    # 130 steps: two full chunks and a partial one, so the in-place reads and writes cross chunk boundaries.
    inputs = make_inputs(dim=8, groups=2, d_state=4, length=130, dtype=dtype)
    y = selective_scan(*inputs, backend="torch")
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=dtype)
    grads = grads_of(y, inputs, grad_y)

    sequences = [time_major(t.detach()).requires_grad_() for t in inputs[:2]]
    projections = [time_major(t.detach()).requires_grad_() for t in inputs[3:5]]
    inputs_tm = [sequences[0], sequences[1], inputs[2], projections[0], projections[1], inputs[5], inputs[6]]
    copies = [t.detach().clone() for t in inputs_tm]
    y_tm = selective_scan(*inputs_tm, backend="torch")
    assert y_tm.movedim(-1, 0).is_contiguous()
    torch.testing.assert_close(y_tm, y, rtol=0, atol=0)
    grad_y_tm = time_major(grad_y)
    for name, g, g_tm in zip(ARG_NAMES, grads, grads_of(y_tm, inputs_tm, grad_y_tm)):
        torch.testing.assert_close(g_tm, g, rtol=0, atol=0, msg=lambda m, n=name: f"grad of {n}: {m}")
    assert all(torch.equal(t.detach(), copy) for t, copy in zip(inputs_tm, copies)), "the scan wrote to its inputs"
    if dtype == torch.float64:
        check_against_reference(inputs_tm)


def test_permuted_views_match_reference_with_gradients() -> None:
    # Neither contiguous nor time-major: (batch, L, dim) and (batch, L, groups, N) memory seen through a permute.
    inputs = make_inputs(dim=8, groups=2, d_state=4, length=70)
    u, delta = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in inputs[:2])
    b, c = (t.detach().permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1).requires_grad_() for t in inputs[3:5])
    assert not any(t.is_contiguous() or t.movedim(-1, 0).is_contiguous() for t in (u, delta, b, c))
    check_against_reference([u, delta, inputs[2], b, c, inputs[5], inputs[6]])


def test_float32_error_at_length_1024() -> None:
    """The scan's float32 error against the float64 reference at the benchmark's L = 1024 (issue target 1e-5)."""
    inputs = make_inputs(batch=1, dim=8, groups=2, d_state=16, length=1024, delta_max=0.2, seed=5)
    inputs32 = [t.detach().float() if t is not None else None for t in inputs]
    assert rel_err(selective_scan(*inputs32, backend="torch"), reference_scan(*inputs)) < 1e-5


@pytest.mark.parametrize(
    "batch,dim,d_state,expected", [(1, 8, 4, 64), (1, 768, 16, 64), (1, 3072, 16, 21), (8, 6144, 16, 8)]
)
def test_chunk_size_keeps_chunk_buffers_near_a_million_elements(
    batch: int, dim: int, d_state: int, expected: int
) -> None:
    # VMAML-UNet's first and third stages at 256 x 256 (dim = 4 directions x d_inner) and a training batch of 8 at the
    # fourth: at most 64 steps, at least 8, and otherwise about 2^20 state elements per chunk buffer.
    assert selective_scan_module._chunk_size(batch * dim * d_state) == expected


# Wide enough (2 * 1024 * 16 state elements per step) that the chunks are 32 steps, not the 64 of small inputs.
WIDE = {"batch": 2, "dim": 1024, "groups": 4, "d_state": 16}


def float32_of(inputs: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    return [t.detach().float() if t is not None else None for t in inputs]


@pytest.mark.parametrize("length", [31, 32, 33, 97])
@pytest.mark.parametrize("with_d,with_bias,delta_softplus", list(itertools.product([True, False], repeat=3)))
def test_size_dependent_chunks_match_float64_reference_in_float32(
    length: int, with_d: bool, with_bias: bool, delta_softplus: bool
) -> None:
    inputs = make_inputs(
        **WIDE,
        length=length,
        with_d=with_d,
        with_bias=with_bias,
        delta_max=None if delta_softplus else 0.5,
        seed=length,
    )
    if not delta_softplus and with_bias:
        inputs[6] = inputs[6].detach().abs()
    y_ref = reference_scan(*inputs, delta_softplus=delta_softplus)
    inputs32 = float32_of(inputs)
    with torch.no_grad():
        y = selective_scan(*inputs32, delta_softplus=delta_softplus, backend="torch")
        y_tm = selective_scan(
            *(time_major(t) if t.dim() > 2 else t for t in inputs32[:5]),
            *inputs32[5:],
            delta_softplus=delta_softplus,
            backend="torch",
        )
    assert rel_err(y, y_ref) < 1e-5
    assert y_tm.movedim(-1, 0).is_contiguous()
    torch.testing.assert_close(y_tm, y, rtol=0, atol=0)


def test_size_dependent_chunks_in_forward_and_backward() -> None:
    # 97 steps in 32-step chunks: four checkpoints and a last chunk of one step; gradients checked across them.
    inputs = make_inputs(**WIDE, length=97, seed=7)
    _, checkpoints = selective_scan_module._scan_forward(
        *(t.detach() for t in inputs), True, torch.float64, torch.float64, True
    )
    assert checkpoints.shape[0] == 4
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    y32 = selective_scan(*inputs32, backend="torch")
    with torch.no_grad():
        assert torch.equal(selective_scan(*inputs32, backend="torch"), y32)
    y_ref = reference_scan(*inputs)
    assert rel_err(y32, y_ref) < 1e-5
    grad_y = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for name, g, g_ref in zip(ARG_NAMES, grads_of(y32, inputs32, grad_y.float()), grads_of(y_ref, inputs, grad_y)):
        assert g is not None, name
        assert rel_err(g, g_ref) < 1e-5, name


def test_empty_sequence() -> None:
    inputs = make_inputs(length=0)
    y = selective_scan(*inputs)
    assert y.shape == (2, 8, 0)
    y.sum().backward()
    assert torch.equal(inputs[2].grad, torch.zeros_like(inputs[2]))


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="one of 'auto', 'torch', 'cpu_kernel', 'mamba_ssm', got 'cuda'"):
        selective_scan(*make_inputs(length=3), backend="cuda")


def test_mamba_ssm_backend_needs_cuda_tensors() -> None:
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        selective_scan(*make_inputs(length=3, dtype=torch.float32), backend="mamba_ssm")


def test_mamba_ssm_import_failure_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # None entries in sys.modules make the import raise ImportError, as on a machine without the package.
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.selective_scan_interface"):
        monkeypatch.setitem(sys.modules, name, None)
    loader = selective_scan_module._load_mamba_selective_scan
    loader.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=selective_scan_module.__name__):
            fn, err = loader()
            assert loader() == (fn, err)
        assert fn is None and isinstance(err, ImportError)
        warnings = [r for r in caplog.records if "mamba_ssm is unavailable" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        loader.cache_clear()


def _fake_mamba_interface(selective_scan_fn: object) -> types.ModuleType:
    module = types.ModuleType("mamba_ssm.ops.selective_scan_interface")
    module.selective_scan_fn = selective_scan_fn  # type: ignore[attr-defined]
    return module


def test_mamba_ssm_without_its_cuda_extension_is_unavailable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A default mamba-ssm install since state-spaces/mamba#977: the Python module imports, selective_scan_cuda does not.
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.selective_scan_interface", _fake_mamba_interface(object()))
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", None)
    loader = selective_scan_module._load_mamba_selective_scan
    loader.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=selective_scan_module.__name__):
            fn, err = loader()
        assert fn is None and isinstance(err, ImportError)
        assert any("MAMBA_KEEP_CUDA_BUILD=TRUE" in r.getMessage() for r in caplog.records)
        monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        loader.cache_clear()
        fn, err = loader()
        assert fn is sys.modules["mamba_ssm.ops.selective_scan_interface"].selective_scan_fn and err is None
    finally:
        loader.cache_clear()


def _kernel_contract_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):  # noqa: N803
    """mamba-ssm's dtype checks (selective_scan_cuda.fwd, csrc/selective_scan/selective_scan.cpp), then our scan."""
    assert u.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert delta.dtype == B.dtype == C.dtype == u.dtype
    assert A.dtype == torch.float32
    assert D is None or D.dtype == torch.float32
    assert delta_bias is None or delta_bias.dtype == torch.float32
    assert z is None
    return selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, backend="torch")


@pytest.mark.parametrize(
    "dtypes",
    [
        # SS2D under float16 autocast: WTConv's output (scaled by a float32 parameter) is float32, projections half
        {"u": torch.float32, "delta": torch.float16, "B": torch.float16, "C": torch.float16},
        {"u": torch.bfloat16, "delta": torch.bfloat16, "B": torch.bfloat16, "C": torch.bfloat16},
        {"u": torch.float16, "A": torch.float16, "D": torch.float16, "delta_bias": torch.float16},
    ],
)
def test_mamba_ssm_call_meets_the_kernel_dtype_contract(dtypes: dict) -> None:
    inputs = [t.float() for t in make_inputs(length=12)]
    inputs = [t.to(dtypes.get(name, torch.float32)) for name, t in zip(ARG_NAMES, inputs)]
    y = selective_scan_module._mamba_ssm_scan(_kernel_contract_scan, *inputs, True)
    assert y.dtype == inputs[0].dtype
    widest = [t.float() for t in inputs]
    torch.testing.assert_close(y.float(), selective_scan(*widest, backend="torch"), rtol=1e-2, atol=1e-2)


def test_mamba_ssm_backend_refuses_float64() -> None:
    with pytest.raises(ValueError, match="no float64 kernel"):
        selective_scan(*make_inputs(length=3), backend="mamba_ssm")


def test_auto_on_cpu_does_not_import_mamba_ssm() -> None:
    loader = selective_scan_module._load_mamba_selective_scan
    loader.cache_clear()
    selective_scan(*make_inputs(length=3), backend="auto")
    assert loader.cache_info().currsize == 0


BAD_SHAPES = {
    "u": ((2, 8), r"u must have shape \(batch, dim, L\)"),
    "delta": ((2, 8, 6), "delta must have the shape of u"),
    "A": ((7, 4), r"A must have shape \(dim=8, N\)"),
    "B": ((2, 2, 4, 6), r"B must have shape \(batch=2, groups, N=4, L=5\)"),
    "C": ((2, 2, 3, 5), "C must have the shape of B"),
    "D": ((7,), r"D must have shape \(dim=8,\)"),
    "delta_bias": ((8, 1), r"delta_bias must have shape \(dim=8,\)"),
}


@pytest.mark.parametrize("name", list(BAD_SHAPES))
def test_shape_validation(name: str) -> None:
    inputs = [t.detach() for t in make_inputs(length=5)]
    shape, message = BAD_SHAPES[name]
    inputs[ARG_NAMES.index(name)] = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        selective_scan(*inputs)


def test_groups_must_divide_dim() -> None:
    inputs = [t.detach() for t in make_inputs(dim=6, groups=2, length=5)]
    inputs[3] = inputs[4] = torch.zeros(2, 4, 4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"groups of B and C \(4\) must divide dim=6"):
        selective_scan(*inputs)


def test_integer_inputs_are_rejected() -> None:
    inputs = [t.detach() for t in make_inputs(length=5)]
    inputs[0] = inputs[0].long()
    with pytest.raises(ValueError, match="real floating-point"):
        selective_scan(*inputs)


class _ScanModule(torch.nn.Module):
    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    def forward(
        self,
        u: Tensor,
        delta: Tensor,
        a: Tensor,
        b: Tensor,
        c: Tensor,
        d: Optional[Tensor],
        delta_bias: Optional[Tensor],
    ) -> Tensor:
        return selective_scan(u, delta, a, b, c, d, delta_bias, True, self.backend)


# torch.jit is deprecated upstream but is what MONAI's ckpt_export uses, so the export path is tested as it is.
@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")
@pytest.mark.parametrize("with_optional", [True, False])
def test_torchscript(with_optional: bool, tmp_path: Path) -> None:
    module = _ScanModule()
    scripted = torch.jit.script(module)
    inputs = [t.detach() if t is not None else None for t in make_inputs(dtype=torch.float32, length=70)]
    if not with_optional:
        inputs[5] = inputs[6] = None
    # Eager runs the CPU kernel where it builds, TorchScript the PyTorch backend: equal within float32 rounding.
    scripted_output = scripted(*inputs)
    torch.testing.assert_close(scripted_output, module(*inputs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scripted_output, selective_scan(*inputs, backend="torch"), rtol=0, atol=0)
    path = tmp_path / "scan.pt"
    torch.jit.save(scripted, str(path))
    torch.testing.assert_close(torch.jit.load(str(path))(*inputs), scripted_output, rtol=0, atol=0)
    with pytest.raises(torch.jit.Error, match="delta_bias must have shape"):
        scripted(*inputs[:5], None, torch.zeros(3))  # validation also runs under TorchScript
    with pytest.raises(torch.jit.Error, match="not available under TorchScript"):
        torch.jit.script(_ScanModule("mamba_ssm"))(*inputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mamba_ssm_agrees_with_torch_backend_on_gpu() -> None:
    if selective_scan_module._load_mamba_selective_scan()[0] is None:
        pytest.skip("mamba_ssm does not import")
    cuda = torch.device("cuda")
    inputs = [t.to(cuda) if t is not None else None for t in make_inputs(d_state=16, groups=4, length=300)]
    inputs = [t.detach().float().requires_grad_() if t is not None else None for t in inputs]
    y_kernel = selective_scan(*inputs, backend="mamba_ssm")
    y_torch = selective_scan(*inputs, backend="torch")
    assert rel_err(y_kernel, y_torch.double()) < 1e-4
    grad_y = torch.randn_like(y_torch)
    for name, g_kernel, g_torch in zip(
        ARG_NAMES, grads_of(y_kernel, inputs, grad_y), grads_of(y_torch, inputs, grad_y)
    ):
        assert rel_err(g_kernel, g_torch.double()) < 1e-3, name


def check_kernel_against_reference(inputs: List[Optional[Tensor]], delta_softplus: bool = True) -> None:
    """float32 kernel forward, and the backward from its checkpoints, within 1e-5 of the float64 reference."""
    inputs32 = [t.detach().float().requires_grad_() if t is not None else None for t in inputs]
    y = selective_scan(*inputs32, delta_softplus=delta_softplus, backend="cpu_kernel")
    y_ref = reference_scan(*inputs, delta_softplus=delta_softplus)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < 1e-5
    grad_y = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for name, g, g_ref in zip(ARG_NAMES, grads_of(y, inputs32, grad_y.float()), grads_of(y_ref, inputs, grad_y)):
        if g_ref is None:
            assert g is None, name
            continue
        assert g is not None and rel_err(g, g_ref) < 1e-5, name


@requires_cpu_kernel
@pytest.mark.parametrize(
    "batch,dim,groups,d_state,length",
    # dim / groups of 16 (whole vectors of 8 or 16 lanes), 21 (vectors and five single channels) and 3 (single
    # channels only); lengths that end inside a chunk; N = 1 and the network's 16.
    [(2, 32, 2, 4, 130), (1, 42, 2, 16, 65), (3, 3, 1, 1, 7), (1, 64, 4, 16, 300)],
)
def test_cpu_kernel_matches_reference(batch: int, dim: int, groups: int, d_state: int, length: int) -> None:
    check_kernel_against_reference(
        make_inputs(batch=batch, dim=dim, groups=groups, d_state=d_state, length=length, seed=dim)
    )


@requires_cpu_kernel
@pytest.mark.parametrize("with_d,with_bias,delta_softplus", list(itertools.product([True, False], repeat=3)))
def test_cpu_kernel_optional_terms(with_d: bool, with_bias: bool, delta_softplus: bool) -> None:
    inputs = make_inputs(length=70, with_d=with_d, with_bias=with_bias, delta_max=None if delta_softplus else 2.0)
    if not delta_softplus and with_bias:
        inputs[6] = inputs[6].detach().abs().requires_grad_()
    check_kernel_against_reference(inputs, delta_softplus=delta_softplus)


@requires_cpu_kernel
def test_cpu_kernel_softplus_over_its_whole_range() -> None:
    """The kernel's own softplus (exp2, log and log1p approximations) on step sizes from e^-30 to 60, across the
    threshold of 20 where softplus returns its input, and with decays that underflow."""
    inputs = make_inputs(dim=16, groups=2, d_state=16, length=200, a_max=16.0, with_bias=False, seed=7)
    with torch.no_grad():
        inputs[1].copy_(torch.linspace(-30.0, 60.0, 16 * 200, dtype=torch.float64).view(1, 16, 200).expand(2, -1, -1))
    y = selective_scan(*(t.detach().float() if t is not None else None for t in inputs), backend="cpu_kernel")
    assert rel_err(y, reference_scan(*inputs)) < 1e-5


@requires_cpu_kernel
def test_cpu_kernel_long_memory_at_length_4096() -> None:
    """Decays close to 1 over 4096 steps (stage 1 of a 256 x 256 input): a biased exp would compound here."""
    inputs = make_inputs(batch=1, dim=16, groups=2, d_state=16, length=4096, a_max=0.5, seed=8)
    with torch.no_grad():
        inputs[1].copy_(inputs[1] - 6.0)  # step sizes near e^-6, so dt * A is about -1e-3
    assert (
        rel_err(selective_scan(*(t.detach().float() for t in inputs), backend="cpu_kernel"), reference_scan(*inputs))
        < 1e-5
    )


@requires_cpu_kernel
def test_cpu_kernel_writes_the_checkpoints_of_the_pytorch_forward() -> None:
    inputs = [t.detach().float() for t in make_inputs(dim=16, groups=2, d_state=4, length=150)]
    chunk = selective_scan_module._chunk_size(2 * 16 * 4)
    out_kernel, checkpoints_kernel = selective_scan_module._kernel_forward(*inputs, True, True)
    out_torch, checkpoints_torch = selective_scan_module._scan_forward(
        *inputs, True, torch.float32, torch.float32, True
    )
    assert checkpoints_kernel.shape == checkpoints_torch.shape == (-(-150 // chunk), 2, 2, 4, 8)
    torch.testing.assert_close(checkpoints_kernel, checkpoints_torch, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_kernel, out_torch, rtol=1e-5, atol=1e-5)


@requires_cpu_kernel
@pytest.mark.parametrize("layout", ["contiguous", "time_major", "permuted"])
def test_cpu_kernel_reads_any_layout(layout: str) -> None:
    inputs = [t.detach().float() for t in make_inputs(dim=16, groups=2, d_state=4, length=70)]
    u, delta, a, b, c, d, delta_bias = inputs
    if layout == "time_major":
        u, delta, b, c = (time_major(t) for t in (u, delta, b, c))
    elif layout == "permuted":
        u, delta = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (u, delta))
        b, c = (t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1) for t in (b, c))
    leaves = [t.requires_grad_() for t in (u, delta, a, b, c, d, delta_bias)]
    y = selective_scan(*leaves, backend="cpu_kernel")
    assert y.movedim(-1, 0).is_contiguous()
    inputs = [t.detach().requires_grad_() for t in inputs]
    y_torch = selective_scan(*inputs, backend="torch")
    torch.testing.assert_close(y, y_torch, rtol=1e-5, atol=1e-5)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    for name, g, g_torch in zip(ARG_NAMES, grads_of(y, leaves, grad_y), grads_of(y_torch, inputs, grad_y)):
        assert g.shape == g_torch.shape, name
        torch.testing.assert_close(g, g_torch, rtol=1e-4, atol=1e-4 * g_torch.abs().max().item(), msg=name)


@requires_cpu_kernel
def test_cpu_kernel_only_requested_gradients_and_empty_sequences() -> None:
    inputs = [t.detach().float() if t is not None else None for t in make_inputs(length=70)]
    inputs[1].requires_grad_()
    inputs[4].requires_grad_()
    y = selective_scan(*inputs, backend="cpu_kernel")
    y.sum().backward()
    assert [t.grad is not None for t in inputs] == [False, True, False, False, True, False, False]
    empty = [t.detach().float().requires_grad_() for t in make_inputs(length=0)]
    y = selective_scan(*empty, backend="cpu_kernel")
    assert y.shape == (2, 8, 0)
    y.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in empty)


@requires_cpu_kernel
def test_cpu_kernel_propagates_nan() -> None:
    inputs = [t.detach().float() for t in make_inputs(dim=16, groups=2, d_state=4, length=20)]
    inputs[0][0, 3, 5] = float("nan")
    y = selective_scan(*inputs, backend="cpu_kernel")
    assert torch.isnan(y[0, 3, 5:]).all() and torch.isfinite(y[0, 3, :5]).all() and torch.isfinite(y[1]).all()


@requires_cpu_kernel
def test_cpu_kernel_uses_every_thread_count_alike() -> None:
    inputs = [t.detach().float() for t in make_inputs(batch=2, dim=40, groups=4, d_state=4, length=90)]
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(selective_scan(*inputs, backend="cpu_kernel"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_auto_uses_the_cpu_kernel_where_it_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(selective_scan_module, "_kernel_forward", lambda *args: calls.append(args) or (None, None))
    monkeypatch.setattr(selective_scan_module, "load_cpu_scan_kernel", lambda: (object(), None))
    selective_scan(*[t.detach().float() for t in make_inputs(length=5)], backend="auto")
    assert len(calls) == 1
    calls.clear()
    selective_scan(*[t.detach() for t in make_inputs(length=5)], backend="auto")  # float64: the PyTorch backend
    assert not calls


def test_auto_falls_back_to_pytorch_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selective_scan_module, "load_cpu_scan_kernel", lambda: (None, RuntimeError("no compiler")))
    inputs = [t.detach().float() for t in make_inputs(length=70)]
    torch.testing.assert_close(selective_scan(*inputs, backend="auto"), selective_scan(*inputs, backend="torch"))
    with pytest.raises(RuntimeError, match="kernel is unavailable: no compiler"):
        selective_scan(*inputs, backend="cpu_kernel")


@pytest.mark.parametrize(
    "dtype,d_state,message", [(torch.float64, 4, "needs float32 or 16-bit"), (torch.float32, 65, "N <= 64")]
)
def test_cpu_kernel_backend_refuses_what_it_cannot_run(dtype: torch.dtype, d_state: int, message: str) -> None:
    inputs = [t.detach().to(dtype) for t in make_inputs(d_state=d_state, length=5)]
    with pytest.raises(ValueError, match=message):
        selective_scan(*inputs, backend="cpu_kernel")
    torch.testing.assert_close(selective_scan(*inputs, backend="auto"), selective_scan(*inputs, backend="torch"))
