"""The frozen VAE's latents, encoded once per frame."""

import torch

from hybrid.latent_cache import LatentCache


def test_each_frame_is_encoded_once_and_looked_up_after():
    rows = []

    def encode(images):  # (M, N, 3, S, S) -> (M, C, h, w), like WorldModel.encode
        rows.append(len(images))
        return images[:, 0, :2] * 2

    cache = LatentCache()
    images = torch.rand(4, 1, 3, 4, 4)
    episode, frame = torch.tensor([0, 0, 1, 0]), torch.tensor([5, 6, 5, 5])
    out = cache(encode, images, episode, frame)
    assert rows == [3], "row 3 is row 0's frame: three frames, each encoded once"
    assert torch.equal(out[:3], images[:3, 0, :2] * 2)
    assert torch.equal(out[3], out[0])
    assert len(cache) == 3
    # known frames are looked up, not encoded: other pixels under the same keys change nothing
    again = cache(encode, torch.zeros_like(images), episode.flip(0), frame.flip(0))
    assert rows == [3]
    assert torch.equal(again, out.flip(0))
    # a new frame in a batch of known ones: only it is encoded
    cache(encode, images[:2], torch.tensor([0, 2]), torch.tensor([5, 0]))
    assert rows == [3, 1] and len(cache) == 4
