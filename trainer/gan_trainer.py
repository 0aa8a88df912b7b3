"""A GAN's loop: alternating discriminator and generator updates with the verbs of trainer.py. The example to
follow for any project with several models and optimizers (teacher-student, separately optimised parts)."""

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Iterable

import torch
from torch import nn

from base import BaseTrainer
from base.train_step import unwrap
from utils.device import batch_to_device
from utils.metrics import EpochMetrics


class GanTrainer(BaseTrainer):
    """DCGAN training: models `generator` and `discriminator`, an optimizer each, the loss `adversarial` (on
    logits, e.g. BCEWithLogitsLoss). Each batch: the discriminator learns real -> 1 and generated -> 0, then
    the generator learns to make the updated discriminator say 1. Every epoch writes a grid of samples from
    fixed noise to TensorBoard."""

    logged = ("loss_d", "loss_g")

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        generator, discriminator = self.models["generator"], self.models["discriminator"]
        g_optimizer, d_optimizer = self.optimizers["generator"], self.optimizers["discriminator"]
        adversarial = self.criteria["adversarial"]
        judge = unwrap(discriminator)  # the generator's phase runs it outside DDP: no hooks, no sync
        generator.train(), discriminator.train()
        for batch_idx, (real, labels) in self.train_batches(epoch):
            real, labels = self.to_device(real, labels)
            ones, zeros = (
                torch.ones(len(real), device=self.device),
                torch.zeros(len(real), device=self.device),
            )
            noise = torch.randn(len(real), unwrap(generator).latent_dim, device=self.device)
            with self.step.accumulating(batch_idx):
                with self.step.autocast():
                    fake = generator(noise)
                    loss_d = adversarial(discriminator(real), ones) + adversarial(
                        discriminator(fake.detach()), zeros
                    )
                self.step.backward(loss_d, batch_idx, self.batch_share)
            if self.step.window_done(batch_idx):
                self.step.clip(d_optimizer)
                self.step.optimizer_step(d_optimizer)
                d_optimizer.zero_grad(set_to_none=True)
            with self.step.accumulating(batch_idx):
                with self.step.autocast():
                    loss_g = adversarial(judge(fake), ones)
                self.step.backward(loss_g, batch_idx, self.batch_share, inputs=generator.parameters())
            losses = {"loss_d": loss_d, "loss_g": loss_g}
            self.record_batch(losses, fake, labels)
            if self.step.window_done(batch_idx):
                self.step.clip(g_optimizer)
                self.step.optimizer_step(g_optimizer)
                g_optimizer.zero_grad(set_to_none=True)
                self.after_optimizer_step(epoch, batch_idx, real, losses)
        self._write_samples()
        return self.train_metrics.result()

    @torch.no_grad()
    def _write_samples(self) -> None:
        """64 samples from noise fixed by the run's seed (a private generator: no training RNG moves)."""
        generator = unwrap(self.step.eval_model)
        noise = torch.randn(64, generator.latent_dim, generator=torch.Generator().manual_seed(self.seed))
        generator.eval()
        self.writer.add_image_grid("samples", generator(noise.to(self.device)), self.global_step)
        generator.train()

    @staticmethod
    @torch.no_grad()
    def evaluate_models(
        models: dict[str, nn.Module],
        eval_name: str,
        criteria: dict[str, Callable],
        batches: Iterable,
        metrics: EpochMetrics,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        channels_last: bool = False,
    ) -> dict[str, float]:
        """test.py's evaluation: both losses on held-out real digits and as many samples."""
        generator, discriminator, adversarial = (
            models["generator"],
            models["discriminator"],
            criteria["adversarial"],
        )
        generator.eval(), discriminator.eval()
        metrics.reset()
        for real, labels in batches:
            real, labels = batch_to_device(real, labels, device, channels_last)
            ones, zeros = torch.ones(len(real), device=device), torch.zeros(len(real), device=device)
            with autocast():
                fake = generator(torch.randn(len(real), generator.latent_dim, device=device))
                judged = discriminator(fake)
                loss_d = adversarial(discriminator(real), ones) + adversarial(judged, zeros)
                metrics.update({"loss_d": loss_d, "loss_g": adversarial(judged, ones)}, fake, labels)
        return metrics.result()
