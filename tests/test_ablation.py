"""The ablation command: every variant's switches reach its run, and the table reports what the runs measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bundle_test_utils import TINY_NETWORK

from scripts import ablation
from scripts.ablation import VARIANTS, RunResult, render_markdown
from scripts.networks.vmaml_unet import VMAMLUNet

VM_UNET_SWITCHES = {"wavelet_fusion": "none", "use_wcaa": False, "kan_side_heads": False}


def _result(variant: str, seed: int, iou: float, parameters: int = 1000) -> RunResult:
    metrics = {"mean_iou": iou, "mean_dice": 2 * iou / (1 + iou), "hd95": 4.0, "ukan_iou": iou, "ukan_f1": 0.5}
    return RunResult(variant=variant, seed=seed, metrics=metrics, train_seconds=10.0 + seed, parameters=parameters)


def test_table_gives_means_spreads_and_deltas_to_the_first_variant():
    results = [
        _result("vmaml_unet", 1, 0.70, 3000),
        _result("vmaml_unet", 2, 0.80, 3000),
        _result("no_wcaa", 1, 0.60, 2000),
        _result("no_wcaa", 2, 0.64, 2000),
    ]
    page = render_markdown(results, ["configs/train.json"], {"num_epochs": 3}, "python -m scripts.ablation")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in page.splitlines()[-2:]}
    assert rows["`vmaml_unet`"][1:3] == ["3,000", "0.750 ± 0.071"]
    assert rows["`no_wcaa`"][1:3] == ["2,000", "0.620 ± 0.028"]
    assert rows["`no_wcaa`"][-2:] == ["-0.130", "12"]
    assert rows["`vmaml_unet`"][-2] == "+0.000"
    assert "- Seeds: 1, 2; figures are means ± standard deviations over the seeds" in page
    assert '`{"num_epochs": 3}`' in page
    assert "synthetic lesion set" not in page, "the default config's caveat is for runs of the default config only"
    default_page = render_markdown(results, ["configs/train.json"], {}, "python -m scripts.ablation")
    assert "These runs use the default config: the synthetic lesion set at 64x64 for 15 epochs." in default_page


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"variants": ["vmaml_unet", "no_kan"]}, "unknown variants"),
        ({"seeds": []}, "seeds must be"),
        ({"overrides": {"seed": 3}}, "may not set"),
    ],
)
def test_bad_arguments_are_refused_before_any_run(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        ablation.main(output=str(tmp_path / "ablation.md"), work_dir=str(tmp_path), **kwargs)
    assert not (tmp_path / "ablation.md").exists()


def test_variants_are_valid_config_overrides():
    """Side heads need a side loss and 'none' needs no side heads: no variant may pair them wrongly."""
    for name, (_, switches) in VARIANTS.items():
        assert (switches.get("kan_side_heads", True) is False) == (switches.get("loss_mode") == "none"), name


def test_a_variant_is_trained_and_evaluated_with_its_switches(tmp_path: Path):
    overrides = {**TINY_NETWORK, "num_epochs": 1, "synthetic_dir": str(tmp_path / "data")}
    output = tmp_path / "ablation.md"
    ablation.main(variants=["vm_unet"], seeds=[7], overrides=overrides, output=str(output), work_dir=str(tmp_path))
    run = tmp_path / "vm_unet" / "seed7"
    settings = json.loads((run / "variant.json").read_text())
    assert settings["use_wcaa"] is False and settings["seed"] == 7 and settings["num_epochs"] == 1
    assert (run / "models" / "model.pt").is_file()
    summary = json.loads((run / "eval" / "metrics_summary.json").read_text())["metrics"]
    row = next(line for line in output.read_text().splitlines() if line.startswith("| `vm_unet`"))
    assert f"{summary['mean_iou']:.3f}" in row
    # the variant's network: VM-UNet at the tiny sizes
    vm_unet = VMAMLUNet(
        dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), depths_decoder=(1, 1, 1, 1), d_state=4, **VM_UNET_SWITCHES
    )
    assert f"| {sum(p.numel() for p in vm_unet.parameters()):,} |" in row
