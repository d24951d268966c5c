"""Training throughput and peak memory of a `hybrid fit` config on this machine. Prints numbers;
asserts nothing.

    python benchmarks/train.py --config configs/quickstart.yaml [--steps 30] [--frozen-vae]

`--frozen-vae` times the steps after `model.vae_steps`: the VAE frozen and every training frame's
latent already cached (`hybrid.latent_cache`), as from the second epoch after the freeze.
"""

import argparse
import resource
import shutil
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

from hybrid.data.datamodule import HybridDataModule
from hybrid.module import HybridModule


class Throughput(L.Callback):
    """Samples/s over the training batches after the first `warmup`."""

    def __init__(self, warmup: int):
        self.warmup, self.samples, self.start = warmup, 0, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.samples += len(batch["state"])


class FrozenVAE(L.Callback):
    """Freezes the world model's VAE and encodes every training frame before the first step."""

    def on_train_start(self, trainer, module):
        start = time.perf_counter()
        module.policy.world_model.freeze_vae()
        for batch in trainer.datamodule.train_dataloader():
            module.cached_latents(batch)
        seconds = time.perf_counter() - start
        print(f"VAE frozen; {len(module.latent_cache)} frames encoded in {seconds:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--frozen-vae", action="store_true", help="time the steps after model.vae_steps"
    )
    args = parser.parse_args()
    throughput = Throughput(args.warmup)
    export_dir = tempfile.mkdtemp(prefix="hybrid-benchmark-")
    overrides = {
        "trainer.max_steps": args.steps,
        "trainer.limit_val_batches": 0,
        "trainer.logger": "false",
        "trainer.enable_checkpointing": "false",
        "trainer.callbacks": "null",
        "trainer.enable_progress_bar": "false",
        "model.export_dir": export_dir,
    }
    cli = LightningCLI(
        HybridModule,
        HybridDataModule,
        run=False,
        args=["--config", args.config, *(f"--{k}={v}" for k, v in overrides.items())],
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_callback=None,
    )
    cli.trainer.callbacks.append(throughput)
    if args.frozen_vae:
        cli.trainer.callbacks.append(FrozenVAE())
    cli.trainer.fit(cli.model, cli.datamodule)
    seconds = time.perf_counter() - throughput.start
    shutil.rmtree(export_dir)
    steps = args.steps - args.warmup
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"config {args.config}: batch {cli.datamodule.hparams.batch_size}, {steps} timed steps")
    print(f"  {throughput.samples / seconds:.1f} samples/s, {seconds / steps:.3f} s/step")
    print(f"  peak resident memory {peak_mb:.0f} MiB (process, data in memory included)")
    if torch.cuda.is_available():
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
