import pytest
import torch

from experts.vlm import HighLevelVLM, train_tokenizer

TEXTS = [
    "pick up the puck and place it at the goal",
    "move the gripper above the puck",
    "grasp the puck",
    "open the drawer",
    "pull the drawer open",
]


SMALL = dict(num_action_tokens=32, text_hidden=64, text_layers=2, vision_hidden=32, vision_layers=1)


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    tokenizer = train_tokenizer(TEXTS, vocab_size=200, num_action_tokens=32)
    return HighLevelVLM(tokenizer=tokenizer, max_subgoal_tokens=6, cameras=None, **SMALL).eval()


def _images(batch, cameras=1, seed=0):
    return torch.rand(batch, cameras, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch,cameras", [(1, 1), (3, 2)])
def test_forward_losses_and_prefix_features(vlm, batch, cameras):
    images = _images(batch, cameras)
    out = vlm(images, TEXTS[:batch], TEXTS[1 : batch + 1], fast_tokens=[[1, 2, 3]] * batch)
    assert out.lang_loss.ndim == 0 and out.fast_loss.ndim == 0
    assert out.features.shape[0] == batch and out.features.shape[2] == vlm.hidden_size
    assert out.feature_mask.shape == out.features.shape[:2]
    # The prefix covers the image blocks, the instruction and the subgoal, not the FAST tokens:
    # with causal attention its features are those of a pass without FAST tokens.
    features, mask = vlm.prefix_features(images, TEXTS[:batch], TEXTS[1 : batch + 1])
    assert torch.equal(mask, out.feature_mask[:, : mask.shape[1]])
    torch.testing.assert_close(features[mask], out.features[out.feature_mask])
    assert mask.sum(1).min() > cameras * vlm.image_seq_len


def test_generated_subgoals_are_text_from_the_vocabulary(vlm):
    subgoals, _, _ = vlm.propose_subgoal(_images(2), TEXTS[:2])
    assert len(subgoals) == 2
    vocab = set(vlm.tokenizer.get_vocab())
    for text in subgoals:
        assert isinstance(text, str)
        assert "<act_" not in text and "<image>" not in text
        assert all(token in vocab for token in vlm.tokenizer.tokenize(text))


def test_generation_returns_the_kind_of_tensor_its_caller_asked_for(vlm):
    """The compiled planner runs under no_grad: generation must not hand it inference tensors on
    the chunks with a new subgoal (and ordinary ones on the others), or every compiled function
    below compiles twice; the eager planner's inference_mode still makes inference tensors."""
    images = _images(1)
    with torch.no_grad():
        _, features, mask = vlm.propose_subgoal(images, TEXTS[:1])
        prefix, _ = vlm.prefix_features(images, TEXTS[:1], ["reach"])
    assert not features.is_inference() and not mask.is_inference()
    assert features.is_inference() == prefix.is_inference()
    assert not features.requires_grad
    with torch.inference_mode():
        assert vlm.propose_subgoal(images, TEXTS[:1])[1].is_inference()


@pytest.fixture(scope="module")
def speaker(vlm):
    """A VLM taught, in a few steps on one example, to say "grasp the puck" to TEXTS[0]."""
    torch.manual_seed(0)
    model = HighLevelVLM(tokenizer=vlm.tokenizer, max_subgoal_tokens=8, **SMALL)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(_images(1), [TEXTS[0]], ["grasp the puck"]).lang_loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def test_a_trained_vlm_generates_its_subgoal(speaker):
    """A few steps on one example teach the model to say it: generation really decodes."""
    model, images = speaker, _images(1)
    subgoals, features, mask = model.propose_subgoal(images, [TEXTS[0]])
    assert subgoals == ["grasp the puck"]
    # One pass: the generation's features are those of the teacher-forced prefix of its subgoal.
    expected, expected_mask = model.prefix_features(images, [TEXTS[0]], subgoals)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("drafts", "calls"),
    [
        (("grasp the puck",), 2),  # right: the prompt's pass, then the draft's in one
        (("open the drawer", TEXTS[0], "grasp the puck"), 2),  # the one that fits is used
        (("grasp the drawer",), 4),  # right to "the", then token by token: puck, <eos>
        (("open the drawer",), 5),  # wrong from its first token: no draft is fed at all
        (("grasp the puck " * 5,), 3),  # right to "puck", then <eos>; cut at the budget
    ],
)
def test_drafts_give_greedy_decodings_subgoal_in_fewer_passes(speaker, drafts, calls):
    """Speculative decoding with the subgoal in force as the guess: whatever the drafts, the
    subgoal and its features are greedy decoding's; a right draft takes two backbone passes
    instead of one per token."""
    images, passes = _images(1), []
    hook = speaker.backbone.model.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        subgoals, features, mask = speaker.propose_subgoal(images, [TEXTS[0]])
        plain = len(passes)
        passes.clear()
        drafted, drafted_features, drafted_mask = speaker.propose_subgoal(
            images, [TEXTS[0]], drafts
        )
    finally:
        hook.remove()
    assert subgoals == drafted == ["grasp the puck"]
    assert torch.equal(mask, drafted_mask)
    torch.testing.assert_close(drafted_features, features, rtol=1e-4, atol=1e-4)
    assert plain == 5 and len(passes) == calls  # plain: the prompt, grasp, the, puck, <eos>


