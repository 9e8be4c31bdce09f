"""What several test modules share: the bundle's paths, a tiny network configuration and small helpers."""

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.networks.selective_scan_cpu import load_cpu_scan_kernel

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
# For tests of the fused CPU kernel. test_selective_scan_cpu.py checks that it builds wherever a compiler is present,
# so these skips cannot hide a broken kernel on such a machine.
requires_cpu_kernel = pytest.mark.skipif(
    load_cpu_scan_kernel()[0] is None, reason="the CPU kernel cannot be built here (no compiler)"
)
# config keys that shrink VMAML-UNet to a few thousand parameters, so workflows run in seconds
TINY_NETWORK = {
    "network_dims": [8, 16, 32, 64],
    "network_depths": [1, 1, 1, 1],
    "network_depths_decoder": [1, 1, 1, 1],
    "d_state": 4,
}


def randomise_parameters(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter an O(1) random value, so small initial scales cannot hide a wrong branch."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))


def make_config_workflow(config_files: list, workflow_type: str, **overrides) -> ConfigWorkflow:
    """An initialised ``ConfigWorkflow`` of the bundle's configs whose required properties are all present."""
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / f) for f in config_files],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        bundle_root=str(REPO),
        **overrides,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    return workflow


def run_config_workflow(config_files: list, workflow_type: str, **overrides) -> ConfigWorkflow:
    """Initialise, check, run and finalise a ``ConfigWorkflow`` of the bundle's configs, as MONAI applications do."""
    workflow = make_config_workflow(config_files, workflow_type, **overrides)
    workflow.run()
    workflow.finalize()
    return workflow


# a 1x1 convolution standing in for the network where a test needs known masks: logit > 0 where the mean intensity,
# scaled to [0, 1], exceeds 0.5
THRESHOLD_NETWORK = {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": 1, "kernel_size": 1}


def threshold_checkpoint(folder: Path) -> Path:
    """Write the weights of ``THRESHOLD_NETWORK`` to ``folder/threshold.pt`` and return its path."""
    network = torch.nn.Conv2d(3, 1, kernel_size=1)
    with torch.no_grad():
        network.weight.fill_(20.0 / 3)
        network.bias.fill_(-10.0)
    path = folder / "threshold.pt"
    torch.save(network.state_dict(), path)
    return path


def inference_parser(**overrides) -> ConfigParser:
    """The inference config and its metadata with ``overrides`` applied, as the zoo's scripts and Deploy read it."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser.read_meta(str(CONFIGS / "metadata.json"))
    parser.update({"bundle_root": str(REPO), **overrides})
    return parser
