"""The U-KAN batch-pooled IoU/F1 against hand counts and against U-KAN's per-batch loop written out in NumPy."""

import json

import numpy as np
import pytest
import torch
from bundle_test_utils import THRESHOLD_NETWORK, run_config_workflow, threshold_checkpoint
from PIL import Image

from scripts.metrics import BatchPooledIoUMetric

SMOOTH = 1e-5


def binary_pair(prediction: list, label: list) -> tuple:
    """A (1, 1, 1, W) probability map and label from two rows of 0/1 values."""
    return torch.tensor(prediction, dtype=torch.float32).view(1, 1, 1, -1), torch.tensor(label).view(1, 1, 1, -1)


def ukan_loop(probabilities: np.ndarray, labels: np.ndarray, batch_size: int) -> tuple:
    """U-KAN's validation loop: IoU and F1 per batch of thresholded masks, averaged weighted by batch size."""
    iou_sum = f1_sum = 0.0
    for start in range(0, len(probabilities), batch_size):
        predicted = probabilities[start : start + batch_size] > 0.5
        target = labels[start : start + batch_size] > 0.5
        iou = ((predicted & target).sum() + SMOOTH) / ((predicted | target).sum() + SMOOTH)
        iou_sum += iou * len(predicted)
        f1_sum += 2 * iou / (iou + 1) * len(predicted)
    return iou_sum / len(probabilities), f1_sum / len(probabilities)


def test_pools_counts_within_a_batch() -> None:
    first = binary_pair([0.9, 0.9, 0.9, 0.9, 0.1], [1, 1, 1, 0, 0])  # intersection 3, union 4
    second = binary_pair([0.1, 0.1, 0.7, 0.6, 0.1], [0, 0, 0, 0, 0])  # intersection 0, union 2
    pooled = BatchPooledIoUMetric(batch_size=2)
    per_image = BatchPooledIoUMetric(batch_size=1)
    for metric in (pooled, per_image):
        metric(*first)
        metric(*second)
    assert pooled.aggregate().item() == pytest.approx((3 + SMOOTH) / (6 + SMOOTH))
    assert per_image.aggregate().item() == pytest.approx(((3 + SMOOTH) / (4 + SMOOTH) + SMOOTH / (2 + SMOOTH)) / 2)


def test_f1_is_averaged_per_batch_from_the_batch_iou() -> None:
    metric = BatchPooledIoUMetric(batch_size=1, output="f1")
    metric(*binary_pair([0.9, 0.9, 0.1, 0.1], [1, 0, 0, 0]))  # iou 1/2
    metric(*binary_pair([0.9, 0.9, 0.1, 0.1], [1, 1, 0, 0]))  # iou 1
    iou_first = (1 + SMOOTH) / (2 + SMOOTH)
    assert metric.aggregate().item() == pytest.approx((2 * iou_first / (iou_first + 1) + 1.0) / 2)


def test_empty_prediction_and_label_score_one() -> None:
    metric = BatchPooledIoUMetric()
    metric(*binary_pair([0.2, 0.3], [0, 0]))
    assert metric.aggregate().item() == pytest.approx(1.0)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_matches_ukan_loop_with_a_partial_last_batch(batch_size: int) -> None:
    generator = np.random.default_rng(4)
    probabilities = generator.random((11, 1, 12, 10)).astype(np.float32)
    labels = (generator.random((11, 1, 12, 10)) > 0.6).astype(np.float32)
    expected_iou, expected_f1 = ukan_loop(probabilities, labels, batch_size)
    for output, expected in (("iou", expected_iou), ("f1", expected_f1)):
        metric = BatchPooledIoUMetric(batch_size=batch_size, output=output)
        for start in range(0, 11, 2):  # the engine's iterations need not align with the pooling groups
            metric(
                list(torch.from_numpy(probabilities[start : start + 2])),
                list(torch.from_numpy(labels[start : start + 2])),
            )
        assert metric.aggregate().item() == pytest.approx(expected, rel=1e-12)


