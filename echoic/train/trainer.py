"""The training loop: model-family agnostic, exactly resumable, robust to bad steps.

Exact resume rests on four rules:
1. Data: batch order is a pure function of (seed, epoch), augmentation of (seed,
   epoch, utterance id); the saved position is the global batch index consumed.
2. Model randomness: torch is reseeded before every micro-batch from (seed, epoch,
   global batch index), so dropout does not depend on which rank processes a batch,
   how accumulation splits the step, or where a run was resumed.
3. Updates: gradients are summed over micro-batches and ranks and divided once by the
   global number of utterances, so a step is the same for any split of its batches.
4. Checkpoints hold the state at an optimizer-step boundary (weights, optimizer,
   scaler, position, metric sums, counters, module buffers): a stop mid-accumulation
   saves the position where the step's window began, with the buffers (BatchNorm
   statistics) as they were then, and the resumed run recomputes the window. Under
   torchrun the BatchNorm statistics are made those of one process, and the same on
   every rank, at each step (distributed.BatchNormStatistics).

The loop reads nothing model-specific: a forward returns a StepOutput, and every
metric it declares is summed, reduced across ranks and logged the same way.

Over 600 lines on purpose: this is the loop and the state it changes step by step
(position, window, budgets, stage, bad steps, best results), read top to bottom. What
has a job of its own is a module of its own: the experiment folder (experiment), the
checkpoint state (state), stages and init, checkpoints, distributed collectives,
metrics, faults and the probe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import resource
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from echoic.data.batch import BATCH_TENSORS, Batch
from echoic.data.dataset import BatchLoader, build_loader
from echoic.data.features import CmvnStats
from echoic.data.manifest import read_manifest
from echoic.data.tokenizer import load_tokenizer
from echoic.errors import ConfigError, EchoicError
from echoic.models.contract import ProbeFeatures, StepOutput, check_step_output
from echoic.models.model import build_model
from echoic.seeding import derive_seed
from echoic.train import checkpoint as ckpt
from echoic.train import experiment, init, stages
from echoic.train.compiled import compile_blocks, compile_counts
from echoic.train.config import (
    ExperimentConfig,
)
from echoic.train.distributed import (
    BatchNormStatistics,
    all_reduce_sum,
    any_rank,
    is_fsdp,
    load_model_weights,
    load_optimizer_state,
    model_weights,
    optimizer_state,
    setup_runtime,
    shutdown,
    unwrap,
    wrap,
)
from echoic.train.faults import PausePoint, StopRequest, is_out_of_memory
from echoic.train.metrics import MetricsLog, MetricSums
from echoic.train.probe import Probe
from echoic.train.schedule import learning_rate
from echoic.train.state import TrainState, check_version, rng_state, set_rng_state

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """A step boundary's state, taken when the boundary is reached and written when a
    checkpoint is due (possibly after the next window began): the TrainState fields
    known then, and the module buffers as they were."""

    state: TrainState
    buffers: dict[str, torch.Tensor]


class TrainingAborted(EchoicError):
    """Training cannot go on (too many bad steps in a row, say); the message says why."""


class Trainer:
    def __init__(
        self,
        config: ExperimentConfig,
        exp_dir: str | Path,
        *,
        resume: str = "auto",
        allow_config_change: bool = False,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.exp_dir = Path(exp_dir)
        self.resume = resume
        self.allow_config_change = allow_config_change
        self.progress = progress
        self.stop = StopRequest()
        self.pause = PausePoint(self.exp_dir)

    # -- setup -------------------------------------------------------------------------------

    def _setup(self) -> dict[str, Any] | None:
        train = self.config.train
        self.runtime = setup_runtime(train.device, train.deterministic, train.num_threads)
        rt = self.runtime
        if not rt.is_main:
            logging.getLogger("echoic").setLevel(logging.WARNING)  # one voice for progress
        resume_from = experiment.resume_point(self.exp_dir, self.resume)
        weights, saved = (None, None)  # the checkpoint's state as saved, read below
        if resume_from is not None:
            weights, saved = ckpt.load_checkpoint(resume_from)
            check_version(saved, str(resume_from))
            log.info("resuming from %s (step %d)", resume_from, saved["step"])
        if saved is not None:
            experiment.check_config_change(
                self.exp_dir, self.config, saved["global_accum"], rt.world_size,
                allow=self.allow_config_change,
            )  # fmt: skip
        if rt.is_main:
            experiment.prepare(self.exp_dir, self.config, resuming=saved is not None)
        if rt.distributed:
            torch.distributed.barrier()

        tokenizer = load_tokenizer(self.exp_dir / experiment.TOKENIZER)
        wants_cmvn = self.config.model.wants_cmvn
        cmvn = CmvnStats.load(self.exp_dir / experiment.CMVN) if wants_cmvn else None
        torch.manual_seed(train.seed)
        model = build_model(self.config.model, tokenizer.vocab_size, cmvn)
        model.set_gradient_checkpointing(train.gradient_checkpointing)
        if weights is not None:
            experiment.check_weights_fit(model, weights, resume_from)
            load_model_weights(model, weights)
        elif self.config.init is not None:  # a new run that starts from other weights
            report_dir = self.exp_dir if rt.is_main else None
            init.initialize(model, self.config.init, tokenizer, report_dir)
        if rt.is_main:
            experiment.write_config(self.exp_dir, self.config)
        state = None  # the checkpoint's state, upgraded and checked key by key
        if saved is not None:
            state = TrainState.from_state_dict(saved, model.metric_units, str(resume_from))
        stages.check_stage_names(self.config, model)
        self.stages = stages.plan_stages(self.config)
        self.stage_position = stages.StagePosition(**(state.stage if state else {}))
        trained_sets = {tuple(stages.frozen_names(model, stage)) for stage in self.stages}
        if rt.distributed and len(trained_sets) > 1:
            raise ConfigError(
                "stages that change what is trained do not work under torchrun yet: DDP "
                "fixes the trained parameters when it starts (train in one process)"
            )
        # What is trained at the step resumed from (the stage's, and an SSL upstream
        # unfrozen after N steps): the optimizer state is matched to it when loaded.
        self._enter_stage(model, state.step if state else 0)
        self.metric_units = model.metric_units
        if train.best_metric not in self.metric_units:
            raise ConfigError(
                f"train.best_metric '{train.best_metric}' is not a metric of this model "
                f"({', '.join(self.metric_units)})"
            )
        self.input_spec = model.input_spec
        self.probe: Probe | None = None  # loaded at its first use
        if self.config.probe is not None and not isinstance(model, ProbeFeatures):
            raise ConfigError("probe: this model has no features to probe (probe_features)")
        # Two encoder frames at least: the subsampling front needs min_input_frames for
        # one, and BatchNorm in training refuses a one-utterance batch of one frame.
        self._min_frames = model.input_frames_for(2)
        self._min_seconds = model.seconds_for_input_frames(self._min_frames)
        if rt.distributed and model.unfreezes_during_training:
            raise ConfigError(
                "model.frontend.ssl.unfreeze_after_steps does not work under torchrun yet: "
                "DDP fixes the trained parameters when it starts (train in one process, or "
                "train frozen and then fine-tune from that checkpoint)"
            )
        model = model.to(rt.device)
        self.compiled = train.compile and compile_blocks(model.repeated_blocks(), rt.device)
        self.model = wrap(model, rt, train.distributed)
        self.batch_norm = BatchNormStatistics(model, rt)  # made all ranks' at each step

        data = self.config.data
        # Nothing shorter than that may reach the model, after the fastest speed
        # perturbation too (one sample more: resampling may round the length down).
        fastest = max(1.0, *data.speed_perturb)
        shortest = self._min_seconds
        min_duration = max(
            data.min_duration, (shortest + 1 / self.input_spec.sample_rate) * fastest
        )
        if min_duration > data.min_duration:
            log.info(
                "min_duration raised to %.3f s: two encoder frames need %d input frames",
                min_duration,
                self._min_frames,
            )
        # Two budgets: an out-of-memory batch shrinks the one for the epochs to come,
        # while the running epoch keeps the batches it was planned with; a resume rebuilds
        # those, not the shrunk epoch's, or utterances would be repeated and skipped.
        self.max_frames = state.max_frames if state else data.max_frames
        self.epoch_max_frames = state.epoch_max_frames if state else data.max_frames
        data_config = dataclasses.replace(
            data, min_duration=min_duration, max_frames=self.epoch_max_frames
        )

        def loader(path: str, training: bool, rank: int, world_size: int) -> BatchLoader:
            return build_loader(
                read_manifest(path),
                tokenizer,
                data_config,
                input_spec=self.input_spec,
                seed=train.seed,
                train=training,
                rank=rank,
                world_size=world_size,
            )

        self.train_loader = loader(data.train, True, rt.rank, rt.world_size)
        self.dev_loader: BatchLoader | None = None
        if data.dev:
            fsdp = rt.distributed and train.distributed == "fsdp"
            # Under FSDP every rank evaluates all of dev: its forward is a collective, so
            # ranks must see the same number of batches.
            self.dev_loader = loader(
                data.dev, False, 0 if fsdp else rt.rank, 1 if fsdp else rt.world_size
            )
            self._dev_reduce = not fsdp  # under FSDP every rank evaluates all of dev
        for batch_loader in (self.train_loader, self.dev_loader):
            if batch_loader is not None:  # a stop request cuts a feature-cache fill short
                batch_loader.should_stop = lambda: self.stop.requested is not None

        self.optimizer = self._build_optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if train.precision == "fp16" else None

        self.step = 0
        self.epoch = 0
        self.batch_index = 0
        self.bad_steps = 0
        self.best: list[list[float]] = []  # [value, step] of the best dev results
        self.tracker = MetricSums(self.metric_units)
        # Utterances the model left out this epoch, by reason (see StepOutput.dropped),
        # and the first of each; logged at the epoch's end like the data's own skips.
        self.dropped: Counter[str] = Counter()
        self.dropped_examples: dict[str, str] = {}
        if state is not None:
            load_optimizer_state(self.model, self.optimizer, state.optimizer)
            if self.scaler is not None and state.scaler is not None:
                self.scaler.load_state_dict(state.scaler)
            self.step, self.epoch, self.batch_index = state.step, state.epoch, state.batch_index
            self.bad_steps = state.bad_steps
            self.best = [list(b) for b in state.best]
            self.tracker.load_state_dict(state.tracker)
            self.dropped = Counter(state.dropped["counts"])
            self.dropped_examples = dict(state.dropped["examples"])
            set_rng_state(state.rng)
            # The checkpoint just loaded holds this state: a run resumed after its end
            # must not write it again.
            self._last_saved = (self.step, self.epoch, self.batch_index)
        self.metrics_log = MetricsLog(
            self.exp_dir,
            enabled=rt.is_main,
            resume_offset=state.metrics_offset if state else None,
            resume_step=self.step,
        )
        return state

    # -- stages (echoic/train/stages.py) --------------------------------------------------

    @property
    def stage(self) -> stages.Stage:
        return self.stages[self.stage_position.index]

    def _enter_stage(self, model: torch.nn.Module, step: int) -> None:
        """Make the running stage's parameters the trained ones (model unwrapped)."""
        stage = self.stage
        frozen = set(stages.frozen_names(model, stage))
        # What the model trains (all but, say, an SSL upstream's fixed parts), less the
        # stage's frozen names; the model's start_step then applies its own schedule.
        trained = {id(p) for group in model.parameter_groups() for p in group["params"]}
        self._frozen = []
        any_trained = False
        for name, parameter in model.named_parameters():
            trains = id(parameter) in trained and name not in frozen
            parameter.requires_grad_(trains)
            any_trained |= trains
            if name in frozen:
                self._frozen.append(parameter)
        if not any_trained:
            raise ConfigError(f"stage '{stage.name}' trains no parameter: everything is frozen")
        model.start_step(step)
        self._apply_freeze()
        self._eval_modules = (
            stages.eval_modules(model, frozen) if self.config.freeze_mode == "eval" else []
        )
        where = f"stage {stage.name}" if self.config.stages else "training"
        log.info("%s, parameters:\n%s", where, stages.parameter_table(model, frozen))

    def _apply_freeze(self) -> None:
        for parameter in self._frozen:
            parameter.requires_grad_(False)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        optim = self.stage.optim
        module = unwrap(self.model)
        # A group per learning-rate scale (lr_scale names, an SSL upstream's own);
        # frozen and never trained parameters are in none, so no weight decay either.
        groups = stages.parameter_groups(
            module, module.parameter_groups(), self._frozen, self.config.lr_scale
        )
        optimizer_class = torch.optim.AdamW if optim.optimizer == "adamw" else torch.optim.Adam
        return optimizer_class(
            groups,
            lr=optim.lr,
            betas=tuple(optim.betas),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            # One kernel for all parameters instead of a loop over them: the demo model's
            # update takes 0.9 ms instead of 4.0 ms on CPU (3% of a step).
            fused=True,
        )

    def _advance_stages(self) -> None:
        """At a step boundary: enter the next stage when the running one is done, with
        an optimizer for the new trained set (fresh moments)."""
        while self.stage.index + 1 < len(self.stages) and self._stage_over():
            self.stage_position = stages.StagePosition(
                self.stage.index + 1, self.step, self.epoch, self.batch_index
            )
            log.info("step %d: stage %s begins", self.step + 1, self.stage.name)
            self._enter_stage(unwrap(self.model), self.step)
            self.optimizer = self._build_optimizer()
            self._train_mode()
            self.bar.set_description(f"train {self.stage.name}")

    def _stage_over(self) -> bool:
        return stages.stage_over(
            self.stage, self.stage_position, self.step, self.epoch, self.batch_index
        )

    def _train_mode(self) -> None:
        self.model.train()
        for module in self._eval_modules:  # freeze_mode eval
            module.eval()

    def _stage_record(self) -> dict[str, int]:
        """The stage's number (from 1) for metrics lines, in staged runs only."""
        return {"stage": self.stage.index + 1} if self.config.stages else {}

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> int:
        """Train until max_steps/max_epochs or a stop request. Returns the exit code."""
        self.stop.install()
        try:
            self._setup()
            return self._loop()
        finally:
            self.stop.uninstall()
            if hasattr(self, "metrics_log"):
                self.metrics_log.close()
            if hasattr(self, "runtime"):
                shutdown(self.runtime)

    def _finished(self) -> bool:
        train = self.config.train
        last_stage_done = self.stage.index == len(self.stages) - 1 and self._stage_over()
        return (
            (train.max_steps is not None and self.step >= train.max_steps)
            or (train.max_epochs is not None and self.epoch >= train.max_epochs)
            or last_stage_done
        )

    def _snapshot(self) -> Snapshot:
        """The state at a step boundary that is not in the parameters and optimizer:
        position, metric sums, and module buffers (BatchNorm statistics, which forward
        passes do change during an accumulation window)."""
        buffers = {
            name: value.detach().clone() for name, value in unwrap(self.model).named_buffers()
        }
        state = TrainState(
            epoch=self.epoch,
            batch_index=self.batch_index,
            # Budgets as they were at the boundary: a resumed run that recomputes an
            # out-of-memory batch shrinks them again itself, once, as the first run did.
            max_frames=self.max_frames,
            epoch_max_frames=self.epoch_max_frames,
            tracker=self.tracker.state_dict(),
            dropped={"counts": dict(self.dropped), "examples": dict(self.dropped_examples)},
            stage=self.stage_position.state_dict(),
        )
        return Snapshot(state, buffers)

    @staticmethod
    def _new_window() -> dict[str, Any]:
        """The accumulation window of the optimizer step about to be taken."""
        return {
            "weight": 0.0,
            "frames": 0,
            "failed": False,
            "micro": 0,
            "start": time.perf_counter(),
        }

    def _loop(self) -> int:
        train, rt = self.config.train, self.runtime
        self.started = time.perf_counter()
        self.last_save = time.perf_counter()
        self._window = self._new_window()
        self._log_window = {"frames": 0, "start": time.perf_counter()}
        self._checked_contract = False
        bar = tqdm(
            total=self._total_steps(),
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.progress and rt.is_main),
            desc=f"train {self.stage.name}" if self.config.stages else "train",
        )
        self.bar = bar
        self._train_mode()
        self._advance_stages()  # a run resumed at a stage's last step enters the next
        probe = self.config.probe
        if probe is not None and probe.at_start and self.step == 0:
            self._run_probe()
        try:
            while not self._finished():
                sampler = self.train_loader.sampler
                if self.batch_index == 0:  # a new epoch is planned with the current budget
                    self.epoch_max_frames = self.max_frames
                sampler.set_max_frames(self.epoch_max_frames)
                sampler.set_position(self.epoch, self.batch_index)
                per_rank = len(self.train_loader)
                boundary = self._snapshot()
                stopped_mid_epoch = False
                for position, batch in enumerate(self.train_loader):
                    last_of_epoch = position == per_rank - 1
                    window_full = self._window["micro"] + 1 == train.accum_grad
                    self._micro_step(batch, sync=window_full or last_of_epoch)
                    self.batch_index = batch.index - rt.rank + rt.world_size
                    if window_full or last_of_epoch:
                        self._optimizer_step()
                        self._after_step(end_of_epoch=last_of_epoch)
                        self._advance_stages()
                        boundary = self._snapshot()
                        self.pause.check(f"{self.step}:0", self.stop)
                        if self._finished() and not last_of_epoch:
                            stopped_mid_epoch = True
                            break
                    else:
                        self.pause.check(f"{self.step}:{self._window['micro']}", self.stop)
                    if any_rank(self.stop.requested is not None, rt):
                        self._save(
                            boundary, reason=f"stop ({self.stop.requested or 'another rank'})"
                        )
                        return 0
                if stopped_mid_epoch:
                    break
                self.epoch += 1
                self.batch_index = 0
                self._end_of_epoch()
                self._advance_stages()
                self.pause.check(f"epoch-end:{self.epoch - 1}", self.stop)
                if any_rank(self.stop.requested is not None, rt):
                    self._save(
                        self._snapshot(), reason=f"stop ({self.stop.requested or 'another rank'})"
                    )
                    return 0
            self._save(self._snapshot(), reason="end of training")
            return 0
        finally:
            bar.close()

    def _total_steps(self) -> int | None:
        train = self.config.train
        lengths = [stage.steps for stage in self.stages]
        if self.config.stages and None not in lengths:
            return min(sum(lengths), train.max_steps or sum(lengths))
        if train.max_steps is not None:
            return train.max_steps
        batches = len(self.train_loader.sampler.epoch_batches(0)) // self.runtime.world_size
        return -(-batches // train.accum_grad) * train.max_epochs

    def _reseed(self, epoch: int, index: int) -> None:
        """Model randomness (dropout) for global batch `index` of `epoch`, on any rank."""
        seed = derive_seed(self.config.train.seed, epoch, index, "model")
        torch.manual_seed(seed % (2**63))

    def _autocast(self):
        precision = self.config.train.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.runtime.device.type, dtype=dtype)

    def _micro_step(self, batch: Batch, sync: bool) -> None:
        window = self._window
        if window["micro"] == 0:  # a new optimizer step: the model may change with it
            unwrap(self.model).start_step(self.step)
            self._apply_freeze()
        no_sync = getattr(self.model, "no_sync", None)
        context = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
        self._reseed(batch.epoch, batch.index)
        with context, self.batch_norm.micro_batch(batch.index):
            try:
                if batch.size == 0:  # every utterance skipped; keep in step with other ranks
                    self._dummy_backward()
                else:
                    out = self._forward(_to_device(batch, self.runtime.device))
                    loss = out.loss
                    if not torch.isfinite(loss.detach()):
                        log.warning(
                            "step %d: non-finite loss on batch %d of epoch %d (%s, ...)",
                            self.step + 1,
                            batch.index,
                            batch.epoch,
                            batch.ids[0],
                        )
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                    self.tracker.add(out.metrics)
                    _count_dropped(batch, out, self.dropped, self.dropped_examples)
                    window["weight"] += out.weight
                    window["frames"] += batch.real_frames
                    self._log_window["frames"] += batch.real_frames
            except Exception as error:  # only out-of-memory is survivable here
                if not is_out_of_memory(error):
                    raise
                self._on_out_of_memory(batch)
        window["micro"] += 1

    def _forward(self, batch: Batch) -> StepOutput:
        with self._autocast():
            out = self.model(batch)
        if not self._checked_contract:
            check_step_output(self.metric_units, out)  # fail on the first step, not in validation
            self._checked_contract = True
        return out

    def _dummy_batch(self) -> Batch:
        """A one-utterance batch of silence and one token: runs every parameter, so
        distributed gradient hooks fire, while its loss is multiplied by zero."""
        frames = self._min_frames
        spec = self.input_spec
        feats = feat_lens = audio = audio_lens = None
        if spec.kind == "fbank":
            feats = torch.zeros(1, frames, spec.fbank.num_mel_bins)
            feat_lens = torch.tensor([frames])
        else:
            samples = round(self._min_seconds * spec.sample_rate)
            audio, audio_lens = torch.zeros(1, samples), torch.tensor([samples])
        return Batch(
            epoch=0,
            index=0,
            ids=["dummy"],
            texts=[""],
            durations=[0.0],
            tokens=torch.tensor([[2]]),
            token_lens=torch.tensor([1]),
            feats=feats,
            feat_lens=feat_lens,
            audio=audio,
            audio_lens=audio_lens,
        )

    def _dummy_backward(self) -> None:
        module = unwrap(self.model)
        buffers = {k: v.clone() for k, v in module.named_buffers()}  # BatchNorm statistics
        out = self.model(_to_device(self._dummy_batch(), self.runtime.device))
        (out.loss * 0.0).backward()
        with torch.no_grad():
            for name, value in module.named_buffers():
                value.copy_(buffers[name])

    def _on_out_of_memory(self, batch: Batch) -> None:
        frames = batch.padded_frames
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._window["failed"] = True
        message = (
            f"step {self.step + 1}: out of memory on batch {batch.index} "
            f"({batch.size} utterances, {frames} padded frames): skipped"
        )
        if self.config.train.oom_shrink is not None and self.max_frames is not None:
            self.max_frames = int(self.max_frames * self.config.train.oom_shrink)
            message += f"; max_frames becomes {self.max_frames} from the next epoch"
        log.warning(message)
        if self.runtime.distributed:
            self._dummy_backward()  # the other ranks wait for this rank's gradients

    def _optimizer_step(self) -> None:
        train, rt = self.config.train, self.runtime
        window = self._window
        totals = torch.tensor(
            [window["weight"], 1.0 if window["failed"] else 0.0], dtype=torch.float64
        )
        totals = all_reduce_sum(totals.to(rt.device), rt).cpu()
        weight, failed = float(totals[0]), bool(totals[1] > 0)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = float("nan")
        if not failed and weight > 0 and params:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            # DDP and FSDP average over ranks; undo that and divide by the global count.
            factor = rt.world_size / weight
            torch._foreach_mul_([p.grad for p in params], factor)
            clip = self.config.optim.clip_grad_norm
            norm = torch.nn.utils.clip_grad_norm_(
                params, clip if clip is not None else float("inf")
            )
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not failed and weight > 0 and np.isfinite(grad_norm):
            # The schedule restarts with each stage and runs over the stage's length.
            stage, start = self.stage, self.stage_position.start_step
            length = stage.steps
            if length is None and train.max_steps is not None:
                length = train.max_steps - start
            lr = learning_rate(stage.optim, self.step + 1 - start, length)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # older checkpoints lack it
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            self.bad_steps = 0
        elif not failed and weight == 0:
            # Not a bad update: its utterances were skipped, and counted as skips already.
            log.warning(
                "step %d: every utterance of its batches was skipped: no update", self.step + 1
            )
        elif not failed:
            self.bad_steps += 1
            log.warning(
                "step %d: non-finite gradient (norm %s): update skipped, %d in a row (limit %d)",
                self.step + 1,
                grad_norm,
                self.bad_steps,
                train.max_bad_steps,
            )
            if self.bad_steps >= train.max_bad_steps:
                raise TrainingAborted(
                    f"{self.bad_steps} non-finite updates in a row up to step {self.step + 1}: "
                    "check the learning rate and the data (last good checkpoint in "
                    f"{self.exp_dir / 'checkpoints'})"
                )
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.batch_norm.synchronize()
        self.step += 1
        self.last_grad_norm = grad_norm
        self._window = self._new_window()

    def _after_step(self, end_of_epoch: bool) -> None:
        train, rt = self.config.train, self.runtime
        self.bar.update(1)
        if self.step % train.log_every == 0:
            self._log_train()
        validated = False
        # An epoch's last step is validated by _end_of_epoch: not twice.
        if (
            self.dev_loader is not None
            and train.valid_every
            and self.step % train.valid_every == 0
            and not end_of_epoch
        ):
            self._validate()
            validated = True
        probe = self.config.probe
        if probe is not None and self.step % probe.every_steps == 0:
            self._run_probe()  # before a checkpoint, so that a resume keeps its line
        due = (train.save_every_steps and self.step % train.save_every_steps == 0) or (
            train.save_every_minutes is not None
            and time.perf_counter() - self.last_save > 60 * train.save_every_minutes
        )
        if any_rank(bool(due), rt) or validated:
            self._save(self._snapshot(), reason="scheduled" if due else "after validation")

    def _end_of_epoch(self) -> None:
        log.info("epoch %d done at step %d", self.epoch - 1, self.step)
        if self.compiled:
            counts = compile_counts()
            log.info(
                "train.compile: %d graphs compiled, %d recompiles so far",
                counts["graphs"],
                counts["recompiles"],
            )
        if self.dropped:
            log.warning(
                "train epoch %d: %s",
                self.epoch - 1,
                _dropped_summary(self.dropped, self.dropped_examples),
            )
        self.dropped, self.dropped_examples = Counter(), {}
        if self.dev_loader is not None:
            self._validate(epoch=self.epoch - 1)
        self._save(self._snapshot(), reason=f"end of epoch {self.epoch - 1}")

    # -- logging, validation, checkpoints -----------------------------------------------------

    def _log_train(self) -> None:
        values = self.tracker.reduced(self.runtime)
        self.tracker = MetricSums(self.metric_units)
        group = self.optimizer.param_groups[0]
        lr = group["lr"] / group.get("lr_scale", 1.0)  # the schedule's, whatever group is first
        record = {
            "split": "train",
            "step": self.step,
            "epoch": self.epoch,
            **self._stage_record(),
            "lr": lr,
            **values,
        }
        record["grad_norm"] = self.last_grad_norm
        self.metrics_log.write(record)
        now = time.perf_counter()
        frames = float(
            all_reduce_sum(
                torch.tensor([self._log_window["frames"]], dtype=torch.float64).to(
                    self.runtime.device
                ),
                self.runtime,
            )
        )
        fps = frames / max(now - self._log_window["start"], 1e-9)
        self._log_window = {"frames": 0, "start": now}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        system = {
            "split": "system",
            "step": self.step,
            "frames_per_s": fps,
            "peak_rss_mb": rss,
            "elapsed_s": now - self.started,
        }
        if self.runtime.device.type == "cuda":
            system["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.metrics_log.write(system)
        loss = values.get("loss")
        self.bar.set_postfix(
            loss=f"{loss:.3f}" if loss is not None else "-",
            lr=f"{lr:.2e}",
            fps=f"{fps:.0f}",
            mem=f"{system.get('peak_cuda_mb', rss):.0f}MB",
        )

    def _validate(self, epoch: int | None = None) -> None:
        """Dev metrics; `epoch` names the epoch just finished when run at its end."""
        module = unwrap(self.model)
        module.eval()
        sums = MetricSums(self.metric_units)
        dropped: Counter[str] = Counter()
        examples: dict[str, str] = {}
        with torch.no_grad():
            for batch in self.dev_loader:
                if batch.size:
                    with self._autocast():
                        out = module(_to_device(batch, self.runtime.device))
                    sums.add(out.metrics)
                    _count_dropped(batch, out, dropped, examples)
        self._train_mode()
        if dropped:  # this rank's share of dev
            log.warning("dev at step %d: %s", self.step, _dropped_summary(dropped, examples))
        # Every rank reduces, even one with no dev batch (a dev set smaller than the
        # number of processes): the others are waiting in the same collective.
        values = sums.reduced(self.runtime if self._dev_reduce else None)
        self.metrics_log.write(
            {
                "split": "dev",
                "step": self.step,
                "epoch": self.epoch if epoch is None else epoch,
                **self._stage_record(),
                **values,
            }
        )
        key = self.config.train.best_metric  # a declared metric: checked in _setup
        if values[key] is not None:
            self.best.append([values[key], self.step])
            self.best.sort(
                key=lambda item: item[0] if self.config.train.best_mode == "min" else -item[0]
            )
            self.best = self.best[: self.config.train.keep_best]
        log.info(
            "dev at step %d: %s",
            self.step,
            ", ".join(f"{k} {v:.4f}" for k, v in values.items() if v is not None),
        )

    def _run_probe(self) -> None:
        """The downstream probe (echoic.train.probe) on the main process; the others
        wait at a barrier."""
        rt = self.runtime
        if rt.is_main:
            if self.probe is None:
                self.probe = Probe(self.config.probe, self.input_spec.sample_rate)
            values = self.probe.run(
                unwrap(self.model), rt.device, lambda: self.stop.requested is not None
            )
            self._train_mode()  # the stage's own modes (freeze_mode: eval) restored
            if values is None:
                log.warning("probe at step %d left out: a stop request came first", self.step)
            else:
                self.metrics_log.write({"split": "probe", "step": self.step, **values})
                log.info(
                    "probe at step %d: WER %.2f%%, CER %.2f%%, feature rank %.1f "
                    "(head loss %.3f, %.1f s)",
                    self.step,
                    100 * values["probe_wer"],
                    100 * values["probe_cer"],
                    values["probe_rank"],
                    values["probe_train_loss"],
                    values["probe_seconds"],
                )
        if rt.distributed:
            torch.distributed.barrier()

    def _save(self, snapshot: Snapshot, reason: str) -> None:
        rt = self.runtime
        key = (self.step, snapshot.state.epoch, snapshot.state.batch_index)
        if key == getattr(self, "_last_saved", None):
            log.info(
                "checkpoint %s already holds this state (%s)",
                ckpt.checkpoint_name(self.step),
                reason,
            )
            return
        self._last_saved = key
        weights = optimizer = None
        if rt.is_main or is_fsdp(self.model):  # gathering is a collective under FSDP
            weights = model_weights(self.model)
            optimizer = optimizer_state(self.model, self.optimizer)
        if rt.is_main:
            # Buffers as they were at the step boundary the snapshot describes.
            weights.update({k: v.cpu() for k, v in snapshot.buffers.items() if k in weights})
            state = dataclasses.replace(
                snapshot.state,
                step=self.step,
                optimizer=optimizer,
                scaler=self.scaler.state_dict() if self.scaler is not None else None,
                rng=rng_state(),
                best=self.best,
                bad_steps=self.bad_steps,
                global_accum=self.config.train.accum_grad * rt.world_size,
                metrics_offset=self.metrics_log.offset(),
            )
            directory = self.exp_dir / "checkpoints"
            try:
                path = ckpt.save_checkpoint(directory, self.step, weights, state.state_dict())
                ckpt.prune(
                    directory, self.config.train.keep_last, {int(step) for _, step in self.best}
                )
                log.info("checkpoint %s saved (%s)", path.name, reason)
            except ckpt.CheckpointError as error:
                if reason.startswith("stop") or reason == "end of training":
                    raise
                log.error("%s; training goes on", error)
        self.last_save = time.perf_counter()
        if rt.distributed:
            torch.distributed.barrier()


def _count_dropped(
    batch: Batch, out: StepOutput, counts: Counter[str], examples: dict[str, str]
) -> None:
    """Count the utterances the model left out of `batch`, keeping the first of each reason."""
    for row, reason in out.dropped.items():
        counts[reason] += 1
        examples.setdefault(
            reason, f"{batch.ids[row]} (batch {batch.index} of epoch {batch.epoch})"
        )


def _dropped_summary(counts: Counter[str], examples: dict[str, str]) -> str:
    parts = ", ".join(
        f"{n} {reason}, first {examples[reason]}" for reason, n in sorted(counts.items())
    )
    return f"the model left out {sum(counts.values())} utterances, as skips ({parts})"


def _to_device(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    for name in BATCH_TENSORS:
        value = getattr(batch, name)
        if value is not None:
            setattr(batch, name, value.to(device, non_blocking=True))
    return batch
