"""The high-level VLM: camera images + instruction -> a language subgoal, generated as text, and
the prefix features the lower tiers read. Its backbone is also trained on FAST action tokens.

Backbone: transformers' `Idefics3ForConditionalGeneration` (the SmolVLM family). By default a tiny
config is built locally with a BPE tokenizer trained on the dataset's text; a hub name or a
directory selects a pretrained backbone and its tokenizer instead, through the same
`from_pretrained` path the tests use for the tiny one.

Sequence, one image block per camera (Idefics3's layout without image splitting):
    [<fake_token_around_image> <global-img> <image> x n ... <fake_token_around_image>] x N
    instruction "\nSubgoal:" subgoal <eos> <act_i> ... <eos>
    `----------------- prefix ----------------'`-- FAST --'
Losses: `lang` is next-token cross-entropy on the subgoal and its <eos>, `fast` on the FAST tokens
and their <eos>. The attention is causal, so the prefix features (last hidden layer at the prefix
positions) do not depend on the FAST tokens: training and inference see the same features.
Images come in as (B, N, 3, S, S) floats in [0, 1].
"""

from __future__ import annotations

import string
from contextlib import contextmanager
from dataclasses import dataclass
from inspect import signature
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from einops import rearrange
from torch import nn
from transformers import (
    AutoTokenizer,
    DynamicCache,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Model,
    PreTrainedTokenizerFast,
)

IMAGE_TOKEN, IMAGE_AROUND, IMAGE_GLOBAL = "<image>", "<fake_token_around_image>", "<global-img>"
PAD, EOS = "<pad>", "<eos>"
SUBGOAL_PROMPT = "\nSubgoal:"
# transformers 5.24 renamed the backbone's key-value cache argument (`past_key_values` -> `cache`)
_CACHE = "cache" if "cache" in signature(Idefics3Model.forward).parameters else "past_key_values"


def action_token(i: int) -> str:
    return f"<act_{i}>"


