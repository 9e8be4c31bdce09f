"""
Ablation of VMAML-UNet's additions and of our design choices: each variant trained and evaluated by the bundle's
own workflows, with the same data, schedule and seeds, and one Markdown table of the results.

Command line (``python -m scripts.ablation [options]``)::

    python -m scripts.ablation                                  # default config (synthetic set): docs/ablation.md
    python -m scripts.ablation --seeds "[123, 124, 125]"
    python -m scripts.ablation --variants "['vmaml_unet', 'vm_unet']" --output runs/ablation/quick.md
    python -m scripts.ablation \\
        --config_files "['configs/train.json','configs/ukan_protocol.json','configs/datasets/busi.json']" \\
        --output docs/ablation_busi.md                          # the real ablation (a GPU's work)
    python -m scripts.ablation --overrides "{'num_epochs': 50}"  # settings for every variant

Every run is ``python -m monai.bundle run training`` and then ``run evaluating`` (``configs/evaluate.json``, the
datalist's ``test`` split, else ``validation``) in a fresh process, with the variant's switches, the seed and its
output folders in a config file layered last. Runs go to ``runs/ablation/<variant>/seed<seed>/``.
"""

from __future__ import annotations

import json
import logging
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from monai.bundle import ConfigParser

from scripts.benchmark import describe_machine

__all__ = ["VARIANTS", "METRICS", "RunResult", "run_variant", "render_markdown", "main"]

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger(__name__)

# name -> (what it tests, config overrides). The first is the reference the others are compared with.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "vmaml_unet": ("VMAML-UNet, every addition on (the defaults)", {}),
    "vm_unet": (
        "VM-UNet: every addition off",
        {"wavelet_fusion": "none", "use_wcaa": False, "kan_side_heads": False, "loss_mode": "none"},
    ),
    "no_wavelet": ("without wavelet convolutions in SS2D (VM-UNet's depthwise conv)", {"wavelet_fusion": "none"}),
    "wavelet_parallel": ("wavelet convolution added beside the depthwise conv [ours]", {"wavelet_fusion": "parallel"}),
    "wavelet_kernel_5": ("wavelet convolutions with 5x5 kernels [ours]", {"wavelet_kernel_size": 5}),
    "wavelet_one_level": ("one wavelet level per stage instead of 3, 3, 2, 1 [ours]", {"wavelet_levels": [1, 1, 1, 1]}),
    "no_wcaa": ("without WCAA: skips added as in VM-UNet", {"use_wcaa": False}),
    "no_side_heads": ("without KAN side heads and their loss", {"kan_side_heads": False, "loss_mode": "none"}),
    "loss_fixed": ("side losses with fixed weights 0.5, 0.25, 0.125 instead of the KAN", {"loss_mode": "fixed"}),
    "loss_no_encoder_statistics": (
        "the weighting KAN without the encoder statistics [ours]",
        {"loss_encoder_statistics": False},
    ),
}
DEFAULT_CONFIG = "configs/train.json"
# evaluation figures reported, as metrics_summary.json names them
METRICS = ("mean_iou", "mean_dice", "hd95", "ukan_iou", "ukan_f1")


@dataclass
class RunResult:
    """One trained and evaluated variant at one seed."""

    variant: str
    seed: int
    metrics: dict[str, float]
    train_seconds: float
    parameters: int


