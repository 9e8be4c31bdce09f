"""
Check that two selective-scan backends give the same network: VMAML-UNet's outputs in eval and training mode and the
gradient of every parameter, computed once with each backend from the same weights and images.

On a GPU this is the check of mamba-ssm's kernel against the bundle's PyTorch scan; on a CPU, of the fused C++ kernel
(its sequence scan in training, its four-direction scan in inference) against the same.

Command line (``python -m scripts.backend_agreement [options]``)::

    python -m scripts.backend_agreement                                  # cpu_kernel against torch on the CPU
    python -m scripts.backend_agreement --backend mamba_ssm --device cuda
    python -m scripts.backend_agreement --side 256 --batch 2 --config_file configs/inference.json

It prints the errors and exits with status 1 when one is above its tolerance.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from monai.bundle import ConfigParser
from torch import Tensor

from scripts.networks.selective_scan import scan_backends
from scripts.networks.ss2d import with_scan_backend

__all__ = [
    "GRADIENT_TOLERANCE",
    "OUTPUT_TOLERANCE",
    "BackendAgreement",
    "compare_scan_backends",
    "main",
    "relative_error",
]

INFERENCE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "inference.json"

# float32 rounding differences of two scans, carried through the network. cpu_kernel against torch measured at most
# 1.4e-6 for an output and 4.2e-6 for a gradient (this command at sides 96 to 256); the tolerances leave room for
# mamba-ssm's kernel, built with --use_fast_math, and are those of the scan-level GPU test.
OUTPUT_TOLERANCE = 1e-4
GRADIENT_TOLERANCE = 1e-3


def relative_error(x: Tensor, reference: Tensor) -> float:
    """``max |x - reference| / max |reference|``, in float64 (0 when both are all zeros)."""
    difference = (x.double() - reference.double()).abs().max()
    scale = reference.double().abs().max()
    if scale == 0:
        return 0.0 if difference == 0 else float("inf")
    return (difference / scale).item()


@dataclass(frozen=True)
class BackendAgreement:
    """
    How far ``backend`` is from ``reference`` on one network and batch (relative errors, see :func:`relative_error`).

    Args:
        backend: the scan backend checked.
        reference: the scan backend it is checked against.
        inference_error: of the eval-mode output, without gradients.
        training_error: of the training-mode output (main and deep-supervision logits).
        gradient_error: the largest over the parameters' gradients.
        worst_parameter: the parameter with that largest gradient error.
    """

    backend: str
    reference: str
    inference_error: float
    training_error: float
    gradient_error: float
    worst_parameter: str

    @property
    def agrees(self) -> bool:
        """Whether every error is within :data:`OUTPUT_TOLERANCE` and :data:`GRADIENT_TOLERANCE`."""
        return (
            max(self.inference_error, self.training_error) <= OUTPUT_TOLERANCE
            and self.gradient_error <= GRADIENT_TOLERANCE
        )

    def summary(self) -> str:
        """One line: the three errors and the verdict."""
        verdict = "agree" if self.agrees else "DISAGREE"
        return (
            f"{self.backend} vs {self.reference}: inference output {self.inference_error:.1e}, training output "
            f"{self.training_error:.1e} (tolerance {OUTPUT_TOLERANCE:.0e}), largest gradient {self.gradient_error:.1e} "
            f"in {self.worst_parameter} (tolerance {GRADIENT_TOLERANCE:.0e}): {verdict}"
        )


def _training_pass(network: nn.Module, images: Tensor, seed: int) -> tuple[Tensor, dict[str, Tensor | None]]:
    network.train()
    torch.manual_seed(seed)  # identical dropout masks, should the network draw any
    output = network(images)
    # A fixed random cotangent rather than a loss: every output element (main and side heads) reaches the gradients.
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed)).to(output)
    names, parameters = zip(*[(n, p) for n, p in network.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(output, parameters, weights, allow_unused=True)
    return output.detach(), dict(zip(names, grads))


def compare_scan_backends(
    network: nn.Module, images: Tensor, backend: str, reference: str = "torch", seed: int = 0
) -> BackendAgreement:
    """
    Run copies of ``network`` (on the device of ``images``) whose SS2D modules use ``backend`` and ``reference``: an
    eval-mode forward without gradients, and a training-mode forward and backward from a fixed random cotangent.

    Args:
        network: a network with :class:`~scripts.networks.ss2d.SS2D` modules; it is copied, not changed.
        images: ``(B, C, H, W)`` inputs on the device to check.
        backend: the selective-scan backend to check (see :func:`~scripts.networks.selective_scan.selective_scan`).
        reference: the backend to check it against.
        seed: seed of the cotangent and of any random layer.

    Raises:
        ValueError: for an unknown backend.
    """
    for name in (backend, reference):
        if name not in scan_backends():
            raise ValueError(f"unknown scan backend {name!r}; choose one of {scan_backends()}.")
    results = {}
    for name in (backend, reference):
        copy = with_scan_backend(network, name).to(images.device).eval()
        with torch.no_grad():
            inference = copy(images)
        results[name] = (inference, *_training_pass(copy, images, seed))
    inference, training, grads = results[backend]
    inference_ref, training_ref, grads_ref = results[reference]
    gradient_errors = {}
    for name, grad_ref in grads_ref.items():
        grad = grads[name]
        if grad is None or grad_ref is None:
            # a parameter unused at this image size (e.g. a wavelet level deeper than a small map allows)
            gradient_errors[name] = 0.0 if grad is None and grad_ref is None else float("inf")
            continue
        gradient_errors[name] = relative_error(grad, grad_ref)
    worst = max(gradient_errors, key=gradient_errors.__getitem__)
    return BackendAgreement(
        backend=backend,
        reference=reference,
        inference_error=relative_error(inference, inference_ref),
        training_error=relative_error(training, training_ref),
        gradient_error=gradient_errors[worst],
        worst_parameter=worst,
    )


def main(
    backend: str = "cpu_kernel",
    reference: str = "torch",
    device: str = "cpu",
    side: int = 128,
    batch: int = 2,
    config_file: str | os.PathLike = INFERENCE_CONFIG,
    seed: int = 0,
) -> BackendAgreement:
    """
    Compare two scan backends on ``network_def`` of ``config_file`` at ``batch`` random ``side x side`` images.

    Args:
        backend: the backend to check: ``"cpu_kernel"`` on a CPU, ``"mamba_ssm"`` on a GPU.
        reference: the backend it is checked against.
        device: ``"cpu"`` or ``"cuda"``.
        side: image side in pixels.
        batch: images per batch.
        config_file: the bundle config whose ``network_def`` and ``in_channels`` are used.
        seed: seed of the weights, images and cotangent.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False on this machine.")
    for option, value in (("side", side), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{option} must be a positive integer, got {value!r}.")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def")
    images = torch.randn(batch, parser.get_parsed_content("in_channels"), side, side, device=device)
    return compare_scan_backends(network, images, backend, reference, seed)


if __name__ == "__main__":
    import fire

    try:
        agreement = fire.Fire(main, serialize=BackendAgreement.summary)
    except (ValueError, ImportError, RuntimeError) as error:
        sys.exit(f"error: {error}")
    sys.exit(0 if agreement.agrees else 1)
