import pytest
import torch

from experts.scene_estimator import SceneEstimator


def _dots(n: int, generator: torch.Generator, size: int = 32):
    """Frames (n, 1, 3, size, size) of a bright 3x3 square on noise, and its centre (n, 2) in
    [-1, 1]: a puck to find."""
    images = torch.rand(n, 1, 3, size, size, generator=generator) * 0.2
    centre = torch.randint(2, size - 2, (n, 2), generator=generator)
    for i, (x, y) in enumerate(centre.tolist()):
        images[i, 0, :, y - 1 : y + 2, x - 1 : x + 2] = 1.0
    return images, centre.float() / (size - 1) * 2 - 1


def test_it_learns_where_a_dot_is_from_the_pixels():
    """Trained on the scene alone it places a dot it has never seen far better than the mean
    guess does (the spread of the positions)."""
    torch.manual_seed(0)
    estimator = SceneEstimator(scene_dim=2, keypoints=4, channels=(8, 16), hidden=32)
    optimiser = torch.optim.Adam(estimator.parameters(), 3e-3)
    g, ids = torch.Generator().manual_seed(0), torch.zeros(32, dtype=torch.long)
    for _ in range(300):
        images, target = _dots(32, g)
        loss = (estimator(images, ids) - target).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    images, target = _dots(128, torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = (estimator(images, ids.repeat(4)) - target).square().mean()
    baseline = (target - target.mean(0)).square().mean()
    assert error < 0.1 * baseline, (error, baseline)


def test_shapes_fewer_cameras_and_per_robot_rows():
    estimator = SceneEstimator(
        scene_dim=5, num_cameras=2, keypoints=3, num_embodiments=2, image_size=32
    )
    images = torch.rand(4, 2, 3, 32, 32)
    ids = torch.tensor([0, 1, 0, 1])
    assert estimator.points(images).shape == (4, 2, 3, 2)
    both = estimator(images, ids)
    assert both.shape == (4, 5)
    one = estimator.points(images[:, :1]).flatten(1)  # (4, 6): the second camera's are zeros
    padded = torch.nn.functional.pad(one, (0, 6))
    torch.testing.assert_close(
        estimator(images[:, :1], ids), estimator.out(estimator.readout(padded), ids)
    )
    # nearest-neighbour doubling, then the area resize back to 32: the same pixels
    doubled = torch.nn.functional.interpolate(images[:, 0], scale_factor=2.0)[:, None]
    torch.testing.assert_close(estimator(doubled, ids), estimator(images[:, :1], ids))
    with torch.no_grad():
        estimator.out.bias[1] += 1.0
    moved = estimator(images, ids)
    torch.testing.assert_close(moved[ids == 0], both[ids == 0])
    assert not torch.allclose(moved[ids == 1], both[ids == 1])
    with pytest.raises(ValueError, match=r"images must be \(B, N, 3, S, S\)"):
        estimator(torch.rand(4, 3, 3, 32, 32), ids)
    with pytest.raises(ValueError, match="scene_dim >= 1 and keypoints >= 1"):
        SceneEstimator(scene_dim=0)


@pytest.mark.parametrize("context, reach", [(False, 3), (True, 15)])
def test_context_widens_what_a_heat_map_cell_reads(context, reach):
    """A cell of the stride-4 heat map reads the pixels within 3 of its centre (7 x 7) without
    the context stage, within 15 (31 x 31) with it: the gradient of one cell's logit reaches
    exactly that far. Also at a side whose coarse map does not halve evenly (36: 9 -> 5 -> 9).
    The group norms are taken out: their statistics mix the whole map into every cell."""
    torch.manual_seed(0)
    estimator = SceneEstimator(scene_dim=2, keypoints=2, channels=(8, 16), context=context)
    for stage in (estimator.stem, estimator.context):
        for i, layer in enumerate(stage or ()):
            if isinstance(layer, torch.nn.GroupNorm):
                stage[i] = torch.nn.Identity()
    for size in (64, 36):
        images = torch.rand(1, 1, 3, size, size, requires_grad=True)
        logits = estimator.heatmap_logits(images)
        assert logits.shape == (1, 2, size // 4, size // 4)
        logits[0, 0, size // 8, size // 8].backward()
        touched = images.grad[0, 0].abs().sum(0).nonzero()  # (pixels, 2): rows and columns
        extent = (touched.max(0).values - touched.min(0).values + 1).tolist()
        assert extent == [2 * reach + 1] * 2, (size, extent)


def test_context_needs_an_estimator():
    from experts.action import ActionExpert

    with pytest.raises(ValueError, match="scene_context widens"):
        ActionExpert(vlm_dim=32, scene_dim=3, keypoints=4, scene_context=True)