def test_drafts_are_for_one_sample(vlm):
    with pytest.raises(ValueError, match="drafts are for one sample, got 2 instructions"):
        vlm.propose_subgoal(_images(2), TEXTS[:2], ("grasp the puck",))


@pytest.mark.parametrize("budget", [6, 2], ids=["until-eos", "budget-spent"])
def test_generation_features_are_the_prefix_of_what_it_generated(budget):
    """Batched, with prompts of different lengths (left-padded) and rows that stop at different
    steps: each row's features are a teacher-forced pass over its own prompt, generated tokens
    and <eos>, position for position; padding holds zeros."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(TEXTS, vocab_size=200, num_action_tokens=32)
    model = HighLevelVLM(tokenizer=tokenizer, max_subgoal_tokens=budget, **SMALL).eval()
    images, instructions = _images(3), [TEXTS[0], TEXTS[3], TEXTS[1]]
    subgoals, features, mask = model.propose_subgoal(images, instructions)
    for i in range(3):
        prompt = model._prompts(1, [instructions[i]])[0]
        real = features[i, mask[i]]
        ids = torch.tensor([prompt])
        generated = real.shape[0] - len(prompt)  # the subgoal's tokens and its <eos>
        assert 1 <= generated <= budget + 1
        # the tokens fed back are the argmax of the previous position, as teacher forcing sees
        # them: rebuild them from the features' own logits
        logits = model.backbone.lm_head(real[len(prompt) - 1 : -1]).float()
        logits[:, model._suppress] = -torch.inf
        tokens = logits.argmax(-1)
        tokens[-1] = tokenizer.eos_token_id  # forced when the budget is spent
        full = torch.cat([ids, tokens[None]], 1)
        expected = model._hidden(images[i : i + 1], full, torch.ones_like(full, dtype=torch.bool))
        torch.testing.assert_close(real, expected[0], rtol=1e-4, atol=1e-4)
        assert model.tokenizer.decode(tokens[:-1], skip_special_tokens=True).strip() == subgoals[i]
    assert (features[~mask] == 0).all()


def test_lang_and_fast_losses_reach_the_backbone(vlm):
    out = vlm(_images(2), TEXTS[:2], TEXTS[2:4], fast_tokens=[[4, 5], [6]])
    for loss in (out.lang_loss, out.fast_loss):
        vlm.zero_grad()
        loss.backward(retain_graph=True)
        grads = [p.grad for p in vlm.backbone.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0


def test_save_load_identical(vlm, tmp_path):
    vlm.save_pretrained(tmp_path / "vlm")
    loaded = HighLevelVLM.from_pretrained(tmp_path / "vlm").eval()
    images = _images(2)
    a, mask_a = vlm.prefix_features(images, TEXTS[:2], TEXTS[2:4])
    b, mask_b = loaded.prefix_features(images, TEXTS[:2], TEXTS[2:4])
    assert torch.equal(mask_a, mask_b)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.propose_subgoal(images, TEXTS[:2])[0] == vlm.propose_subgoal(images, TEXTS[:2])[0]


def test_bad_image_shape_is_named(vlm):
    with pytest.raises(ValueError, match=r"images must be \(B, N, 3, H, W\), got \(2, 3, 64, 64\)"):
        vlm.propose_subgoal(torch.rand(2, 3, 64, 64), TEXTS[:2])


def test_cameras_sets_how_many_cameras_the_vlm_reads():
    torch.manual_seed(0)
    tokenizer = train_tokenizer(TEXTS, vocab_size=200, num_action_tokens=32)
    first_only = HighLevelVLM(tokenizer=tokenizer, cameras=1, **SMALL).eval()
    images = _images(2, cameras=2)
    other_second = torch.cat([images[:, :1], _images(2, cameras=1, seed=5)], 1)
    a, mask_a = first_only.prefix_features(images, TEXTS[:2], TEXTS[1:3])
    b, mask_b = first_only.prefix_features(other_second, TEXTS[:2], TEXTS[1:3])
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b), "the second camera is not read"
    every = HighLevelVLM(tokenizer=tokenizer, cameras=None, **SMALL).eval()
    c, _ = every.prefix_features(images, TEXTS[:2], TEXTS[1:3])
    assert c.shape[1] > a.shape[1], "with cameras=None both image blocks are in the prefix"
