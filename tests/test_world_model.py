import pytest
import torch

from experts.world_model import WorldModel

B, L, D = 3, 9, 32


@pytest.fixture(scope="module")
def world_model():
    torch.manual_seed(0)
    return WorldModel(
        context_dim=D, vae_channels=(16, 16, 32, 32), hidden=32, num_layers=2, value_hidden=32
    ).eval()


def _inputs(batch=B):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 1, 3, 64, 64, generator=g)
    context = torch.randn(batch, L, D, generator=g)
    mask = torch.ones(batch, L, dtype=torch.bool)
    mask[0, 6:] = False
    return images, context, mask


@pytest.mark.parametrize("batch", [1, 3])
def test_imagine_shapes_noise_and_reproducibility(world_model, batch):
    images, context, mask = _inputs(batch)
    current = world_model.encode(images)
    a = world_model.imagine(
        current, context, mask, 4, steps=3, generator=torch.Generator().manual_seed(1)
    )
    b = world_model.imagine(
        current, context, mask, 4, steps=3, generator=torch.Generator().manual_seed(1)
    )
    assert a.shape == (batch, 4, *world_model.latent_shape)
    assert torch.equal(a, b), "a fixed generator reproduces the candidates"
    assert not torch.allclose(a[:, 0], a[:, 1]), "candidates differ across K"
    decoded = world_model.decode(a)
    assert decoded.shape == (batch, 4, 3, 64, 64) and 0 <= decoded.min() and decoded.max() <= 1
    scores = world_model.score(a, context, mask)
    assert scores.shape == (batch, 4) and torch.all((0 <= scores) & (scores <= 1))


def test_losses_and_where_their_gradients_go(world_model):
    images, context, mask = _inputs()
    context.requires_grad_(True)
    future = torch.rand_like(images)
    current_latent, future_latent = world_model.encode(torch.cat([images, future])).chunk(2)
    losses, imagined = world_model.losses(
        images, current_latent, future_latent, context, mask, torch.rand(B), torch.rand(B)
    )
    assert set(losses) == {"world", "value", "vae"}
    assert imagined.shape == future_latent.shape and not imagined.requires_grad
    world_model.zero_grad()
    (losses["world"] + losses["value"]).backward(retain_graph=True)
    assert context.grad is None, "the world model reads the VLM through a stop-gradient"
    assert all(p.grad is None for p in world_model.vae.parameters()), "latents are detached"
    assert world_model.transformer.proj_out.weight.grad.abs().sum() > 0
    losses["vae"].backward()
    assert world_model.vae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_a_frozen_pretrained_vae_has_no_vae_loss(world_model, tmp_path):
    world_model.vae.save_pretrained(tmp_path / "vae")
    model = WorldModel(
        context_dim=D, vae=str(tmp_path / "vae"), hidden=32, num_layers=1, value_hidden=32
    )
    assert not model.train_vae and not any(p.requires_grad for p in model.vae.parameters())
    images, context, mask = _inputs()
    latents = model.encode(images)
    losses, _ = model.losses(images, latents, latents, context, mask, torch.rand(B), torch.rand(B))
    assert losses["vae"] is None


def test_save_load_identical(world_model, tmp_path):
    world_model.save_pretrained(tmp_path / "wm")
    loaded = WorldModel.from_pretrained(tmp_path / "wm").eval()
    assert loaded.train_vae == world_model.train_vae
    images, context, mask = _inputs()
    a = world_model.imagine(
        world_model.encode(images), context, mask, 2, 2, torch.Generator().manual_seed(3)
    )
    b = loaded.imagine(loaded.encode(images), context, mask, 2, 2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(world_model.score(a, context, mask), loaded.score(b, context, mask))


def test_shared_context_is_the_plain_cross_attention(world_model):
    """Imagination computes the context's projections once per K candidates: the velocities are
    those of diffusers' own path (rows with different contexts and masks), and the transformer
    is given back its own caption projection and processors, also when the pass fails."""
    from einops import repeat

    from experts.shared_context import shared_context

    images, context, mask = _inputs()
    k = 4
    current = repeat(world_model.encode(images), "b c h w -> (b k) c h w", k=k)
    ctx, ctx_mask = repeat(context, "b l d -> (b k) l d", k=k), repeat(mask, "b l -> (b k) l", k=k)
    noisy = torch.randn(current.shape, generator=torch.Generator().manual_seed(2))
    t = torch.full((len(noisy),), 0.3)
    transformer = world_model.transformer
    projection = transformer.caption_projection
    processors = transformer.attn_processors
    with torch.no_grad():
        plain = world_model.velocity(noisy, t, current, ctx, ctx_mask)
        with shared_context(transformer, k):
            assert transformer.caption_projection is not projection
            shared = world_model.velocity(noisy, t, current, ctx, ctx_mask)
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-5)
    assert transformer.caption_projection is projection
    assert transformer.attn_processors == processors
    with pytest.raises(RuntimeError), shared_context(transformer, k):
        raise RuntimeError("a failed pass")
    assert transformer.caption_projection is projection
    assert transformer.attn_processors == processors