def _bundle(command: list[str], log_file: Path) -> None:
    """Run ``python -m monai.bundle <command>`` in the bundle root, its output into ``log_file``."""
    with open(log_file, "w") as log:
        result = subprocess.run(
            [sys.executable, "-m", "monai.bundle", *command], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    if result.returncode != 0:
        tail = log_file.read_text().splitlines()[-15:]
        raise RuntimeError(
            f"{' '.join(command[:2])} failed (exit {result.returncode}), see {log_file}:\n" + "\n".join(tail)
        )


def _config_list(files: Sequence[str]) -> str:
    return "[" + ",".join(repr(str(f)) for f in files) + "]"


def count_parameters(config_files: Sequence[str]) -> int:
    """Parameters of the configs' ``network_def``."""
    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser.update({"bundle_root": str(REPO)})
    if str(REPO) not in sys.path:
        sys.path.insert(1, str(REPO))
    return sum(p.numel() for p in parser.get_parsed_content("network_def").parameters())


def run_variant(
    variant: str, seed: int, config_files: Sequence[str], overrides: Mapping[str, Any], work_dir: Path
) -> RunResult:
    """Train and evaluate ``variant`` at ``seed``; ``overrides`` apply to every variant, before its own switches."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {list(VARIANTS)}.")
    folder = work_dir / variant / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        **overrides,
        **VARIANTS[variant][1],
        "seed": seed,
        "ckpt_dir": str(folder / "models"),
        "log_dir": str(folder / "runs"),
        "output_dir": str(folder / "eval"),
    }
    variant_file = folder / "variant.json"
    variant_file.write_text(json.dumps(settings, indent=4))
    # an absolute path replaces REPO in the join
    files = [str(REPO / f) for f in config_files] + [str(variant_file)]
    meta = ["--meta_file", str(REPO / "configs" / "metadata.json")]
    start = time.perf_counter()
    _bundle(["run", "training", *meta, "--config_file", _config_list(files)], folder / "training.log")
    train_seconds = time.perf_counter() - start
    evaluation = files[:-1] + [str(REPO / "configs" / "evaluate.json"), str(variant_file)]
    _bundle(["run", "evaluating", *meta, "--config_file", _config_list(evaluation)], folder / "evaluation.log")
    summary = json.loads((folder / "eval" / "metrics_summary.json").read_text())["metrics"]
    return RunResult(
        variant=variant,
        seed=seed,
        metrics={name: float(summary[name]) for name in METRICS},
        train_seconds=train_seconds,
        parameters=count_parameters(files),
    )


def _mean_and_spread(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def render_markdown(
    results: Sequence[RunResult], config_files: Sequence[str], overrides: Mapping[str, Any], command: str
) -> str:
    """The results as a Markdown page: one row per variant, means (± standard deviation over the seeds)."""
    variants = list(dict.fromkeys(r.variant for r in results))
    seeds = sorted({r.seed for r in results})
    reference = variants[0]

    def values(variant: str, metric: str) -> list[float]:
        return [r.metrics[metric] for r in results if r.variant == variant]

    lines = [
        "# Ablation: VMAML-UNet's additions and our choices",
        "",
        f"- Command: `{command}`",
        f"- Configs: {', '.join(f'`{f}`' for f in config_files)}"
        + (f"; for every variant: `{json.dumps(dict(overrides))}`" if overrides else ""),
        f"- Seeds: {', '.join(str(s) for s in seeds)}"
        + ("; figures are means ± standard deviations over the seeds" if len(seeds) > 1 else ""),
        f"- Machine: {describe_machine(torch.device('cuda' if torch.cuda.is_available() else 'cpu'))}",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        "Evaluation by `configs/evaluate.json` of each variant's best checkpoint (by validation mean IoU): per-image "
        "mean IoU, Dice and HD95 at the original size, and the U-KAN-style pooled IoU and F1 (docs/data.md). "
        f"Delta IoU is the difference of mean IoU to `{reference}`. A difference within the seeds' spread is noise.",
        "",
        "| variant | what it tests | parameters | mean IoU | Dice | HD95 (px) | U-KAN IoU | U-KAN F1 | delta IoU | "
        "training (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if [Path(f).as_posix() for f in config_files] == [DEFAULT_CONFIG] and not overrides:
        lines[-2:-2] = [
            "These runs use the default config: the synthetic lesion set at 64x64 for 15 epochs. They compare how the "
            "variants train at a small scale, not their accuracy on clinical images; that needs the U-KAN protocol "
            "on a real data set (see the command line in scripts/ablation.py) and a GPU.",
            "",
        ]
    reference_iou = statistics.mean(values(reference, "mean_iou"))
    for variant in variants:
        runs = [r for r in results if r.variant == variant]
        cells = [_mean_and_spread(values(variant, m)) for m in METRICS]
        delta = statistics.mean(values(variant, "mean_iou")) - reference_iou
        seconds = statistics.mean(r.train_seconds for r in runs)
        lines.append(
            f"| `{variant}` | {VARIANTS[variant][0]} | {runs[0].parameters:,} | "
            + " | ".join(cells)
            + f" | {delta:+.3f} | {seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(
    config_files: Sequence[str] = (DEFAULT_CONFIG,),
    variants: Sequence[str] | None = None,
    seeds: Sequence[int] = (123,),
    overrides: Mapping[str, Any] | None = None,
    output: str = "docs/ablation.md",
    work_dir: str = "runs/ablation",
) -> str:
    """
    Train and evaluate every variant at every seed and write the table to ``output``.

    Args:
        config_files: the training configs, layered in order (e.g. with a data set file and the U-KAN protocol).
        variants: names from :data:`VARIANTS` (all by default); the first is the reference of the IoU deltas.
        seeds: the ``seed`` of each run.
        overrides: config keys for every variant (e.g. ``{"num_epochs": 50}``), applied before its switches.
        output: the Markdown file to write, relative to the bundle root unless absolute.
        work_dir: where the runs' checkpoints, logs and evaluations go.

    Returns:
        the path written.
    """
    names = list(variants) if variants is not None else list(VARIANTS)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected names among {list(VARIANTS)}.")
    if not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers, got {seeds!r}.")
    common = dict(overrides or {})
    clashes = sorted(set(common) & {"seed", "ckpt_dir", "log_dir", "output_dir"})
    if clashes:
        raise ValueError(f"overrides may not set {clashes}: the ablation sets them for each run.")
    work = REPO / work_dir
    results = []
    for name in names:
        for seed in seeds:
            logger.info("Training and evaluating %s at seed %d.", name, seed)
            results.append(run_variant(name, int(seed), list(config_files), common, work))
    command = shlex.join(["python", "-m", "scripts.ablation", *sys.argv[1:]])
    path = REPO / output
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(results, list(config_files), common, command))
    return str(path)


if __name__ == "__main__":
    import fire

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        fire.Fire(main)
    except (ValueError, RuntimeError) as error:
        sys.exit(f"error: {error}")
