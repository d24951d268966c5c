"""HybridPlanner: runs the hierarchy on a robot, one observation at a time.

    obs + instruction
      -> VLM: language subgoal (generated; reused while the schedule allows) + prefix features
         (with each new subgoal by default, or every chunk: `RefreshSchedule.features`)
      -> world model: K candidate visual subgoals, one batched call -> value scores -> one chosen
         (the best score by default, or by the candidates' consensus: `planners/scoring.py`)
         (with each new subgoal by default, or every chunk: `RefreshSchedule.visual`)
      -> action expert: action chunk, unnormalised to the robot's units and clipped to its limits
(A joint policy, `configs/formulation/joint.yaml`, draws K (chunk, future) pairs from its action
expert in one call and executes the chunk of the best-scored future; a `latent_frame_actions`
policy draws them from its world model alike; a `latent_plan` policy draws plan tokens from its
prior, which its action expert reads in place of a visual subgoal, and imagines nothing.)
`act` keeps a queue: it executes `execute_steps` of each chunk of H, then plans again. With
`async_delay` d > 0 it plans the next chunk in a background thread while the robot executes the
last d actions of the queue: the plan starts from the observation of the step at which d actions
are left, those d actions are committed (the new chunk is inpainted to continue them and returns
them unchanged), and the chunk's next `execute_steps` actions follow them. Off (d = 0), every plan
runs when the queue is empty, from that step's observation, and rollouts are deterministic under
the seed.

Ablation switches on the same trained policy: `num_candidates=1` (nothing to score),
`visual_subgoal=False` (the action expert runs flat, VLA-style, without a visual subgoal; where
the refresh rule checks targets, the world model still imagines each language subgoal's target,
so that the rule is the same),
`language_subgoal=False` (the instruction stands in for the subgoal); both off is the flat VLA
path, where nothing is encoded or imagined. Training drops the visual subgoal and the language
subgoal for a share of samples so that these modes stay valid. The world model's noise and the
action expert's come from two generators, both seeded from the episode's seed (`reset(seed)`), so
a switch that imagines more or fewer futures leaves every action chunk's noise as it was: the
modes' rollouts are paired draws. `hybrid eval` seeds each episode apart, so its episodes draw
independent noise.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from hybrid.adapters import EmbodimentAdapters
from hybrid.data.windows import resize_frames
from hybrid.policy import HybridPolicy
from hybrid.types import Observation, Plan
from planners.compiled import CompiledInference
from planners.schedule import RefreshSchedule, latent_distance
from planners.scoring import CHOICES, choose

DECODE = ("all", "chosen", "none")  # which imagined futures `plan` decodes to images


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
        choice: how one of the K is chosen (`planners/scoring.py`): "value" (the value head's
            best), "medoid" (the candidate nearest the others) or "central" (the value head's
            best among the half nearest the others).
        imagine_steps, action_steps: flow-matching (Euler) steps of the world model and the action
            expert; 1 and 3 cost no measured success against 4 and 10 (README, "Inference cost").
        execute_steps: actions of each chunk executed before planning again (<= H).
        language_subgoal, visual_subgoal: the ablation switches; visual_subgoal None is on
            where the policy has a world model, off where it has none (the flat VLA).
        schedule: when the language subgoal, the visual subgoal and the VLM's features are
            refreshed (`planners/schedule.py`).
        decode: which imagined futures each plan decodes to images: "all" K
            (`Plan.candidate_images`), "chosen" (`Plan.chosen_image` alone, what a video shows)
            or "none" (nothing reads the pixels).
        async_delay: d > 0 plans each chunk in the background, d steps ahead (module docstring);
            0 plans synchronously.
        seed: seeds the flow noise (the world model's and the action expert's, each its own
            generator) of every episode that `reset` gives no seed of its own, so a planner's
            rollouts are reproducible.
        compile: a `torch.compile` backend ("inductor") for the policy's inference API
            (`planners/compiled.py`): faster chunks after minutes of compiling; None runs eager.
    """

    def __init__(
        self,
        policy: HybridPolicy,
        embodiment: str | None = None,
        num_candidates: int = 8,
        choice: str = "value",
        imagine_steps: int = 1,
        action_steps: int = 3,
        execute_steps: int = 4,
        language_subgoal: bool = True,
        visual_subgoal: bool | None = None,
        schedule: RefreshSchedule | None = None,
        decode: str = "all",
        async_delay: int = 0,
        seed: int = 0,
        adapters: EmbodimentAdapters | None = None,
        compile: str | None = None,
    ):
        self.policy = policy.eval()
        self.inference = policy if compile is None else CompiledInference(policy, compile)
        self.adapters = adapters or EmbodimentAdapters(policy)
        names = list(policy.embodiments)
        if embodiment is None and len(names) != 1:
            raise ValueError(f"this policy knows several embodiments {names}; name one")
        self.embodiment = embodiment or names[0]
        if self.embodiment not in policy.embodiments:
            raise ValueError(f"unknown embodiment {self.embodiment!r}; this policy knows {names}")
        self.adapters.activate(self.embodiment)
        horizon = policy.action_config.chunk_size
        if not 1 <= execute_steps <= horizon:
            raise ValueError(f"execute_steps must be in [1, {horizon}], got {execute_steps}")
        if not 0 <= async_delay <= min(execute_steps, horizon - execute_steps):
            raise ValueError(
                f"async_delay must be in [0, {min(execute_steps, horizon - execute_steps)}] "
                f"(at most execute_steps {execute_steps}, and room for execute_steps more in a "
                f"chunk of {horizon}), got {async_delay}"
            )
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        self.num_candidates, self.choice, self.imagine_steps = num_candidates, choice, imagine_steps
        self.action_steps, self.execute_steps = action_steps, execute_steps
        has_world_model = policy.world_model is not None
        if visual_subgoal and not has_world_model:
            raise ValueError(
                "visual_subgoal: this policy has no world model (the flat VLA), so there is no "
                "visual subgoal to imagine; plan with visual_subgoal=False"
            )
        if visual_subgoal is False and policy.joint:
            raise ValueError(
                "visual_subgoal=False: this policy denoises its actions with their future (the "
                "joint or latent_frame_actions formulation) and cannot act without it; plan with "
                "it on"
            )
        self.language_subgoal = language_subgoal
        self.visual_subgoal = has_world_model if visual_subgoal is None else visual_subgoal
        self.schedule = schedule or RefreshSchedule()
        if decode not in DECODE:
            raise ValueError(f"decode must be one of {DECODE}, got {decode!r}")
        self.decode = decode
        self.async_delay = async_delay
        self._background = ThreadPoolExecutor(max_workers=1) if async_delay else None
        self.pending: Future | None = None
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
        return self.policy.device

    def reset(self, seed: int | None = None) -> None:
        """Forget the episode: cached subgoals, the action queue, the noise generators. A plan still
        running in the background is waited for and dropped.

        seed: this episode's noise (default: the planner's `seed`). An evaluation gives each
            episode its own, so that its episodes draw independent noise, as their success
            rate's interval assumes, and two modes still draw the same noise on the same episode.
        """
        if getattr(self, "pending", None) is not None:
            self.pending.result()
            self.pending = None
        seed = self.seed if seed is None else seed
        # imagination's noise apart from the actions': K candidates draw K times the noise of one
        world_seed, action_seed = np.random.SeedSequence([seed, 1]).generate_state(2)
        self.world_generator = torch.Generator(device=self.device).manual_seed(int(world_seed))
        self.action_generator = torch.Generator(device=self.device).manual_seed(int(action_seed))
        self.queue: deque[np.ndarray] = deque()
        self.subgoal: str | None = None
        self.features: tuple[torch.Tensor, torch.Tensor] | None = None  # the VLM's, and mask
        self.chunks_since_subgoal: int | None = None
        # chunks since the VLM's features and the visual subgoal the expert reads were made
        self.plan_ages = {"features": 0, "visual": 0}
        self.visual_latent: torch.Tensor | None = None  # (1, C, h, w), the chosen candidate
        # the language subgoal's visual target (1, C, h, w) and its distance when it was set
        self.target: tuple[torch.Tensor, float] | None = None
        self.last_plan: Plan | None = None  # the newest plan made
        self.executing: Plan | None = None  # the plan whose actions the queue holds
        self.plans = 0  # plans whose actions entered the queue this episode

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

    # 2. planning ----------------------------------------------------------------------------------
    def plan(self, obs: Observation, instruction: str, committed: np.ndarray | None = None) -> Plan:
        """Run the tiers the schedule calls for on this observation; returns the full Plan.
        `committed` (d, action_dim): actions already sent for this chunk's first d steps, which
        the chunk continues (`HybridPolicy.sample_actions`) and returns unchanged. Runs under
        `torch.inference_mode`, or `torch.no_grad` when compiled (torch.compile's guards on NumPy
        arguments fail on inference tensors). The policy's inference API, the subgoal's
        generation included, leaves the mode to this caller: a compiled function that met both
        kinds of tensor would compile twice."""
        compiled = self.inference is not self.policy
        with torch.no_grad() if compiled else torch.inference_mode():
            return self._plan(obs, instruction, committed)

    def _plan(self, obs: Observation, instruction: str, committed: np.ndarray | None) -> Plan:
        images = self._check(obs, instruction)
        state = self.policy.normalize_state(np.asarray(obs.state)[None], self.embodiment)
        timings_ms: dict[str, float] = {}
        timer, policy = partial(_timed, timings_ms), self.inference

        # 1. the language subgoal: a new one when its visual target is reached, or its time is out
        # Flat (no language and no visual subgoal) is a VLA: nothing is imagined or encoded; a
        # policy without a world model encodes and imagines nothing either.
        flat = not (self.language_subgoal or self.visual_subgoal)
        latents = not flat and policy.world_model is not None  # whether anything reads them
        # the current frame's latent (1, C, h, w): on every chunk where the refresh rule checks
        # the subgoal's visual target or the formulation reads it every chunk, else only where
        # the world model imagines (below)
        current = None
        every_chunk = policy.joint or policy.latent_plan is not None or policy.reads_world_features
        check = self.schedule.checks_reached and self.target is not None
        if latents and (check or every_chunk):
            with timer("encode"):
                current = policy.encode_frames(images)
        reached = self._reached(current)
        refresh = self.schedule.subgoal_due(self.chunks_since_subgoal, reached)
        made = set()  # what this chunk makes anew of what the action expert reads
        # 2. one VLM pass: the generation of a new subgoal gives its features as well
        if refresh and self.language_subgoal:
            with timer("subgoal"):
                # the subgoal in force and the instruction as guesses: a new subgoal often
                # repeats one of them, and a right guess is checked in one pass, not one per
                # token (guesses from the episode alone, so that a reset replays it exactly)
                drafts = tuple(dict.fromkeys(t for t in (self.subgoal, instruction) if t))
                (self.subgoal,), features, mask = policy.propose_subgoals(
                    images, [instruction], drafts
                )
                self.features = (features, mask)
            made.add("features")
        elif flat or self.schedule.features_due(refresh):  # a VLA has no subgoal rate
            self.subgoal = instruction if refresh else self.subgoal
            with timer("features"):
                self.features = policy.prefix_features(images, [instruction], [self.subgoal])
            made.add("features")
        features, mask = self.features  # else those of the frame where the subgoal was set
        if refresh:
            self.chunks_since_subgoal = 0
        # 3. imagine K futures and keep the best; a new subgoal also takes it as its target
        candidate_latents = candidate_images = scores = np.zeros((0,), np.float32)
        chosen, candidates, chunks, chosen_image = 0, None, None, None
        committed = None if committed is None else np.asarray(committed, np.float32)[None]
        scene = None if obs.scene is None else np.asarray(obs.scene, np.float32)[None]
        # without a visual subgoal the world model imagines only a target for the refresh rule
        target = refresh and self.schedule.checks_reached
        due = (self.visual_subgoal or target) and self.schedule.visual_due(refresh)
        if latents and due and current is None:
            with timer("encode"):
                current = policy.encode_frames(images)
        # a policy that reads the world model's features (representation) imagines nothing: one
        # pass of the world model gives what its action expert reads, every chunk
        if policy.joint:  # K (chunk, future) pairs denoised together
            with timer("joint"):
                chunks, candidates, candidate_scores = policy.imagine_and_act(
                    state,
                    self.embodiment,
                    features,
                    mask,
                    images,
                    self.num_candidates,
                    self.action_steps,
                    self.world_generator,
                    committed,
                    scene,
                    current,
                )
        elif current is not None and policy.latent_plan is not None:
            if self.visual_subgoal:  # a plan from the prior, every chunk; nothing to score
                with timer("plan"):
                    self.visual_latent = policy.sample_plan(
                        current, state, features, mask, self.world_generator
                    )
                made.add("visual")
        elif current is not None and policy.reads_world_features:
            if self.visual_subgoal:
                with timer("world_features"):
                    self.visual_latent = policy.world_features(current, features, mask)
                made.add("visual")
        elif current is not None and due:
            with timer("imagine"):
                candidates, candidate_scores = policy.imagine(
                    current,
                    features,
                    mask,
                    self.num_candidates,
                    self.imagine_steps,
                    self.world_generator,
                )
            made.add("visual")
        if candidates is not None:
            chosen = int(choose(self.choice, candidates, candidate_scores)[0])
            self.visual_latent = candidates[:, chosen]
            if refresh:
                self.target = (
                    self.visual_latent,
                    float(latent_distance(current, self.visual_latent)),
                )
            candidate_latents = candidates[0].cpu().numpy()
            scores = candidate_scores[0].cpu().numpy()
            if self.decode == "all":
                with timer("decode"):
                    candidate_images = self._decode(candidates[0])  # (K, S, S, 3)
                chosen_image = candidate_images[chosen]
            elif self.decode == "chosen":  # what a video shows, at a K-th of the decoding
                with timer("decode"):
                    chosen_image = self._decode(candidates[:, chosen])[0]
        # the plan's age in steps, for an expert trained with `plan_lag`: that of the older of what
        # it reads (under `async_delay` d the first reuse of a subgoal's plan is d steps younger)
        self.plan_ages = {k: 0 if k in made else age + 1 for k, age in self.plan_ages.items()}
        reads = ("features", "visual") if self.visual_subgoal else ("features",)
        lag = max(self.plan_ages[k] for k in reads) * self.execute_steps
        # 4. the action chunk, in the robot's units, clipped to its limits (joint: the chosen one)
        if chunks is not None:
            actions = chunks[0, chosen]
        else:
            with timer("action"):
                actions = policy.sample_actions(
                    state,
                    self.embodiment,
                    features,
                    mask,
                    images,
                    self.visual_latent if self.visual_subgoal else None,
                    self.action_steps,
                    self.action_generator,
                    committed,
                    scene,
                    lag=lag,
                )[0]
        self.chunks_since_subgoal += 1
        self.last_plan = Plan(
            subgoal=self.subgoal,
            candidate_latents=candidate_latents,
            candidate_images=candidate_images,
            chosen_image=chosen_image,
            scores=scores,
            chosen=chosen,
            actions=actions,
            timings_ms=timings_ms,
            subgoal_refreshed=refresh,
            target_reached=reached,
        )
        return self.last_plan

    def _reached(self, current: torch.Tensor) -> bool:
        """Whether the frame has closed enough of its distance to the subgoal's visual target."""
        if self.target is None or current is None:
            return False
        target, start = self.target
        return self.schedule.reached(float(latent_distance(current, target)), start)

    def _decode(self, candidates: torch.Tensor) -> np.ndarray:
        """Candidate latents (K, C, h, w) -> images (K, S, S, 3) uint8, for videos."""
        decoded = self.policy.world_model.decode(candidates)  # (K, 3, S, S) in [0, 1]
        return rearrange(decoded, "k c h w -> k h w c").mul(255).round().byte().cpu().numpy()

    def act(self, obs: Observation, instruction: str) -> np.ndarray:
        """The next action (action_dim,): from the queue, planning a new chunk when it is empty
        (or, with `async_delay`, starting the next plan in the background when it runs low)."""
        d = self.async_delay
        if not self.queue:
            if self.pending is None:  # synchronous, or the first chunk of an episode
                self._execute(self.plan(obs, instruction), 0)
            else:  # the background plan: its first d actions were committed and have run
                plan, self.pending = self.pending.result(), None
                self._execute(plan, d)
        if d and len(self.queue) == d and self.pending is None:
            images = {key: np.array(frame) for key, frame in obs.images.items()}
            scene = None if obs.scene is None else np.array(obs.scene)
            frozen = Observation(images, np.array(obs.state), scene)  # the caller may reuse them
            committed = np.stack(self.queue)
            self.pending = self._background.submit(self.plan, frozen, instruction, committed)
        return self.queue.popleft()

    def _execute(self, plan: Plan, start: int) -> None:
        self.queue.extend(plan.actions[start : start + self.execute_steps])
        self.executing = plan
        self.plans += 1
