"""Multi-class segmentation through the bundle's configs: softmax training, evaluation and index-mask inference."""

import json
from pathlib import Path

import numpy as np
import torch
from bundle_test_utils import TINY_NETWORK, run_config_workflow
from PIL import Image

NUM_CLASSES = 3
TINY = {
    **TINY_NETWORK,
    "image_size": [32, 32],
    "num_epochs": 1,
    "batch_size": 2,
    "num_workers": 0,
    "out_channels": NUM_CLASSES,
}


def make_dataset(folder: Path, count: int = 6) -> None:
    """Pictures with a bright square (class 1) and a dark square (class 2); masks hold the class indices."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    items = []
    for i in range(count):
        picture = np.full((36, 44), 120, dtype=np.uint8)
        mask = np.zeros((36, 44), dtype=np.uint8)
        r, c = rng.integers(2, 14, size=2)
        picture[r : r + 10, c : c + 10], mask[r : r + 10, c : c + 10] = 240, 1
        picture[r + 14 : r + 22, c + 18 : c + 26], mask[r + 14 : r + 22, c + 18 : c + 26] = 10, 2
        Image.fromarray(np.stack([picture] * 3, axis=-1)).save(folder / "images" / f"case{i}.png")
        Image.fromarray(mask).save(folder / "masks" / f"case{i}.png")
        items.append({"image": f"images/case{i}.png", "label": f"masks/case{i}.png"})
    datalist = {"training": items[:4], "validation": items[4:5], "test": items[5:]}
    (folder / "datalist.json").write_text(json.dumps(datalist, indent=4))


def test_multiclass_train_evaluate_infer(tmp_path):
    data = tmp_path / "data"
    make_dataset(data)
    paths = {
        "dataset_dir": str(data),
        "ckpt_dir": str(tmp_path / "models"),
        "log_dir": str(tmp_path / "runs"),
        "output_dir": str(tmp_path / "eval"),
    }
    trainer = run_config_workflow(["train.json"], "train", **TINY, **paths).trainer
    assert np.isfinite(trainer.state.metrics["train_loss"])
    assert (tmp_path / "models" / "model.pt").is_file()

    run_config_workflow(["train.json", "evaluate.json"], "eval", **TINY, **paths)
    summary = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())
    assert summary["num_images"] == 1
    assert 0.0 <= summary["metrics"]["mean_dice"] <= 1.0
    assert 0.0 <= summary["metrics"]["ukan_iou"] <= summary["metrics"]["ukan_f1"] <= 1.0

    # Inference with a 1x1 convolution as the network, so the expected classes are known: after intensity scaling
    # the bright square is near 1 (class 1), the dark square near 0 (class 2), the background in between.
    threshold_net = torch.nn.Conv2d(3, NUM_CLASSES, kernel_size=1)
    with torch.no_grad():
        threshold_net.weight.copy_(torch.tensor([0.0, 20.0 / 3, -20.0 / 3])[:, None, None, None].expand(-1, 3, 1, 1))
        threshold_net.bias.copy_(torch.tensor([0.0, -15.0, 5.0]))
    ckpt = tmp_path / "threshold.pt"
    torch.save(threshold_net.state_dict(), ckpt)
    network = {"_target_": "torch.nn.Conv2d", "in_channels": 3, "out_channels": NUM_CLASSES, "kernel_size": 1}
    run_config_workflow(
        ["inference.json"],
        "infer",
        dataset_dir=str(data / "images"),
        output_dir=str(tmp_path / "predictions"),
        ckpt_path=str(ckpt),
        network_def=network,
        out_channels=NUM_CLASSES,
        image_size=[32, 32],
    )
    for i in range(6):
        mask = np.asarray(Image.open(tmp_path / "predictions" / f"case{i}_mask.png"))
        expected = np.asarray(Image.open(data / "masks" / f"case{i}.png"))
        assert mask.shape == expected.shape == (36, 44)
        assert (mask == expected).mean() > 0.95, "class indices at the original size, not a 0/255 binary mask"
