"""The one training loop, used by every method and by teacher training.

Single process: ``mmtard distill --config FILE --out DIR``.
Many GPUs: ``torchrun --nproc_per_node=8 -m mmtard distill --config FILE --out DIR``.

Per step: for each micro-batch the method crafts x_adv against the (unwrapped) student and
returns its loss; gradients accumulate to the global batch; clip, AdamW, cosine schedule. Only
the student's image tower (or its LoRA adapters) trains; teachers are frozen in eval mode.
Host-device syncs happen only at log and checkpoint intervals.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mmtard import checkpoint as ckpt
from mmtard.config import Config, save_config, to_dict
from mmtard.data.base import SeededSamples
from mmtard.distributed import (DistEnv, all_gather_object, all_reduce_mean, barrier, env_world_size,
                                 init_distributed, lost_ranks_reported, run_on_main)
from mmtard.errors import ConfigError, DataError, MmtardError
from mmtard.factory import (autocast_dtype, build_dataset, build_method, build_student, build_teachers,
                            resolve_device)
from mmtard.lora import merged_copy
from mmtard.metrics import MetricsWriter
from mmtard.models import export_open_clip
from mmtard.results import MODEL_FORWARD
from mmtard.runs import RunLock, prepare_run_dir, remove_unused_run_dir, start_fresh, write_run_info
from mmtard.speed import attention_kernel, check_attention_kernel
from mmtard.teacher_cache import CleanTeacherCache, samples_digest, weights_digest

log = logging.getLogger(__name__)

STUDENT_FILE = "student.safetensors"


class DivergenceError(MmtardError):
    """A loss term or the gradients became NaN or infinite."""


@dataclass
class BatchPlan:
    """How the global batch is split: per-rank micro-batch x accumulation x ranks."""

    micro_batch: int
    accumulation: int
    world_size: int

    @classmethod
    def from_config(cls, global_batch: int, micro_batch: int | None, world_size: int) -> "BatchPlan":
        if global_batch % world_size:
            lower = global_batch // world_size * world_size
            raise ConfigError(
                f"train.global_batch {global_batch} is not divisible by the world size {world_size}; "
                f"nearest valid values: {lower or world_size} or {lower + world_size}"
            )
        per_rank = global_batch // world_size
        micro = min(micro_batch or per_rank, per_rank)
        if per_rank % micro:
            raise ConfigError(f"train.micro_batch {micro} does not divide the per-rank batch {per_rank}")
        return cls(micro, per_rank // micro, world_size)


#: micro-batch below which the ``paper`` recipe's batch z-scores (the sigmoid balance) are noise
MIN_BALANCE_BATCH = 8


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero (METHOD.md §7), as a multiplier of the base lr."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _micro_batches_per_epoch(n: int, micro: int, global_batch: int) -> int:
    """An epoch is its permutation's ``n // global_batch`` whole global batches: the epoch's
    boundaries fall at the same images whatever the micro-batch size and number of ranks (so a run
    resumed on another layout continues at the same image), cut into micro-batches."""
    return n // global_batch * (global_batch // micro)


def epoch_indices(n: int, epoch: int, seed: int, env: DistEnv, micro: int, global_batch: int) -> list[int]:
    """This rank's sample order for one epoch: a seeded permutation, cut into micro-batches, dealt
    out to the ranks. Recomputable from (seed, epoch) alone, which makes the data position resumable.

    One global stream of micro-batches, whatever the number of ranks: each epoch's permutation is
    cut into whole global batches, those into micro-batches, the epochs follow one another, and
    global micro-batch ``g`` goes to rank ``g % world``. Rank r's p-th micro-batch is therefore
    global micro-batch ``p * world + r``: a step of W ranks x A micro-batches covers exactly the
    W * A consecutive micro-batches a single process with accumulation W * A would take, in the
    same compositions, in every epoch.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    per_epoch = _micro_batches_per_epoch(n, micro, global_batch)
    first = epoch * per_epoch  # global number of this epoch's first micro-batch
    return [i for j in range(per_epoch) if (first + j) % env.world_size == env.rank
            for i in order[j * micro:(j + 1) * micro]]


