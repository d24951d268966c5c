"""HybridPlanner: runs the hierarchy on a robot, one observation at a time.

    obs + instruction
      -> VLM: language subgoal (generated; reused while the schedule allows) + prefix features
      -> world model: K candidate visual subgoals, one batched call -> value scores -> best one
      -> action expert: action chunk, unnormalised to the robot's units and clipped to its limits
`act` keeps a queue: it executes `execute_steps` of each chunk of H, then plans again.

Ablation switches on the same trained policy: `num_candidates=1` (nothing to score),
`visual_subgoal=False` (the action expert runs flat, VLA-style, without a visual subgoal; the
world model still imagines each language subgoal's target, so that the refresh rule is the same),
`language_subgoal=False` (the instruction stands in for the subgoal). Training drops the visual
subgoal and the language subgoal for a share of samples so that these modes stay valid.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from hybrid.adapters import EmbodimentAdapters
from hybrid.data.windows import resize_frames
from hybrid.policy import HybridPolicy
from hybrid.types import Observation, Plan
from planners.schedule import RefreshSchedule, latent_distance
from planners.scoring import Scorer, ValueScorer, best_of_k

STATE_BOUND = 1e4  # normalised units; see HybridPlanner._state


def _finite(tier: str, x: torch.Tensor) -> torch.Tensor:
    """x, or a FloatingPointError naming the tier that produced non-finite values."""
    if not torch.isfinite(x).all():
        raise FloatingPointError(
            f"the {tier} produced non-finite values (NaN or inf); its weights may be corrupt: "
            "re-export the policy"
        )
    return x


@contextmanager
def _timed(ms: dict[str, float], name: str):
    """Add the milliseconds spent in the block to ms[name]."""
    start = time.perf_counter()
    yield
    ms[name] = ms.get(name, 0.0) + (time.perf_counter() - start) * 1e3


class HybridPlanner:
    """See the module docstring.

    Args:
        policy: a trained HybridPolicy.
        embodiment: which of the policy's robots this is; default its only one.
        adapters: the policy's per-robot LoRA adapters (`from_pretrained` makes them), for
            `set_embodiment`; None serves only the robots the policy already has.
        num_candidates: K visual subgoals imagined and scored per refresh.
        imagine_steps, action_steps: flow-matching steps of the world model and the action expert.
        execute_steps: actions of each chunk executed before planning again (<= H).
        language_subgoal, visual_subgoal: the ablation switches.
        schedule: when the language and visual subgoals are refreshed.
        scorer: scores candidates; default the value head.
        seed: seeds the flow noise, so a planner's rollouts are reproducible.
    """

    def __init__(
        self,
        policy: HybridPolicy,
        embodiment: str | None = None,
        num_candidates: int = 8,
        imagine_steps: int = 4,
        action_steps: int = 10,
        execute_steps: int = 4,
        language_subgoal: bool = True,
        visual_subgoal: bool = True,
        schedule: RefreshSchedule | None = None,
        scorer: Scorer | None = None,
        decode_candidates: bool = True,
        seed: int = 0,
        adapters: EmbodimentAdapters | None = None,
    ):
        self.policy = policy.eval()
        self.adapters = adapters or EmbodimentAdapters(policy)
        names = list(policy.embodiments)
        if embodiment is None and len(names) != 1:
            raise ValueError(f"this policy knows several embodiments {names}; name one")
        self.embodiment = embodiment or names[0]
        if self.embodiment not in policy.embodiments:
            raise ValueError(f"unknown embodiment {self.embodiment!r}; this policy knows {names}")
        self.adapters.activate(self.embodiment)
        horizon = policy.action_expert.config.chunk_size
        if not 1 <= execute_steps <= horizon:
            raise ValueError(f"execute_steps must be in [1, {horizon}], got {execute_steps}")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        self.num_candidates, self.imagine_steps = num_candidates, imagine_steps
        self.action_steps, self.execute_steps = action_steps, execute_steps
        self.language_subgoal, self.visual_subgoal = language_subgoal, visual_subgoal
        self.schedule = schedule or RefreshSchedule()
        self.scorer = scorer or ValueScorer(policy.world_model)
        self.decode_candidates = decode_candidates
        self.image_size = policy.frame_size
        self.seed = seed
        self.reset()

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, embodiment: str | None = None, device: str = "cpu", **kwargs
    ) -> HybridPlanner:
        """Load the policy in `directory`; `embodiment` None is its first robot. A robot with an
        adapter under `<directory>/adapters/` has it loaded and activated."""
        policy = HybridPolicy.from_pretrained(directory)
        adapters = EmbodimentAdapters(policy, directory)
        embodiment = embodiment or adapters.base_embodiments[0]
        adapters.activate(embodiment)
        return cls(policy.to(device), embodiment, adapters=adapters, **kwargs)

    def set_embodiment(self, name: str) -> None:
        """Switch robots without reloading the base: activates `name`'s adapter (loaded on first
        use) or, for a robot of the base, disables every adapter. Starts a new episode."""
        self.adapters.activate(name)
        self.policy.to(self.device).eval()
        self.embodiment = name
        self.reset()

    @property
    def spec(self):
        return self.policy.embodiments[self.embodiment]

    @property
    def device(self) -> torch.device:
        return self.policy.action_expert.device

    def reset(self) -> None:
        """Forget the episode: cached subgoals, the action queue, the noise generator."""
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self.queue: deque[np.ndarray] = deque()
        self.subgoal: str | None = None
        self.chunks_since_subgoal: int | None = None
        self.visual_latent: torch.Tensor | None = None  # (1, C, h, w), the chosen candidate
        # the language subgoal's visual target (1, C, h, w) and its distance when it was set
        self.target: tuple[torch.Tensor, float] | None = None
        self.last_plan: Plan | None = None

    # 1. input checks ------------------------------------------------------------------------------
    def _check(self, obs: Observation, instruction: str) -> torch.Tensor:
        """Validated images as (1, N, 3, S, S) in [0, 1]."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"instruction: expected a non-empty string, got {instruction!r}")
        cameras = self.spec.cameras or sorted(obs.images)
        frames = []
        for key in cameras:
            if key not in obs.images:
                raise ValueError(f"images: expected camera {key!r}, got {sorted(obs.images)}")
            image = np.asarray(obs.images[key])
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"images[{key!r}]: expected (H, W, 3) uint8, got {image.shape} {image.dtype}"
                )
            if image.shape[0] == 0 or image.shape[1] == 0:
                raise ValueError(f"images[{key!r}]: expected a non-empty frame, got {image.shape}")
            # Resized exactly as the training windows were (area averaging), not by the models.
            frames.append(torch.from_numpy(resize_frames(image[None], self.image_size)[0]))
        state = np.asarray(obs.state, dtype=np.float64)
        if state.shape != (self.spec.state_dim,):
            raise ValueError(f"state: expected shape ({self.spec.state_dim},), got {state.shape}")
        if not np.isfinite(state).all():
            raise ValueError(f"state: expected finite values, got {state.tolist()}")
        if np.abs(state).max() > np.finfo(np.float32).max:  # the models compute in float32
            raise ValueError(
                f"state: values beyond float32's range ({np.finfo(np.float32).max:.2e}), got "
                f"{state.tolist()}"
            )
        images = rearrange(torch.stack(frames), "n h w c -> 1 n c h w").float() / 255.0
        return images.to(self.device)

    def _state(self, obs: Observation) -> torch.Tensor:
        """Normalised, padded state (1, max_state_dim); a value more than STATE_BOUND normalised
        units (standard deviations, by default) from the training data is refused, in any
        dimension that varied there: no network extrapolates that far, and beyond it float32
        arithmetic can overflow into NaN."""
        normalizer = self.policy.normalizers[self.embodiment]
        raw = np.asarray(obs.state, np.float32)
        deviation = normalizer.deviation("observation.state", raw)
        if not deviation <= STATE_BOUND:
            raise ValueError(
                f"state: {raw.tolist()} lies {deviation:.3g} normalised units from the training "
                f"data (bound {STATE_BOUND:g}); is it in the robot's units ({self.embodiment})?"
            )
        state = normalizer.normalize("observation.state", raw)
        state = torch.as_tensor(state, dtype=torch.float32, device=self.device)[None]
        return F.pad(state, (0, self.policy.action_expert.config.max_state_dim - state.shape[1]))

    # 2. planning ----------------------------------------------------------------------------------
    @torch.no_grad()
    def plan(self, obs: Observation, instruction: str) -> Plan:
        """Run the tiers the schedule calls for on this observation; returns the full Plan."""
        images = self._check(obs, instruction)
        state = self._state(obs)
        timings_ms: dict[str, float] = {}
        timer, policy, wm = partial(_timed, timings_ms), self.policy, self.policy.world_model

        # 1. is the language subgoal done? Its visual target reached, or its time out.
        with timer("encode"):
            current = wm.encode(images)  # (1, C, h, w)
        reached = self.target is not None and self.schedule.reached(
            float(latent_distance(current, self.target[0])), self.target[1]
        )
        refresh = self.schedule.subgoal_due(self.chunks_since_subgoal, reached)
        if refresh:
            if self.language_subgoal:
                with timer("subgoal"):
                    self.subgoal = policy.vlm.propose_subgoal(images, [instruction])[0]
            else:
                self.subgoal = instruction
            self.chunks_since_subgoal = 0
        with timer("features"):
            features, mask = policy.vlm.prefix_features(images, [instruction], [self.subgoal])
            _finite("VLM", features)

        # 2. imagine K futures and keep the best; a new subgoal also takes it as its target.
        latents = np.zeros((0,), np.float32)
        candidate_images = np.zeros((0,), np.uint8)
        scores = np.zeros((0,), np.float32)
        chosen = 0
        if self.schedule.visual_due(refresh) and (self.visual_subgoal or refresh):
            with timer("imagine"):
                candidates = wm.imagine(
                    current,
                    features,
                    mask,
                    self.num_candidates,
                    self.imagine_steps,
                    generator=self.generator,
                )
                _finite("world model", candidates)
            with timer("score"):
                candidate_scores = _finite("value head", self.scorer(candidates, features, mask))
                chosen = int(best_of_k(candidate_scores)[0])
            self.visual_latent = candidates[:, chosen]
            if refresh:
                start = float(latent_distance(current, self.visual_latent))
                self.target = (self.visual_latent, start)
            latents, scores = candidates[0].cpu().numpy(), candidate_scores[0].cpu().numpy()
            if self.decode_candidates:
                with timer("decode"):
                    decoded = wm.decode(candidates[0])  # (K, 3, S, S) in [0, 1]
                    candidate_images = (
                        rearrange(decoded, "k c h w -> k h w c")
                        .mul(255)
                        .round()
                        .byte()
                        .cpu()
                        .numpy()
                    )

        # 3. the action chunk, in the robot's units
        with timer("action"):
            ids = policy.embodiment_ids([self.embodiment])
            normalised = policy.action_expert.sample(
                state,
                ids,
                features,
                mask,
                images,
                self.visual_latent if self.visual_subgoal else None,
                policy.dim_mask([self.embodiment]),
                steps=self.action_steps,
                generator=self.generator,
            )[0, :, : self.spec.action_dim]
            _finite("action expert", normalised)
            actions = policy.normalizers[self.embodiment].unnormalize(
                "action", normalised.float().cpu().numpy()
            )
            if self.spec.action_low:
                actions = np.clip(actions, self.spec.action_low, self.spec.action_high)
        self.chunks_since_subgoal += 1
        self.last_plan = Plan(
            subgoal=self.subgoal,
            candidate_latents=latents,
            candidate_images=candidate_images,
            scores=scores,
            chosen=chosen,
            actions=actions.astype(np.float32),
            timings_ms=timings_ms,
            subgoal_refreshed=refresh,
        )
        return self.last_plan

    def act(self, obs: Observation, instruction: str) -> np.ndarray:
        """The next action (action_dim,): from the queue, planning a new chunk when it is empty."""
        if not self.queue:
            plan = self.plan(obs, instruction)
            self.queue.extend(plan.actions[: self.execute_steps])
        return self.queue.popleft()