def train_tokenizer(
    texts: list[str], vocab_size: int = 512, num_action_tokens: int = 512
) -> PreTrainedTokenizerFast:
    """A BPE tokenizer for the tiny VLM, trained on the dataset's instructions and subgoals, with
    the image, padding and FAST action tokens added as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    special = ["<unk>", PAD, EOS, IMAGE_TOKEN, IMAGE_AROUND, IMAGE_GLOBAL]
    # Every printable ASCII character is in the alphabet, so text of robots and tasks added later
    # (`hybrid finetune`) tokenizes without <unk>.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=list(string.printable[:95]),
        show_progress=False,  # milliseconds of work; its bars were the noisiest lines of a fit
    )
    tokenizer.train_from_iterator([*texts, SUBGOAL_PROMPT], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token=PAD, eos_token=EOS
    )
    fast.add_special_tokens(
        {"additional_special_tokens": [IMAGE_TOKEN, IMAGE_AROUND, IMAGE_GLOBAL]}
    )
    fast.add_tokens([action_token(i) for i in range(num_action_tokens)], special_tokens=True)
    return fast


@dataclass
class VLMOutput:
    """Losses (scalars) and prefix features (B, L, D) with their mask (B, L), True = real token."""

    lang_loss: torch.Tensor
    fast_loss: torch.Tensor | None
    features: torch.Tensor
    feature_mask: torch.Tensor


class HighLevelVLM(nn.Module, ConfigMixin):
    """See the module docstring. Config is this signature but the tokenizer (`.config.x`), saved
    beside the backbone's folder by `save_pretrained` as `vlm_config.json` (diffusers'
    `ConfigMixin`); the tokenizer is saved with the backbone.

    Args:
        tokenizer: the text tokenizer (from `train_tokenizer`, or a pretrained one); a keyword.
        backbone: hub name or directory of a pretrained Idefics3/SmolVLM; None builds the tiny
            config below, with fresh weights.
        num_action_tokens: FAST vocabulary size; `<act_i>` tokens are added when missing.
        max_subgoal_tokens: generation budget for a subgoal.
        image_size .. num_heads: the tiny config (ignored with a pretrained backbone).
        cameras: how many of the given cameras (the first ones) the VLM reads; None: all.
            The action expert reads every camera with its own CNN; the subgoal is a coarser
            judgement, and each camera costs a VLM its image tokens.
    """

    # Modules a per-embodiment LoRA adapts by default (regex on names inside this expert): the
    # language model's attention and MLPs, the vision encoder's attention and the connector.
    LORA_TARGETS = (
        r"backbone\.model\.(text_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.\w+_proj)"
        r"|vision_model\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj"
        r"|connector\.modality_projection\.proj)"
    )

    config_name = "vlm_config.json"
    ignore_for_config = ["tokenizer"]

    @register_to_config
    def __init__(
        self,
        backbone: str | None = None,
        num_action_tokens: int = 512,
        max_subgoal_tokens: int = 16,
        image_size: int = 64,
        patch_size: int = 8,
        scale_factor: int = 2,
        text_hidden: int = 256,
        text_layers: int = 4,
        vision_hidden: int = 128,
        vision_layers: int = 2,
        num_heads: int = 4,
        cameras: int | None = 1,
        *,
        tokenizer: PreTrainedTokenizerFast,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:  # many pretrained chat tokenizers define none
            tokenizer.pad_token = tokenizer.eos_token
        missing = [
            action_token(i)
            for i in range(num_action_tokens)
            if action_token(i) not in tokenizer.get_vocab()
        ]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        if backbone is None:
            text = dict(
                model_type="llama",
                vocab_size=len(tokenizer),
                hidden_size=text_hidden,
                intermediate_size=2 * text_hidden,
                num_hidden_layers=text_layers,
                num_attention_heads=num_heads,
                num_key_value_heads=num_heads,
                max_position_embeddings=512,
                tie_word_embeddings=True,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            vision = dict(
                hidden_size=vision_hidden,
                intermediate_size=2 * vision_hidden,
                num_hidden_layers=vision_layers,
                num_attention_heads=num_heads,
                image_size=image_size,
                patch_size=patch_size,
            )
            config = Idefics3Config(
                text_config=text,
                vision_config=vision,
                scale_factor=scale_factor,
                image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            )
            self.backbone = Idefics3ForConditionalGeneration(config)
        else:
            self.backbone = Idefics3ForConditionalGeneration.from_pretrained(backbone)
            if self.backbone.get_input_embeddings().num_embeddings < len(tokenizer):
                self.backbone.resize_token_embeddings(len(tokenizer))
        vision = self.backbone.config.vision_config
        self.image_size = vision.image_size
        self.image_seq_len = (vision.image_size // vision.patch_size) ** 2 // (
            self.backbone.config.scale_factor**2
        )
        ids = tokenizer.convert_tokens_to_ids([action_token(i) for i in range(num_action_tokens)])
        self.register_buffer("action_ids", torch.tensor(ids), persistent=False)
        special = [IMAGE_TOKEN, IMAGE_AROUND, IMAGE_GLOBAL, PAD]
        # Subgoals are text: generation may never emit image, padding or action tokens.
        self._suppress = [*tokenizer.convert_tokens_to_ids(special), *ids]

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.text_config.hidden_size

    # 1. inputs -------------------------------------------------------------------------------
    def _cameras(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, S, S) -> the cameras this VLM reads, (B, n, 3, S, S)."""
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be (B, N, 3, H, W), got {tuple(images.shape)}")
        return images[:, : self.config.cameras]

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """(B, n, 3, S, S) in [0, 1] -> the backbone's pixel values (B, n, 3, s, s)."""
        b = images.shape[0]
        x = rearrange(images, "b n c h w -> (b n) c h w")
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear")
        x = (x - 0.5) / 0.5  # Idefics3's image mean and std are 0.5
        return rearrange(x, "(b n) c h w -> b n c h w", b=b)

    def _image_block(self, num_cameras: int) -> str:
        one = IMAGE_AROUND + IMAGE_GLOBAL + IMAGE_TOKEN * self.image_seq_len + IMAGE_AROUND
        return one * num_cameras

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _pad(self, sequences: list[list[int]], left: bool = False):
        """Token lists -> ids (B, L) and attention mask (B, L)."""
        length = max(map(len, sequences))
        ids = torch.full((len(sequences), length), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(sequences), length), dtype=torch.bool)
        for i, seq in enumerate(sequences):
            span = slice(length - len(seq), length) if left else slice(0, len(seq))
            ids[i, span], mask[i, span] = torch.tensor(seq), True
        return ids.to(self.action_ids.device), mask.to(self.action_ids.device)

    def _prompts(self, num_cameras: int, instructions: list[str]) -> list[list[int]]:
        """[images, instruction, "Subgoal:"] token ids per sample; an instruction too long for
        the backbone's positions to also hold a subgoal is refused, not truncated: a cut
        instruction can mean another task."""
        block = self._image_block(num_cameras)
        prompts = [self._ids(block + text + SUBGOAL_PROMPT) for text in instructions]
        positions = self.backbone.config.text_config.max_position_embeddings
        room = positions - self.config.max_subgoal_tokens - 1  # the subgoal and its <eos>
        for text, prompt in zip(instructions, prompts, strict=True):
            if len(prompt) > room:
                overhead = len(self._ids(block + SUBGOAL_PROMPT))
                raise ValueError(
                    f"instruction: {len(prompt) - overhead} tokens ({len(text)} characters), but "
                    f"this VLM has room for {room - overhead} ({positions} positions hold the "
                    "camera images, the instruction and a subgoal); shorten it"
                )
        return prompts

    # 2. training ------------------------------------------------------------------------------
    def _hidden(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden layer (B, L, D) of token ids (B, L) with their mask (B, L); images
        (B, n, 3, S, S) are the cameras this VLM reads."""
        out = self.backbone.model(
            input_ids=ids, attention_mask=mask.long(), pixel_values=self._pixels(images)
        )
        return out.last_hidden_state

    def _prefixes(self, prompts: list[list[int]], subgoals: list[str]) -> list[list[int]]:
        """[images, instruction, "Subgoal:", subgoal, <eos>] per sample, from the prompts
        (`_prompts`): the prefix the lower tiers read."""
        eos = self.tokenizer.eos_token_id
        return [
            [*prompt, *self._ids(" " + subgoal), eos]
            for prompt, subgoal in zip(prompts, subgoals, strict=True)
        ]

    def forward(
        self,
        images: torch.Tensor,
        instructions: list[str],
        subgoals: list[str],
        fast_tokens: list[list[int]] | None = None,
    ) -> VLMOutput:
        """Teacher-forced pass: losses on subgoal (and FAST) tokens, and prefix features."""
        eos = self.tokenizer.eos_token_id
        images = self._cameras(images)
        prompts = self._prompts(images.shape[1], instructions)
        prefixes = self._prefixes(prompts, subgoals)
        sequences, spans = [], []
        for i, (prompt, prefix) in enumerate(zip(prompts, prefixes, strict=True)):
            fast = [] if fast_tokens is None else [*self.action_ids[fast_tokens[i]].tolist(), eos]
            sequences.append(prefix + fast)
            spans.append((len(prompt), len(prefix), len(prefix) + len(fast)))
        ids, mask = self._pad(sequences)
        hidden = self._hidden(images, ids, mask)
        lang_target = torch.full_like(ids, -100)
        fast_target = torch.full_like(ids, -100)
        feature_mask = torch.zeros_like(mask)
        for i, (start, mid, end) in enumerate(spans):
            lang_target[i, start:mid] = ids[i, start:mid]
            fast_target[i, mid:end] = ids[i, mid:end]
            feature_mask[i, :mid] = True
        logits = self.backbone.lm_head(hidden[:, :-1])  # position j predicts token j + 1

        def next_token_loss(target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.transpose(1, 2).float(), target[:, 1:], ignore_index=-100)

        return VLMOutput(
            lang_loss=next_token_loss(lang_target),
            fast_loss=None if fast_tokens is None else next_token_loss(fast_target),
            features=hidden,
            feature_mask=feature_mask,
        )

    # 3. inference -----------------------------------------------------------------------------
    @torch.no_grad()  # the caller chooses inference_mode (planners): one kind of tensor
    def propose_subgoal(
        self, images: torch.Tensor, instructions: list[str], drafts: tuple[str, ...] = ()
    ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Greedy generation of one subgoal per sample (at most `max_subgoal_tokens` tokens), and
        the prefix features of [images, instruction, subgoal, <eos>] from the same pass: each
        generated token is fed back through the key-value cache, so its last hidden state is
        computed once, and no second pass over the prefix is needed.

        `drafts` (one sample only): texts the subgoal is likely to repeat, e.g. the subgoal in
        force and the instruction. Once the generated tokens begin one of them, its remaining
        tokens go through the backbone in one pass, and each is kept only while it is the
        greedy choice after the ones before it (speculative decoding with the draft as the
        guess): the same subgoal as without drafts, up to float rounding of the longer pass, in
        fewer backbone calls when a draft is right.
        Returns (subgoals, features (B, L, D), mask (B, L)); rows are left-padded, and padded
        positions hold zeros."""
        images = self._cameras(images)
        if drafts and len(instructions) != 1:
            raise ValueError(f"drafts are for one sample, got {len(instructions)} instructions")
        ids, mask = self._pad(self._prompts(images.shape[1], instructions), left=True)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        guesses = [[*self._ids(" " + text), eos] for text in drafts]
        # the positions a right-padded training prefix has: 0 at each row's first real token
        position = (mask.long().cumsum(1) - 1).clamp_min(0)
        cache = DynamicCache()
        hidden = self.backbone.model(
            input_ids=ids,
            attention_mask=mask.long(),
            position_ids=position,
            pixel_values=self._pixels(images),
            **{_CACHE: cache},
            use_cache=True,
        ).last_hidden_state
        states, masks, generated = [hidden], [mask], []
        done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        position, budget = position[:, -1:], self.config.max_subgoal_tokens
        said: list[int] = []  # the ids kept so far, where drafts are matched to them
        token = self._greedy(hidden[:, -1])
        while True:
            fed = []  # with drafts (one sample): the pass's ids, the token and a draft's rest
            if drafts:
                so_far = [*said, *token.tolist()]
                n = len(so_far)
                guess = next((g[n:] for g in guesses if g[:n] == so_far), [])
                room = max(budget - len(generated) - 1, 0)  # greedy tokens stay within budget
                fed = [so_far[-1], *guess[:room]]
            rows = torch.tensor([fed[1:]] * len(ids), dtype=torch.long, device=token.device)
            block = torch.where(done[:, None], pad, torch.cat([token[:, None], rows], 1))
            length = block.shape[1]
            hidden = self.backbone.model(
                input_ids=block,
                attention_mask=torch.cat([*masks, (~done[:, None]).expand(-1, length)], 1).long(),
                position_ids=position + torch.arange(1, length + 1, device=position.device),
                **{_CACHE: cache},
                use_cache=True,
            ).last_hidden_state
            choices = self._greedy(hidden)  # (B, length): the greedy token after each
            kept = 1  # the chosen token, then each guess the greedy choice agrees with, to <eos>
            if length > 1:  # one read of the pass's choices
                chosen = choices[0].tolist()
                while kept < length and fed[kept - 1] != eos and chosen[kept - 1] == fed[kept]:
                    kept += 1
            said += fed[:kept]
            if kept < length:  # the cache holds the rejected guesses: drop them (a negative
                cache.crop(kept - length)  # count, as every transformers version reads it)
            for i in range(kept):
                generated.append(block[:, i])
                masks.append(~done[:, None])
                done = done | (block[:, i] == eos)
            states.append(hidden[:, :kept])
            position = position + kept
            if done.all():
                break
            token = torch.where(done, pad, choices[:, kept - 1])
            if len(generated) == budget:
                token = torch.full_like(token, eos)  # a full budget: close it
        features, mask = torch.cat(states, 1), torch.cat(masks, 1)
        tokens = torch.stack(generated, 1)
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        return [t.strip() for t in texts], features * mask[..., None], mask

    def _greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """The greedy next token (...) after hidden states (..., D); never a suppressed one."""
        logits = self.backbone.lm_head(hidden).float()
        logits[..., self._suppress] = -torch.inf
        return logits.argmax(-1)

    @torch.no_grad()
    def prefix_features(
        self, images: torch.Tensor, instructions: list[str], subgoals: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, L, D) and mask (B, L) of [images, instruction, subgoal] for the experts
        below: the teacher-forced `forward`'s features, from the backbone's last hidden layer
        alone (no language-model head, no loss)."""
        images = self._cameras(images)
        prompts = self._prompts(images.shape[1], instructions)
        ids, mask = self._pad(self._prefixes(prompts, subgoals))
        return self._hidden(images, ids, mask), mask

    # 4. persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        with _no_progress_bars():
            self.backbone.save_pretrained(directory / "backbone")
        self.tokenizer.save_pretrained(directory / "backbone")
        self.save_config(directory)  # `backbone`: its source as first given (None: built here)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> HighLevelVLM:
        directory = Path(directory)
        backbone = str(directory / "backbone")
        saved = cls.load_config(directory)
        # from_config would drop the tokenizer (not config), so the config is read as it reads it
        # and the tokenizer joined to it here
        config, _, _ = cls.extract_init_dict(saved, backbone=backbone)
        tokenizer = AutoTokenizer.from_pretrained(backbone)
        with _no_progress_bars():
            model = cls(**config, tokenizer=tokenizer)
        model.register_to_config(backbone=saved.get("backbone"))  # its source, as saved
        return model


@contextmanager
def _no_progress_bars():
    """transformers' progress bars off for the block: reading or writing a policy's own backbone
    on local disk takes a moment, and its bars would be the loudest lines of every command. (A
    backbone named by hub id and downloaded in `__init__` keeps them.)"""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
