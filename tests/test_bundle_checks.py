"""
The checks the MONAI model zoo's CI (``ci/verify_bundle.py``) runs on a bundle, through the same ``monai.bundle``
functions it calls: metadata against the zoo's schema, the network's input/output against ``network_data_format``,
and the TorchScript export of a checkpoint; plus inference the way MONAI Deploy's ``MonaiBundleInferenceOperator``
runs the bundle's transforms in memory.
"""

import numpy as np
import pytest
import torch
from bundle_test_utils import CONFIGS, REPO, SCHEMA, TINY_NETWORK, inference_parser
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out
from monai.data import MetaTensor
from monai.transforms import Compose
from monai.utils import ensure_tuple

META_FILE = str(CONFIGS / "metadata.json")
INFERENCE_FILE = str(CONFIGS / "inference.json")
# MONAI Deploy's MonaiBundleInferenceOperator drops every transform whose class name contains one of these
DEPLOY_DISALLOWED = ("LoadImage", "SaveImage")


def _deploy_filter(compose: Compose) -> Compose:
    """Remove the transforms MONAI Deploy removes, with its rule: a disallowed name anywhere in the class name."""
    compose.transforms = tuple(
        t for t in compose.transforms if not any(name in type(t).__name__ for name in DEPLOY_DISALLOWED)
    )
    return compose


def test_verify_metadata():
    if not SCHEMA.is_file():
        pytest.skip(f"the metadata schema is not at {SCHEMA}; verify_metadata would download it")
    # raises on any schema violation; the schema file is given so that nothing is downloaded
    verify_metadata(meta_file=META_FILE, filepath=str(SCHEMA))


@pytest.mark.parametrize("n", [1, 3])
def test_verify_net_in_out(n):
    """The full-size network against metadata's ``32*n`` input shape, as the zoo checks it (n=1) and larger."""
    verify_net_in_out(
        net_id="network_def", meta_file=META_FILE, config_file=INFERENCE_FILE, device="cpu", n=n, bundle_root=str(REPO)
    )


def test_ckpt_export_matches_eager(tmp_path):
    parser = inference_parser(**TINY_NETWORK)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def").eval()
    ckpt_file = tmp_path / "model.pt"
    torch.save(network.state_dict(), ckpt_file)

    ts_file = tmp_path / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts_file),
        ckpt_file=str(ckpt_file),
        meta_file=META_FILE,
        config_file=INFERENCE_FILE,
        bundle_root=str(REPO),
        **TINY_NETWORK,
    )
    exported = torch.jit.load(str(ts_file), map_location="cpu").eval()
    for size in [(64, 64), (45, 70)]:  # a multiple of 32 and a size the network pads
        x = torch.rand(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), network(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(50, 70, 3), (50, 70)])
def test_deploy_style_inference(shape):
    """
    Run preprocessing -> inferer -> postprocessing in memory the way MONAI Deploy's bundle operator does.

    The operator drops the loader and saver, wraps the picture array (``(H, W, C)``, or ``(H, W)`` for grey) and its
    metadata in a MetaTensor, adds a batch dimension for the inferer, and post-processes the first item of the
    output with the preprocessed inputs, so that ``Invertd`` can restore the original size.
    """
    parser = inference_parser(**TINY_NETWORK)
    preprocessing = _deploy_filter(parser.get_parsed_content("preprocessing"))
    postprocessing = _deploy_filter(parser.get_parsed_content("postprocessing"))
    assert not any("Save" in type(t).__name__ for t in postprocessing.transforms), "the mask saver would run"
    network = parser.get_parsed_content("network_def").eval()
    inferer = parser.get_parsed_content("inferer")

    picture = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    image = MetaTensor.ensure_torch_and_prune_meta(torch.from_numpy(picture), {"source": "in memory"})
    inputs = preprocessing({"image": image})
    with torch.no_grad():
        logits = inferer(inputs=inputs["image"][None], network=network)
    outputs = postprocessing({"pred": ensure_tuple(logits)[0], **inputs})

    mask = outputs["pred"]
    assert mask.shape == (1, *shape[:2])
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
