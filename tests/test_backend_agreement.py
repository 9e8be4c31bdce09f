"""Tests of scripts.backend_agreement: two scan backends compared on the whole network, outputs and gradients."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from bundle_test_utils import REPO, requires_cpu_kernel

import scripts.networks.ss2d as ss2d_module
from scripts import backend_agreement
from scripts.backend_agreement import GRADIENT_TOLERANCE, OUTPUT_TOLERANCE, compare_scan_backends, relative_error
from scripts.networks.selective_scan import mamba_ssm_unavailable_reason, selective_scan
from scripts.networks.vmaml_unet import VMAMLUNet

TINY = dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1), d_state=4)


def tiny_network_and_images(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    return VMAMLUNet(in_channels=3, out_channels=2, **TINY), torch.randn(2, 3, 40, 48)


def test_relative_error() -> None:
    reference = torch.tensor([1.0, -4.0])
    assert relative_error(torch.tensor([1.0, -3.0]), reference) == pytest.approx(0.25)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert relative_error(torch.ones(2), torch.zeros(2)) == float("inf")


@requires_cpu_kernel
def test_cpu_kernel_and_pytorch_scan_agree_on_the_network() -> None:
    network, images = tiny_network_and_images()
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    agreement = compare_scan_backends(network, images, "cpu_kernel")
    assert agreement.agrees, agreement.summary()
    assert 0 < agreement.training_error and 0 < agreement.gradient_error, "two different scans, not one run twice"
    assert all(torch.equal(p, before[name]) for name, p in network.named_parameters()), "the network is not changed"
    assert all(m.scan_backend == "auto" for m in network.modules() if isinstance(m, ss2d_module.SS2D))


def test_a_wrong_forward_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def channels_mixed_by_a_percent(*args: object) -> torch.Tensor:
        y = selective_scan(*args)
        # a mix across channels: SS2D's LayerNorm after the scan would hide a plain rescaling
        return y + 0.01 * y.flip(1) if args[-1] == "auto" else y

    monkeypatch.setattr(ss2d_module, "selective_scan", channels_mixed_by_a_percent)
    network, images = tiny_network_and_images()
    agreement = compare_scan_backends(network, images, "auto")
    assert agreement.training_error > OUTPUT_TOLERANCE and not agreement.agrees
    assert "DISAGREE" in agreement.summary()


def test_a_wrong_gradient_is_reported_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def gradient_off_by_a_percent(*args: object) -> torch.Tensor:
        y = selective_scan(*args)
        # the same values, 1.01 times the gradient: only the backward pass is wrong
        return y.detach() + 1.01 * (y - y.detach()) if args[-1] == "auto" else y

    monkeypatch.setattr(ss2d_module, "selective_scan", gradient_off_by_a_percent)
    network, images = tiny_network_and_images()
    agreement = compare_scan_backends(network, images, "auto")
    assert max(agreement.inference_error, agreement.training_error) <= OUTPUT_TOLERANCE
    assert agreement.gradient_error > GRADIENT_TOLERANCE and not agreement.agrees
    assert agreement.worst_parameter in dict(network.named_parameters())


def test_unknown_backend_is_refused() -> None:
    network, images = tiny_network_and_images()
    with pytest.raises(ValueError, match="unknown scan backend 'cuda'"):
        compare_scan_backends(network, images, "cuda")


def test_command_line_reports_and_sets_the_exit_status() -> None:
    command = [sys.executable, "-m", "scripts.backend_agreement", "--backend", "torch", "--side", "32", "--batch", "1"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # the same backend twice gives the same numbers
    assert result.stdout.startswith("torch vs torch: inference output 0.0e+00, training output 0.0e+00")
    result = subprocess.run(command[:-1] + ["0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "--batch must be a positive integer, got 0" in result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mamba_ssm_and_pytorch_scan_agree_on_the_network_on_gpu() -> None:
    reason = mamba_ssm_unavailable_reason()
    if reason is not None:
        pytest.skip(f"mamba_ssm cannot be used: {reason}")
    agreement = backend_agreement.main(backend="mamba_ssm", device="cuda", side=64, batch=2)
    assert agreement.agrees, agreement.summary()
