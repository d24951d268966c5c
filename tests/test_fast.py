import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experts.fast import FastTokenizer
from hybrid.data.lerobot_dataset import LeRobotDataset

H, D = 16, 4


@pytest.fixture(scope="module")
def chunks(mt10_dataset):
    """Every normalised 16-step action chunk of the real Meta-World collection."""
    ds = LeRobotDataset(mt10_dataset[0])
    mean, std = ds.stats["action"]["mean"], ds.stats["action"]["std"]
    out = []
    for i in range(ds.num_episodes):
        actions = (ds.episode(i)["action"] - mean) / std
        actions = np.concatenate([actions, np.repeat(actions[-1:], H - 1, 0)])
        out += [actions[t : t + H] for t in range(len(actions) - H + 1)]
    return np.stack(out)


@pytest.fixture(scope="module")
def fast(chunks):
    return FastTokenizer(H, D, scale=10.0, vocab_size=512).fit(chunks)


def test_round_trip_within_the_quantisation_bound(fast, chunks):
    decoded = fast.decode(fast.encode(chunks))
    assert decoded.shape == chunks.shape and decoded.dtype == np.float32
    error = np.linalg.norm(decoded - chunks, axis=1)  # (N, D): per chunk, per dim
    assert error.max() <= fast.quantisation_bound() + 1e-6
    assert error.max() > 0, "rounding really happens"


def test_compresses_meta_world_chunks(fast, chunks):
    ids = fast.encode(chunks)
    assert all(0 <= i < fast.vocab_size for seq in ids for i in seq)
    assert fast.compression_ratio(chunks) > 1.5


def test_decoding_model_output_of_the_wrong_length_never_fails(fast, chunks):
    ids = fast.encode(chunks[:2])
    for broken in ([], ids[0][:2], ids[0] * 5):
        assert fast.decode([broken]).shape == (1, H, D)


def test_save_load_identical(fast, chunks, tmp_path):
    fast.save_pretrained(tmp_path)
    loaded = FastTokenizer.from_pretrained(tmp_path)
    assert loaded.encode(chunks[:50]) == fast.encode(chunks[:50])
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        FastTokenizer.from_pretrained(tmp_path)


def test_bad_input(fast):
    with pytest.raises(ValueError, match=r"must be \(N, 16, 4\), got \(2, 8, 4\)"):
        fast.encode(np.zeros((2, 8, 4)))
    bad = np.zeros((1, H, D))
    bad[0, 3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fast.encode(bad)
    with pytest.raises(RuntimeError, match="not fitted"):
        FastTokenizer(H, D).encode(np.zeros((1, H, D)))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_bound_holds_on_smooth_random_chunks(seed):
    rng = np.random.default_rng(seed)
    time = np.linspace(0, 1, H)[None, :, None]
    chunks = sum(
        rng.normal(size=(64, 1, D)) * np.sin(2 * np.pi * f * time + rng.uniform(0, 6.3))
        for f in rng.uniform(0, 2, size=3)
    )
    fast = FastTokenizer(H, D, scale=8.0, vocab_size=256).fit(chunks)
    error = np.linalg.norm(fast.decode(fast.encode(chunks)) - chunks, axis=1)
    assert error.max() <= fast.quantisation_bound() + 1e-6