def test_multiclass_averages_foreground_classes() -> None:
    probabilities = torch.zeros(1, 3, 1, 4)
    probabilities[0, [0, 1, 2, 2], 0, [0, 1, 2, 3]] = 1.0  # predicted classes 0, 1, 2, 2
    label = torch.tensor([0, 1, 1, 2]).view(1, 1, 1, 4)
    metric = BatchPooledIoUMetric(num_classes=3)
    metric(probabilities, label)
    class_1 = (1 + SMOOTH) / (2 + SMOOTH)
    class_2 = (1 + SMOOTH) / (2 + SMOOTH)
    assert metric.aggregate().item() == pytest.approx((class_1 + class_2) / 2)


def test_reset_forgets_recorded_images() -> None:
    metric = BatchPooledIoUMetric()
    metric(*binary_pair([0.9, 0.1], [0, 1]))
    metric.reset()
    metric(*binary_pair([0.9, 0.1], [1, 0]))
    assert metric.aggregate().item() == pytest.approx(1.0)


def test_invalid_arguments_and_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="output"):
        BatchPooledIoUMetric(output="dice")
    with pytest.raises(ValueError, match="batch_size"):
        BatchPooledIoUMetric(batch_size=0)
    with pytest.raises(ValueError, match="channels"):
        BatchPooledIoUMetric(num_classes=1)(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="spatial size"):
        BatchPooledIoUMetric()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 5, 4))
    with pytest.raises(ValueError, match="no images"):
        BatchPooledIoUMetric().aggregate()


def test_evaluation_config_reports_ukan_metrics_at_network_size(tmp_path) -> None:
    """Through evaluate.json, with a 1x1 threshold network: the true lesion is found, a second bright square is a
    false positive. Squares are aligned to 2x2 blocks, so the 64 -> 32 bilinear resize keeps them exact."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    lesion_sides, false_positive_sides, items = [8, 16, 4], [4, 8, 12], []
    for i, (lesion, false_positive) in enumerate(zip(lesion_sides, false_positive_sides)):
        picture, mask = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
        picture[2 : 2 + lesion, 2 : 2 + lesion], mask[2 : 2 + lesion, 2 : 2 + lesion] = 255, 255
        picture[40 : 40 + false_positive, 40 : 40 + false_positive] = 255
        Image.fromarray(np.stack([picture] * 3, axis=-1)).save(data / "images" / f"case{i}.png")
        Image.fromarray(mask).save(data / "masks" / f"case{i}.png")
        items.append({"image": f"images/case{i}.png", "label": f"masks/case{i}.png"})
    (data / "datalist.json").write_text(json.dumps({"training": items, "test": items}))
    run_config_workflow(
        ["train.json", "evaluate.json"],
        "eval",
        dataset_dir=str(data),
        output_dir=str(tmp_path / "eval"),
        ckpt_path=str(threshold_checkpoint(tmp_path)),
        network_def=THRESHOLD_NETWORK,
        image_size=[32, 32],
        ukan_batch_size=2,
    )
    metrics = json.loads((tmp_path / "eval" / "metrics_summary.json").read_text())["metrics"]
    # areas at the network's 32x32 input: a side of s pixels becomes s / 2
    intersections = [(s / 2) ** 2 for s in lesion_sides]
    unions = [(s / 2) ** 2 + (f / 2) ** 2 for s, f in zip(lesion_sides, false_positive_sides)]
    groups = [(sum(intersections[:2]), sum(unions[:2]), 2), (intersections[2], unions[2], 1)]
    ious = [((i + SMOOTH) / (u + SMOOTH), n) for i, u, n in groups]
    assert metrics["ukan_iou"] == pytest.approx(sum(iou * n for iou, n in ious) / 3, rel=1e-6)
    assert metrics["ukan_f1"] == pytest.approx(sum(2 * iou / (iou + 1) * n for iou, n in ious) / 3, rel=1e-6)
    per_image_iou = np.mean([s**2 / (s**2 + f**2) for s, f in zip(lesion_sides, false_positive_sides)])
    assert metrics["mean_iou"] == pytest.approx(per_image_iou, rel=1e-4), "the per-image mean at the original size"
