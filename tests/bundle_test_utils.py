"""What several test modules share: the bundle's paths, a tiny network configuration and small helpers."""

from pathlib import Path

import torch
from monai.bundle import ConfigWorkflow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SCHEMA = REPO.parent / "shared" / "schemas" / "meta_schema_20240725.json"
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