def stream_start(position: int, n: int, env: DistEnv, micro: int, global_batch: int) -> tuple[int, int]:
    """Where rank ``env.rank``'s micro-batch number ``position`` lies: (epoch, micro-batches of this
    rank before it in that epoch), for :func:`epoch_indices`."""
    per_epoch = _micro_batches_per_epoch(n, micro, global_batch)
    number = position * env.world_size + env.rank  # its global number
    epoch = number // per_epoch
    first = epoch * per_epoch
    return epoch, sum(1 for g in range(first, number) if g % env.world_size == env.rank)


def load_student_weights(student: nn.Module, saved: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load a checkpoint's trainable student weights, refusing one that lacks any of them."""
    names = {name for name, p in student.named_parameters() if p.requires_grad}
    missing = names - set(saved)
    if missing:
        old_lora = any(".attn.lora_" in k or ".attn.base_layer.out_proj.lora_" in k for k in saved)
        why = (" (LoRA adapters of an earlier mmtard, whose attention layout had no dropout; that run cannot be "
               "resumed by this version: train it again with --force or into another --out)" if old_lora else "")
        raise MmtardError(f"{source}: the checkpoint lacks student weights {sorted(missing)[:3]}{why}")
    student.load_state_dict(saved, strict=False)


class Trainer:
    """Builds a run from a config and trains it to the end, resuming from DIR if possible."""

    def __init__(self, config: Config, run_dir: str | Path, force: bool = False, show_progress: bool = True):
        self.config = config
        self.run_dir = Path(run_dir)
        self.device = resolve_device(config.train.device)
        check_attention_kernel(config.train.attention, self.device, autocast_dtype(config.train.precision, self.device))
        # checked before joining the process group: a refused batch never waits for a rendezvous
        self.plan = BatchPlan.from_config(config.train.global_batch, config.train.micro_batch, env_world_size())
        self.env = init_distributed(self.device.type)
        if self.device.type == "cuda":
            # under torchrun each rank takes its local GPU; a single process keeps the one it was given
            if self.env.enabled:
                self.device = torch.device("cuda", self.env.local_rank)
            elif self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)  # the CUDA RNG a checkpoint saves is the current device's
        self.show_progress = show_progress and self.env.is_main
        # Rank 0 alone inspects (and later clears) DIR, then tells every rank which checkpoint to
        # resume from: no rank races the clearing, and all load the same file (DIR is shared storage).
        self._lock: RunLock | None = None
        self._made_run_dir = False
        self.resume_from = run_on_main(self._claim_run_dir, config, force)
        try:
            self._build(config, force)
        except BaseException:  # a refused or interrupted set-up leaves DIR free for the next command
            self.close()
            if self._made_run_dir:  # and a DIR this command made holds nothing: gone again
                remove_unused_run_dir(self.run_dir)
            raise

    def _claim_run_dir(self, config: Config, force: bool) -> Path | None:
        """On rank 0: decide how to continue in DIR, hold it against a second run, and drop the
        temporary files a killed writer left there (they hold disk space a retry may need)."""
        self._made_run_dir = not self.run_dir.exists()
        resume_from = prepare_run_dir(self.run_dir, config, force=force)
        self._lock = RunLock(self.run_dir)
        ckpt.remove_stale_temporaries(self.run_dir)
        return resume_from

    def _build(self, config: Config, force: bool) -> None:
        """Data, models, method, optimiser; then (not resuming) DIR cleared for the new run."""
        if self.env.is_main:
            log.info("global batch %d = %d rank(s) x micro-batch %d x accumulation %d (per-rank batch %d)",
                     config.train.global_batch, self.env.world_size, self.plan.micro_batch, self.plan.accumulation,
                     self.plan.micro_batch * self.plan.accumulation)
            method = config.method
            if (method.name == "mmt_ard" and method.recipe == "paper" and method.use_balance
                    and self.plan.micro_batch < MIN_BALANCE_BATCH):
                log.warning("method.use_balance: the sigmoid balance standardises confidences over each micro-batch, "
                            "here %d image(s): with so few it is noisy (a single image always gives 0.5, balance "
                            "off); use a micro-batch of at least %d", self.plan.micro_batch, MIN_BALANCE_BATCH)
        self.amp = autocast_dtype(config.train.precision, self.device)
        # One seed on every rank while the models are built, so that randomly initialised ones are the
        # same everywhere; the per-rank streams (augmentation, dropout) start after that.
        torch.manual_seed(config.train.seed)

        self.dataset = build_dataset(config.data)
        # what the data position and the zero-shot heads of a checkpoint mean: resumed over other
        # samples or class names, they would not
        self.data_listing = {"samples": len(self.dataset), "digest": samples_digest(self.dataset.sample_ids),
                             "classes": samples_digest(self.dataset.classnames)}
        self._check_same_dataset_on_every_rank()
        if len(self.dataset) < config.train.global_batch:  # an epoch is made of whole global batches
            raise ConfigError(f"train.global_batch: {config.train.global_batch} is more than the dataset's "
                              f"{len(self.dataset)} samples")
        classnames = list(self.dataset.classnames)
        self.student, reference = build_student(config, classnames, self.device)
        teachers = build_teachers(config, classnames, self.device)
        self.method = build_method(config, self.student, teachers, reference, self.amp)
        torch.manual_seed(config.train.seed + self.env.rank)
        self.trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.train.lr, weight_decay=config.train.weight_decay,
                                           **({"fused": True} if self.device.type == "cuda" else {}))
        self.warmup = warmup = int(config.train.warmup_frac * config.train.steps)
        self.step_lr = float("nan")  # the learning rate of the last step taken (logged)
        # the schedule holds no reference to the Trainer: an untrained one is freed (and DIR
        # released) as soon as it is dropped, with no wait for the cycle collector
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_lr(s, config.train.steps, warmup))
        self.method.student_forward = self._wrap_ddp(self.student)
        self.step = 0
        self.position = 0  # micro-batches this rank has consumed since the start
        self.elapsed = 0.0  # training wall time over all sessions of this run (efficiency plots)
        self.metrics: MetricsWriter | None = None  # rank 0's, opened by train()
        if self.resume_from is None:  # only now: a config that fails to build deletes nothing
            run_on_main(start_fresh, self.run_dir, config, force)
        if config.train.clean_teacher_cache and not config.data.augment and teachers:
            weights = [weights_digest(t.name, t.pretrained) for t in config.teachers]
            self.method.clean_cache = CleanTeacherCache(self.run_dir / "cache" / "clean_teacher",
                                                        self.dataset.sample_ids, node=self.env.node,
                                                        teacher_weights=weights, digest=self.data_listing["digest"])

    def close(self) -> None:
        """Release DIR (done by :meth:`train` when it ends; for a Trainer that is never trained)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ set-up helpers
    def _check_same_dataset_on_every_rank(self) -> None:
        """Every rank computes the same epoch order over its own listing of the data, so the ranks
        must list the same samples: one whose folder differs (files added or removed mid-launch,
        another copy of the data on another node) would train on other images at each index."""
        if not self.env.enabled:
            return
        listings = all_gather_object(self.data_listing)
        if any(listing != listings[0] for listing in listings):
            counts = ", ".join(f"rank {r}: {listing['samples']} samples ({listing['digest']})"
                               for r, listing in enumerate(listings))
            raise DataError(f"the ranks see different training data under {self.config.data.root} ({counts}); "
                            "every rank must read the same files")

    def _wrap_ddp(self, student: nn.Module) -> nn.Module:
        """Only the trainable student is wrapped; the attack keeps using the bare module."""
        if not self.env.enabled:
            return student
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(student, device_ids=ids)

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        names = self._trainable_names()
        return {k: v for k, v in self.student.state_dict().items() if k in names}

    def _trainable_names(self) -> set[str]:
        return {name for name, p in self.student.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "position": self.position,
            "elapsed": self.elapsed,
            "student": {k: v.detach().cpu() for k, v in self._trainable_state().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "method": self.method.state_dict_extra(),
            "rng": ckpt.rng_state(cuda=self.device.type == "cuda"),
            "config": to_dict(self.config),
            "world_size": self.env.world_size,
            "forward": MODEL_FORWARD,
            "data": self.data_listing,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = sorted({"student", "optimizer", "scheduler", "position", "rng"} - set(state))
        if missing:
            raise MmtardError(f"{self.resume_from} lacks {', '.join(missing)}, so the run cannot continue from it; "
                              "delete it to resume from the previous checkpoint, if any")
        if state.get("forward", 1) != MODEL_FORWARD:
            raise MmtardError(f"{self.resume_from} was written by an older mmtard, before model-forward version 2 "
                              "(QuickGELU for OpenAI-derived weights, the release's bicubic resize); resumed now, the "
                              "run would change its model half-way. Start it again with another --out (or --force)")
        saved = {**self.data_listing, **state.get("data", {})}  # keys an earlier version did not record match
        if saved != self.data_listing:
            raise DataError(f"the training data under {self.config.data.root} changed since {self.resume_from} was "
                            f"written ({saved['samples']} samples, listing {saved['digest']}, class names "
                            f"{saved['classes']} then; {self.data_listing['samples']}, {self.data_listing['digest']}, "
                            f"{self.data_listing['classes']} now): its data position would point at other images, or "
                            "its zero-shot heads name other classes. Restore the data, or start again with another "
                            "--out (or --force)")
        load_student_weights(self.student, state["student"], self.resume_from or "checkpoint")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The loaded rate is the old schedule's; train.steps may have changed (the lambda is this
        # run's), so the next step's rate comes from this run's schedule, as later steps' do.
        scale = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * scale
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        try:
            self.method.load_state_dict_extra(state.get("method", {}))
        except (KeyError, TypeError, ValueError) as exc:
            reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise MmtardError(f"{self.resume_from}: the method's state cannot be restored: {reason}") from exc
        self.step, self.position = int(state["step"]), int(state["position"])
        self.elapsed = float(state.get("elapsed", 0.0))
        streams = state.get("rng_ranks") or [state["rng"]]
        saved_world = int(state.get("world_size", 1))
        if saved_world == self.env.world_size and len(streams) == saved_world:
            # each rank continues its own stream exactly
            ckpt.set_rng_state(streams[self.env.rank], cuda=self.device.type == "cuda")
        else:
            # Another rank layout (or an old checkpoint): the data position is the same number of
            # global batches; per-rank streams restart deterministically, so augmentation and dropout
            # (not the attack noise, which is seeded per micro-batch) differ from an uninterrupted run.
            log.warning("resuming a run of %d rank(s) on %d: same data position, fresh per-rank RNG streams",
                        saved_world, self.env.world_size)
            self.position = self.step * self.plan.accumulation
            ckpt.set_rng_state(state["rng"], cuda=self.device.type == "cuda")
            if self.env.rank:
                torch.manual_seed(self.config.train.seed + self.env.rank + 7919 * self.step)

    # ------------------------------------------------------------------ data
    def _batches(self):
        """Endless micro-batches starting at ``self.position``, epoch after epoch."""
        micro = self.plan.micro_batch
        n, global_batch = len(self.dataset), self.config.train.global_batch
        epoch, offset = stream_start(self.position, n, self.env, micro, global_batch)
        while True:
            indices = epoch_indices(n, epoch, self.config.train.seed, self.env, micro, global_batch)[offset * micro:]
            # A private generator: creating the loader's iterator must not draw from the global
            # RNG, or a resumed run's attack noise would be shifted by one draw.
            generator = torch.Generator().manual_seed(self.config.train.seed * 7 + epoch * 1009 + self.env.rank)
            dataset = self.dataset
            if self.config.data.augment:  # crops follow (seed, epoch, sample), not the worker layout
                dataset = SeededSamples(self.dataset, self.config.train.seed, epoch)
            loader = DataLoader(dataset, batch_size=micro, sampler=indices, drop_last=True,
                                num_workers=self.config.data.num_workers, generator=generator,
                                pin_memory=self.device.type == "cuda", persistent_workers=False)
            yield from loader
            self._report_skipped(epoch)
            epoch, offset = epoch + 1, 0

    def _report_skipped(self, epoch: int) -> None:
        pop = getattr(self.dataset, "pop_skipped", None)
        if pop is None:
            return
        count, paths = pop()
        if count:
            log.warning("epoch %d: skipped %d unreadable images (first: %s)", epoch, count, ", ".join(paths[:3]))

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path:
        """Train to ``train.steps`` and export the student; returns the exported file."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> Path:
        if self.resume_from is not None:
            self.load_state_dict(ckpt.load_checkpoint(self.resume_from))
            log.info("resumed from %s at step %d", self.resume_from, self.step)
        run_on_main(self._open_run_files)  # rank 0 writes; its refusal (a full disk) stops every rank
        total = self.config.train.steps
        bar = tqdm(total=total, initial=self.step, desc=f"{self.config.method.name}", disable=not self.show_progress,
                   dynamic_ncols=True)
        batches = self._batches()
        sums: dict[str, torch.Tensor] = {}
        bad: dict[str, torch.Tensor] = {}
        t_log, images_since_log, saving = time.perf_counter(), 0, 0.0
        check_every = 1 if self.device.type == "cpu" else self.config.train.log_every
        self.method.train()
        try:
            while self.step < total:
                step_sums = self._train_step(batches, bad)
                for key, value in step_sums.items():
                    sums[key] = sums.get(key, 0.0) + value
                self.step += 1
                images_since_log += self.config.train.global_batch
                bar.update(1)
                is_ckpt = self.step % self.config.train.ckpt_every == 0 or self.step == total
                # a row at every checkpoint too: no logged interval spans a checkpoint, so a resumed
                # run's rows average the same steps as an uninterrupted run's
                is_log = self.step % self.config.train.log_every == 0 or is_ckpt
                if is_log or is_ckpt or self.step % check_every == 0:
                    self._raise_if_diverged(bad)
                if is_log:
                    elapsed = time.perf_counter() - t_log
                    row = self._log_row(sums, elapsed, images_since_log, saving)
                    run_on_main(self._write_row, row, bar)
                    sums, t_log, images_since_log, saving = {}, time.perf_counter(), 0, 0.0
                if is_ckpt:
                    started = time.perf_counter()
                    self._save_checkpoint()
                    saving += time.perf_counter() - started
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
            if self.method.clean_cache is not None:
                self.method.clean_cache.flush()
        return self._export()

    def _open_run_files(self) -> None:
        save_config(self.config, self.run_dir / "config.yaml")
        write_run_info(self.run_dir, self.env.world_size, self.plan)
        self.metrics = MetricsWriter(self.run_dir, self.step)

    def _write_row(self, row: dict[str, float], bar: tqdm) -> None:
        self.metrics.write(self.step, row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
        log.info("step %d/%d %s", self.step, self.config.train.steps, " ".join(f"{k}={v:.4g}" for k, v in row.items()))

    def _train_step(self, batches, bad: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One optimiser step over ``accumulation`` micro-batches; returns summed detached terms."""
        sums: dict[str, torch.Tensor] = {}
        forward = self.method.student_forward
        for micro in range(self.plan.accumulation):
            images, labels, indices = next(batches)
            self.method.generator = self._attack_generator()
            self.position += 1
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            sync = micro == self.plan.accumulation - 1
            context = forward.no_sync() if (self.env.enabled and not sync) else contextlib.nullcontext()
            with context:
                with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None), \
                        attention_kernel(self.config.train.attention):
                    out = self.method(images, labels, indices)
                (out["loss"] / self.plan.accumulation).backward()
            for key, value in self._step_terms(out, images, labels).items():
                sums[key] = sums.get(key, 0.0) + value / self.plan.accumulation
                bad[key] = bad.get(key, torch.zeros((), dtype=torch.bool, device=self.device)) | ~torch.isfinite(value)
        # train.grad_clip <= 0: no clipping (the norm is still logged); clip_grad_norm_ with max_norm 0
        # would scale every gradient to zero
        max_norm = self.config.train.grad_clip if self.config.train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        bad["gradients"] = bad.get("gradients", torch.zeros((), dtype=torch.bool, device=self.device)) | ~torch.isfinite(grad_norm)
        self.optimizer.step()
        self.method.after_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used, for the log
        self.scheduler.step()
        sums["grad_norm"] = grad_norm.detach().float()
        return sums

    def _attack_generator(self) -> torch.Generator:
        """The training attack's random start for the next micro-batch, seeded by its global number
        (``position * world + rank``, see :func:`epoch_indices`): the same noise on the same images
        whatever the number of ranks, and nothing to restore on resume."""
        number = self.position * self.env.world_size + self.env.rank
        return torch.Generator(device=self.device).manual_seed(self.config.train.seed * 1_000_003 + number)

    def _step_terms(self, out: dict, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = {k: v.detach().float() for k, v in out.items()
                 if isinstance(v, torch.Tensor) and v.dim() == 0}
        for name in ("adv", "clean"):
            logits = out.get(f"logits_{name}")
            if logits is not None:
                terms[f"train_acc_{name}"] = (logits.detach().argmax(-1) == labels).float().mean() * 100
        return terms

    def _raise_if_diverged(self, bad: dict[str, torch.Tensor]) -> None:
        if not bad:
            return
        names = list(bad)
        # Any rank's non-finite value stops every rank at once: a rank that raised alone would leave
        # the others waiting in their next collective until the process-group timeout.
        flags = all_reduce_mean(torch.stack([bad[n] for n in names]).float()).cpu().tolist()
        failed = [n for n, f in zip(names, flags) if f > 0]
        if failed:
            last = ckpt.latest_checkpoint(self.run_dir)
            raise DivergenceError(
                f"training diverged by step {self.step}: non-finite {', '.join(failed)}. "
                f"The last good checkpoint is kept: {last or 'none written yet'}"
            )

    def _log_row(self, sums: dict[str, torch.Tensor], elapsed: float, images: int,
                 saving: float = 0.0) -> dict[str, float]:
        """Means over the steps since the last log and over ranks: the one sync of the interval.
        ``images_per_s`` leaves out ``saving``, the seconds spent writing a checkpoint in the
        interval (the training speed would otherwise dip in every row after a checkpoint);
        ``elapsed_s`` is wall time and keeps them."""
        steps = max(1, images // self.config.train.global_batch)
        names = sorted(sums)
        values = all_reduce_mean(torch.stack([torch.as_tensor(sums[n], device=self.device).float() for n in names]))
        row = {n: v / steps for n, v in zip(names, values.cpu().tolist())}
        row["lr"] = self.step_lr
        row["images_per_s"] = images / max(elapsed - saving, 1e-9)
        self.elapsed += elapsed
        row["elapsed_s"] = self.elapsed
        return row

    def _save_checkpoint(self) -> None:
        streams = all_gather_object(ckpt.rng_state(cuda=self.device.type == "cuda")) if self.env.enabled else None
        # rank 0 writes; a refusal there (a full disk) stops every rank at once with its message,
        # where a barrier would leave the others waiting out the process-group timeout
        run_on_main(self._write_checkpoint, streams)
        if self.method.clean_cache is not None:
            self.method.clean_cache.flush()
        barrier()

    def _write_checkpoint(self, streams: list | None) -> None:
        if self.metrics is not None:  # the rows up to this step: durable before the step is
            self.metrics.flush()
        state = self.state_dict()
        if streams is not None:
            state["rng_ranks"] = streams
        ckpt.save_checkpoint(self.run_dir, self.step, state, keep=self.config.train.keep_checkpoints)

    def _export(self) -> Path:
        path = self.run_dir / STUDENT_FILE
        run_on_main(self._write_student, path)
        return path

    def _write_student(self, path: Path) -> None:
        export_open_clip(merged_copy(self.student.clip), path)
        log.info("student written to %s", path)


def train(config: Config, run_dir: str | Path, force: bool = False, show_progress: bool = True) -> Path:
    """Train (or resume) the run described by ``config`` in ``run_dir``; returns the student file."""
    with lost_ranks_reported("run the same command again to resume from the last checkpoint"):
        return Trainer(config, run_dir, force=force, show_progress=show_progress).train()
