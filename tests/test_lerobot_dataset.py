"""Reading back a real Meta-World collection, and every way a dataset on disk can be broken."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from hybrid.data.lerobot_dataset import DatasetError, LeRobotDataset
from hybrid.data.lerobot_writer import EpisodeData, LeRobotWriter
from hybrid.data.video import decode_video
from hybrid.sim.metaworld import PRESETS, task_language

CAMERA = "observation.images.front"


def test_collection_reads_back_with_shapes_dtypes_and_language(mt10_dataset):
    root, summary = mt10_dataset
    ds = LeRobotDataset(root)
    kept = sum(row["kept"] for row in summary["tasks"].values())
    assert ds.num_episodes == kept == ds.info["total_episodes"]
    assert ds.info["codebase_version"] == "v3.0" and ds.robot_type == "sawyer"
    assert ds.camera_keys == [CAMERA, "observation.images.side"]
    for key, dtype, shape in [
        ("observation.state", "float32", [4]),
        ("action", "float32", [4]),
        ("subgoal", "string", [1]),
        ("progress", "float32", [1]),
        (CAMERA, "video", [64, 64, 3]),
    ]:
        assert ds.features[key]["dtype"] == dtype and ds.features[key]["shape"] == shape, key
    instructions = {task_language()[t].instruction for t in PRESETS["mt10"]}
    for index in range(ds.num_episodes):
        ep = ds.episode(index)
        length = ds.episodes[index]["length"]
        assert ep["observation.state"].shape == (length, 4)
        assert ep["observation.state"].dtype == np.float32
        assert ep["action"].shape == (length, 4) and np.abs(ep["action"]).max() <= 1.0
        assert np.array_equal(ep["frame_index"], np.arange(length))
        assert ep["task"] in instructions
        # Progress rises monotonically from 0 to 1.
        assert ep["progress"][0] == 0.0 and ep["progress"][-1] == pytest.approx(1.0)
        assert np.all(np.diff(ep["progress"]) > 0)
        frames = ds.camera_frames(index, CAMERA)
        assert frames.shape == (length, 64, 64, 3) and frames.dtype == np.uint8
        assert frames.reshape(length, -1).max(1).min() > 0, "no black frames"
    # A multi-phase task walks through its subgoals in order.
    pick = [i for i, e in enumerate(ds.episodes) if e["tasks"][0].startswith("pick up the puck")]
    subgoals = list(dict.fromkeys(ds.episode(pick[0])["subgoal"]))
    assert subgoals == list(task_language()["pick-place-v3"].subgoals)


def test_stats_cover_state_action_and_camera(mt10_dataset):
    ds = LeRobotDataset(mt10_dataset[0])
    assert np.asarray(ds.stats["observation.state"]["mean"]).shape == (4,)
    assert np.all(ds.stats["action"]["max"] <= 1.0) and np.all(ds.stats["action"]["min"] >= -1.0)
    image = ds.stats[CAMERA]
    assert image["mean"].shape == (3,) and np.all((0 < image["mean"]) & (image["mean"] < 1))
    all_states = np.concatenate(
        [ds.episode(i)["observation.state"] for i in range(ds.num_episodes)]
    )
    np.testing.assert_allclose(ds.stats["observation.state"]["mean"], all_states.mean(0), atol=1e-5)


def _tiny_dataset(root, with_subgoal=True):
    writer = LeRobotWriter(root, fps=10, robot_type="toy")
    rng = np.random.default_rng(0)
    for task in ("stack the block", "open the box"):
        frames = {
            "observation.state": rng.normal(size=(5, 2)).astype(np.float32),
            "action": rng.normal(size=(5, 3)).astype(np.float32),
        }
        if with_subgoal:
            frames["subgoal"] = np.array(["a", "a", "b", "b", "b"], dtype=object)
        images = rng.integers(1, 255, size=(5, 16, 16, 3), dtype=np.uint8)
        writer.add_episode(EpisodeData(task, frames, {"observation.images.top": images}))
    writer.finish()
    return LeRobotDataset(root)


def test_missing_subgoal_column_falls_back_to_task_text(tmp_path):
    ds = _tiny_dataset(tmp_path / "plain", with_subgoal=False)
    ep = ds.episode(1)
    assert ep["task"] == "open the box"
    assert list(ep["subgoal"]) == ["open the box"] * 5
    assert ds.camera_frames(1, "observation.images.top").shape == (5, 16, 16, 3)


def test_image_features_stored_in_parquet_are_read(tmp_path):
    """LeRobot may store frames as PNG bytes in the parquet files instead of MP4."""
    import io

    import pyarrow as pa
    from PIL import Image

    root = tmp_path / "images"
    ds = _tiny_dataset(root)
    expected = ds.camera_frames(0, "observation.images.top")
    path = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(path)
    pngs = []
    for index in range(ds.num_episodes):
        for frame in ds.camera_frames(index, "observation.images.top"):
            buffer = io.BytesIO()
            Image.fromarray(frame).save(buffer, format="PNG")
            pngs.append({"bytes": buffer.getvalue(), "path": None})
    pq.write_table(table.append_column("observation.images.top", pa.array(pngs)), path)
    info = json.loads((root / "meta/info.json").read_text())
    info["features"]["observation.images.top"]["dtype"] = "image"
    (root / "meta/info.json").write_text(json.dumps(info))
    shutil.rmtree(root / "videos")
    np.testing.assert_array_equal(
        LeRobotDataset(root).camera_frames(0, "observation.images.top"), expected
    )


def test_missing_directory(tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path / 'nope'} does not exist"):
        LeRobotDataset(tmp_path / "nope")


def test_directory_without_info_json(tmp_path):
    with pytest.raises(DatasetError, match="info.json is missing"):
        LeRobotDataset(tmp_path)


def test_older_lerobot_version_is_named(tmp_path):
    _tiny_dataset(tmp_path / "d")
    info_path = tmp_path / "d/meta/info.json"
    info_path.write_text(
        json.dumps(json.loads(info_path.read_text()) | {"codebase_version": "v2.1"})
    )
    with pytest.raises(DatasetError, match="LeRobot v2.1 dataset; this reader needs v3.0"):
        LeRobotDataset(tmp_path / "d")


def test_corrupt_parquet_names_the_file(tmp_path):
    _tiny_dataset(tmp_path / "d")
    path = tmp_path / "d/data/chunk-000/file-000.parquet"
    path.write_bytes(b"not a parquet file")
    ds = LeRobotDataset(tmp_path / "d")
    with pytest.raises(DatasetError, match=f"cannot read {path}: corrupt"):
        ds.episode(0)


def test_missing_data_file_names_the_file(tmp_path):
    _tiny_dataset(tmp_path / "d")
    path = tmp_path / "d/data/chunk-000/file-000.parquet"
    path.unlink()
    with pytest.raises(DatasetError, match=f"missing file {path}"):
        LeRobotDataset(tmp_path / "d").episode(0)


def test_missing_and_truncated_video(tmp_path):
    _tiny_dataset(tmp_path / "d")
    path = tmp_path / "d/videos/observation.images.top/chunk-000/file-000.mp4"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=str(path)):
        LeRobotDataset(tmp_path / "d").camera_frames(1, "observation.images.top")
    path.unlink()
    with pytest.raises(DatasetError, match=f"missing video file {path}"):
        LeRobotDataset(tmp_path / "d").camera_frames(0, "observation.images.top")


def test_required_feature_missing(tmp_path):
    ds = _tiny_dataset(tmp_path / "d")
    with pytest.raises(
        DatasetError, match=r"lacks the feature\(s\) \['observation.images.wrist'\]"
    ):
        ds.require(["observation.state", "observation.images.wrist"])


def test_video_ranges_decode_exactly_with_keyframes_far_apart(tmp_path):
    """`decode_video` seeks to the keyframe before a range: in our all-intra streams that is the
    range's first frame; in a stream with a keyframe every 12 frames and B-frames (as other
    writers make them) every range still reads exactly the frames of a full decode."""
    import av

    fps, count = 20, 60
    frames = np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    frames[:, :8] = np.arange(count, dtype=np.uint8)[:, None, None, None] * 4  # tell them apart
    path = tmp_path / "gop.mp4"
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", "g": "12", "bf": "2"}
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    whole = decode_video(path, 0.0, count / fps, fps)
    assert whole.shape == frames.shape
    ranges = [(0, 5), (10, 12), (11, 20), (13, 30), (22, 26), (23, 24), (35, 40), (47, 60)]
    for start, stop in ranges:  # some end just before a keyframe, or start on one
        part = decode_video(path, start / fps, stop / fps, fps)
        np.testing.assert_array_equal(part, whole[start:stop])
    with pytest.raises(ValueError, match="holds 10 frames .* expected 15"):
        decode_video(path, 50 / fps, 65 / fps, fps)
