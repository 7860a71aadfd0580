"""The toy-world estimator that measures the demo's depth, normal and pose ControlNets: its targets, its keypoint
read-out and its annotator outputs (random weights here; the shipped weights are measured in test_demo.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from controlkit.demo.estimator import (
    CHANNELS,
    KEYPOINTS,
    GeometryAnnotator,
    build_estimator,
    estimator_loss,
    heatmap_peaks,
    render_truth,
)
from controlkit.demo.toyworld.world import pose_json, render_figure
from training.metrics import keypoint_distance


def test_heatmap_targets_peak_at_the_figures_keypoints():
    truth = render_truth("figure", [(5, 0)])
    figure = render_figure((5, 0))
    visible = truth["visible"][0] > 0
    assert visible.sum() == (figure.keypoints[:, 2] > 0).sum() > 10
    heatmaps = truth["heatmaps"][0][visible]
    np.testing.assert_allclose(heatmaps.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    rows, columns = np.unravel_index(heatmaps.reshape(len(heatmaps), -1).argmax(axis=1), heatmaps.shape[1:])
    np.testing.assert_allclose(columns, figure.keypoints[visible, 0], atol=0.5)
    np.testing.assert_allclose(rows, figure.keypoints[visible, 1], atol=0.5)
    assert not render_truth("scene", [(5, 0)])["visible"].any()  # scenes have no figure


def test_keypoints_are_read_out_with_sub_pixel_precision():
    grid = torch.arange(64.0)
    logits = torch.zeros(1, 2, 64, 64)
    for channel, (x, y) in enumerate([(10.3, 40.0), (63.0, 0.0)]):  # the second on a corner: clamped window
        logits[0, channel] = -((grid[None, :] - x) ** 2 + (grid[:, None] - y) ** 2) / 2.0
    logits[0, 0, 5, 5] = -0.5  # a weaker second peak elsewhere does not pull the read-out
    peaks = heatmap_peaks(logits)[0]
    assert peaks[0, 0] == pytest.approx(10.3, abs=0.15) and peaks[0, 1] == pytest.approx(40.0, abs=0.01)
    assert peaks[1].tolist() == pytest.approx([63.0, 0.0], abs=0.5)


def test_a_perfect_heatmap_prediction_scores_its_figure_exactly():
    figure = render_figure((5, 1))
    truth = render_truth("figure", [(5, 1)])
    logits = torch.from_numpy(np.log(truth["heatmaps"] + 1e-30))
    points = heatmap_peaks(logits)[0].numpy()
    pose = pose_json(figure)
    pose["people"][0]["pose_keypoints_2d"] = np.concatenate([points, np.ones((KEYPOINTS, 1))], 1).ravel().tolist()
    distance, found = keypoint_distance(pose, pose_json(figure))
    assert distance < 0.005 and found["keypoints_found"] == 1.0


def test_the_annotator_draws_each_kind_and_the_loss_uses_visible_keypoints_only():
    model = build_estimator(seed=0)
    assert model.config.out_channels == CHANNELS
    image = render_figure((5, 2)).image
    for kind in ("depth", "normal", "pose"):
        drawn = GeometryAnnotator(model, kind)(image)
        assert drawn.shape == (64, 64, 3) and drawn.dtype == np.uint8
    pose = GeometryAnnotator(model, "pose").keypoints(np.ascontiguousarray(image[:, :48]))
    assert (pose["canvas_width"], pose["canvas_height"]) == (48, 64)
    points = np.reshape(pose["people"][0]["pose_keypoints_2d"], (-1, 3))
    assert points.shape == (KEYPOINTS, 3) and (points[:, 0] <= 47.5).all() and (points[:, 1] <= 63.5).all()
    with pytest.raises(ValueError, match="'depth', 'normal' or 'pose'"):
        GeometryAnnotator(model, "canny")

    truth = render_truth("figure", [(5, 2)])
    batch = {"geometry": torch.zeros(1, 4, 64, 64), "heatmaps": torch.from_numpy(truth["heatmaps"]),
             "visible": torch.zeros(1, KEYPOINTS)}
    output = torch.randn(1, CHANNELS, 64, 64)
    assert estimator_loss(output, batch) == pytest.approx(output[:, :4].abs().mean().item(), rel=1e-6)
