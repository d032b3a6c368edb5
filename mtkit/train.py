"""Stage `mtkit train`: the step loop, validation, checkpoints and exact resume.

Steps, not epochs, drive the loop: take `accum` token-bucketed batches, sum their cross-entropy,
divide by their target-token count, backpropagate, clip, set the learning rate from the pure
`schedule.lr_at(step)`, take an AdamW step; every so often log, validate (loss, perplexity, greedy BLEU)
and save. Everything a resumed run needs is in the checkpoint, so `--resume` continues the very
same run: same batches, same dropout masks, same parameters as if it had never stopped.
"""

import contextlib
import copy
import math
import random
import shlex
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from mtkit import backtranslation, checkpoint, corpus, devices, distributed, fast, lineage
from mtkit.bookkeeping import (RunState, RunLog, StopRequest, TrainResult, clock, print_summary, refuse_a_second_run,
                               stop_reason, workdir_lock)
from mtkit.config import Config
from mtkit.console import console, info
from mtkit.data import TokenArray, TokenBucketSampler, make_batch, train_arrays
from mtkit.distributed import World
from mtkit.errors import MtkitError
from mtkit.files import read_json
from mtkit.loss import translation_loss
from mtkit.model import ModelConfig, Transformer
from mtkit.schedule import batch_seed, lr_at, schedule_end
from mtkit.tokenizer import Tokenizer
from mtkit.validation import Validation


@torch.no_grad()
def ema_update(average: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """average <- average + (1 - d) * (model - average), for every weight: an exponential moving
    average that remembers about the last 1/(1 - d) steps. d ramps up as (1 + step) / (10 + step)
    to `decay`, so the first steps' random weights are soon forgotten."""
    d = min(decay, (1 + step) / (10 + step))
    for a, w in zip(average.parameters(), model.parameters()):
        a.lerp_(w.detach(), 1.0 - d)


def model_config(cfg: Config, tok: Tokenizer) -> ModelConfig:
    """The model section plus what the data decides (vocabulary sizes, padding id)."""
    return ModelConfig(**cfg.model.model_dump(), src_vocab=tok.src_vocab_size, tgt_vocab=tok.tgt_vocab_size,
                       share_src_tgt=cfg.model.tie_embeddings and tok.one_vocabulary, pad_id=tok.pad_id)


def train(cfg: Config, resume: bool = False, world: World | None = None) -> TrainResult:
    """Train (world: the processes torchrun started; one when None)."""
    world = world or distributed.start(cfg.train.device)
    # One training per workdir: rank 0 holds the lock for the processes of its run.
    with workdir_lock(cfg.workdir) if world.main else contextlib.nullcontext():
        return set_up(cfg, resume, world).run()


def set_up(cfg: Config, resume: bool, world: World | None = None) -> "Trainer":
    """A run ready to go. What touches the process, the workdir and the machine's time is done
    here, once, in order: the memory settings; the shape of the model it starts from (train.init);
    the checkpoints folder, cleared of writes a kill cut short (never read); the run, built or
    restored; a new run's precision (train.precision auto: measured)."""
    world = world or distributed.start(cfg.train.device)
    fast.limit_kernel_caches()  # before the first bf16 product (the precision probe)
    fast.keep_freed_memory()
    cfg = lineage.adopt(cfg)
    folder = cfg.workdir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(".*.tmp") if world.main else ():  # rank 0 writes them, and clears them
        leftover.unlink()
    trainer = Trainer(cfg, resume, world)
    if trainer.precision is None:
        trainer.use_precision(*trainer.measure_precision())
    return trainer


class Trainer:
    """One training run, built (data, model, optimizer and sampler; restored when resuming), then
    `run()` is the loop; `_step` one update, `validate` the validation (validation.py)."""

    def __init__(self, cfg: Config, resume: bool, world: World):
        self.cfg, self.world, self.init_from, self.precision = cfg, world, None, None
        self.ckpt_dir = cfg.workdir / "checkpoints"
        self.last_path = self.ckpt_dir / "last.pt"
        self._load_data()
        state = self._resume_state() if resume else None
        if state is None:
            refuse_a_second_run(self.last_path)
        self._build_model()
        self.progress = RunState()
        # fp16 needs its loss scaled (use_precision); until then, a scaler that does nothing.
        self.scaler = torch.amp.GradScaler(self.world.device.type, enabled=False)
        if state is not None:
            self._restore(state)
        elif cfg.train.init:
            self.init_from = lineage.start(cfg, self.model, asdict(self.model_config), self.tok.fingerprint)
            if self.ema_model is not None:
                self.ema_model.load_state_dict(self.model.state_dict())

    def use_precision(self, precision: str, reason: str, scaler: dict | None = None) -> None:
        """Train in `precision` (fp32, bf16 or fp16). fp16 needs its loss scaled, so that small
        gradients do not round to zero; the scaler lowers the scale after an overflow (that step is
        skipped) and raises it again later (scaler: its state, when resuming)."""
        self.precision, self.precision_reason = precision, reason
        if precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.world.device.type)
            if scaler is not None:
                self.scaler.load_state_dict(scaler)

    def _load_data(self) -> None:
        """The tokenizer, the prepared token arrays, and what validation scores against."""
        cfg, t = self.cfg, self.cfg.train
        self.tok = Tokenizer.load(cfg.tokenizer_dir)
        self.manifest = read_json(cfg.data_cache_dir / "manifest.json")
        if not self.manifest:
            raise MtkitError(f"no prepared data in {cfg.data_cache_dir}", hint="run mtkit prepare CONFIG first")
        if self.manifest["tokenizer_fingerprint"] != self.tok.fingerprint:
            raise MtkitError(f"the data in {cfg.data_cache_dir} was prepared with another tokenizer than "
                             f"{cfg.tokenizer_dir}", hint="run mtkit prepare CONFIG")
        if t.threads:
            torch.set_num_threads(t.threads)
        self.train_src, self.train_tgt, self.train_copies = train_arrays(cfg.data_cache_dir, self.manifest)
        src, tgt = (TokenArray(cfg.data_cache_dir, "valid", side, self.manifest["dtype"]) for side in ("src", "tgt"))
        ranges = self.manifest["splits"]["valid"].get("directions") or {"-".join(cfg.data.pairs[0]): [0, len(src)]}
        self.validation = Validation(
            src, tgt, list(corpus.read_pairs(corpus.split_source(cfg.data, "valid"))), ranges, sample=t.eval_sample,
            seed=cfg.experiment.seed, tokenize=cfg.eval.tokenize, max_tokens=t.max_tokens, tok=self.tok,
            decode=cfg.decode, max_positions=cfg.model.max_positions, place=self.world.place)

    def _build_model(self) -> None:
        """The model (from the seed), its moving average, the optimizer and the batch sampler."""
        cfg, t = self.cfg, self.cfg.train
        random.seed(cfg.experiment.seed)
        torch.manual_seed(cfg.experiment.seed)
        self.model_config = model_config(cfg, self.tok)
        model = Transformer(self.model_config)
        self.model = self.world.place(fast.apply(model) if t.fast else model)  # (fast.py: same model, faster)
        lineage.freeze(self.model, t.freeze)
        self.net = self.world.parallel(self.model)
        # train.ema: a moving average of the weights, kept beside them; evaluated and translated with.
        self.ema_model = copy.deepcopy(self.model).eval() if t.ema else None
        trained = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in trained if p.dim() >= 2]
        no_decay = [p for p in trained if p.dim() < 2]  # biases, LayerNorms
        # fused: one kernel per weight for the whole update instead of a dozen elementwise passes
        # (14 -> 5 ms a step on a CPU; PyTorch has it for CPUs and GPUs alike).
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=t.lr, betas=t.betas, eps=1e-9, fused=True)
        groups = self.manifest["splits"]["train"].get("directions", {})
        weights = {f"{p.src}-{p.tgt}": p.weight for p in [*cfg.data.parts, *cfg.data.denoising]}
        self.sampler = TokenBucketSampler(self.train_src.lengths, self.train_tgt.lengths, t.max_tokens,
                                          cfg.experiment.seed, list(groups.values()), cfg.data.temperature,
                                          [weights[name] for name in groups], self.train_copies)
        self.backtranslation = backtranslation.for_training(cfg.data, cfg.decode, t.warmup, groups, self.tok,
                                                            self.train_tgt, self.world.place)

    # -- resume -----------------------------------------------------------------------------
    def _resume_state(self) -> checkpoint.Checkpoint:
        if not self.last_path.exists():
            raise MtkitError(f"nothing to resume: {self.last_path} does not exist", hint="start training without --resume")
        state = checkpoint.load(self.last_path)
        if state.optimizer is None or state.progress is None:
            raise MtkitError(f"{self.last_path} holds a model but not the state of a run (optimizer, progress)",
                             hint="resume needs the last.pt that mtkit train wrote; start a new workdir (or use "
                                  "this model with --init)")
        if state.tokenizer_fingerprint != self.tok.fingerprint:
            raise MtkitError(f"{self.last_path} was trained with another tokenizer than {self.cfg.tokenizer_dir}",
                             hint="resume needs the same tokenizer and data; start a new workdir")
        if state.data_fingerprint != self.manifest["fingerprint"]:
            raise MtkitError(f"the prepared data changed since {self.last_path} was saved",
                             hint="resume needs the same data; start a new workdir")
        return state

    def _restore(self, state: checkpoint.Checkpoint) -> None:
        if state.init_from and not self.cfg.train.init:
            raise MtkitError(f"{self.last_path}'s run started from {state.init_from['path']} (train.init)",
                             hint=f"resume it as it started: --resume --init {shlex.quote(state.init_from['path'])}")
        was, now = state.model_config, asdict(self.model_config)
        if changed := [f"{k} is {now.get(k)} (the run's: {was.get(k)})" for k in {**now, **was} if now.get(k) != was.get(k)]:
            raise MtkitError(f"the model section of the config differs from {self.last_path}'s model: {'; '.join(changed)}",
                             hint="resume with the config it was trained with, or set another experiment.workdir")
        self.model.load_state_dict(state.model)
        if self.ema_model is not None:
            if state.ema is None:
                raise MtkitError(f"{self.last_path} was trained without train.ema", hint="resume without train.ema")
            self.ema_model.load_state_dict(state.ema)
        self.optimizer.load_state_dict(state.optimizer)
        self.sampler.load_state_dict(state.sampler)
        self.progress = RunState.from_dict(state.progress)
        self.init_from = state.init_from
        # Why the last session stopped is history: this session's checkpoints must not carry it
        # (a later `mtkit run` would take a half-trained run for a finished one).
        self.progress.stopped_by = None
        wanted = self.cfg.train.precision
        switched = wanted not in ("auto", state.precision)  # the weights are fp32 either way: a switch is safe
        self.use_precision(wanted if switched else state.precision, f"set in the config ({state.precision} before the "
                           "resume)" if switched else "as before the resume", state.scaler)
        random.setstate(state.rng["python"])
        torch.set_rng_state(state.rng["torch"])
        if "cuda" in state.rng and self.world.device.type == "cuda":  # dropout on a GPU draws from its own
            torch.cuda.set_rng_state(state.rng["cuda"], self.world.device)
        if self.world.main:
            info(f"train: resuming from {self.last_path} at step {self.progress.step:,}")

    # -- precision --------------------------------------------------------------------------
    def measure_precision(self) -> tuple[str, str]:
        """A new run's precision and why: the config's, else the device's native one, else (a CPU
        with bf16) the faster of fp32 and bf16 on three real batches."""
        wanted, device = self.cfg.train.precision, str(self.world.device)
        machine = devices.this_machine(device)
        chosen = devices.train_precision(wanted, device, machine)
        if chosen is not None:
            return chosen, "set in the config" if wanted != "auto" else "auto: " + (
                f"compute capability {'.'.join(map(str, machine.capability))}" if machine.capability
                else "Apple's GPU" if device == "mps" else "this CPU has no fast bf16")
        # The measured rule: time forward+backward of real batches in both precisions and take
        # bf16 only if it is clearly (10%) faster here. bf16 wins on big matrices and loses on
        # small ones, so the answer depends on the model and the machine, not on a guess.
        batches = [self._batch(ix) for ix in self.sampler.epoch_batches(0)[:3]]
        times = {}
        with torch.random.fork_rng(devices=[]):  # dropout here must not shift the training run's RNG
            for precision in ("fp32", "bf16"):
                self._forward_backward(batches[0], precision)  # warm-up
                start = time.perf_counter()
                for b in batches:
                    self._forward_backward(b, precision)
                times[precision] = time.perf_counter() - start
        self.optimizer.zero_grad(set_to_none=True)
        choice = "bf16" if times["bf16"] < 0.9 * times["fp32"] else "fp32"
        # Processes time differently: all take rank 0's choice.
        return self.world.from_main((choice, f"auto: forward+backward {times['fp32'] * 1000 / 3:.0f} ms fp32, "
                                             f"{times['bf16'] * 1000 / 3:.0f} ms bf16"))

    # -- one step ---------------------------------------------------------------------------
    def _batch(self, indices: np.ndarray):
        return self.world.place(make_batch(self.train_src, self.train_tgt, indices, pad_id=self.tok.pad_id, bos_id=self.tok.bos_id, eos_id=self.tok.eos_id,
                                           max_positions=self.model_config.max_positions))

    def _forward_backward(self, batch, precision: str, scale: float = 1.0, sync: bool = True) -> torch.Tensor:
        # sync=False: gradient accumulation under DDP, whose all-reduce waits for the last batch.
        copies = 2 if self.cfg.train.rdrop else 1  # R-Drop: each sentence twice in one batch
        no_sync = contextlib.nullcontext() if sync or self.net is self.model else self.net.no_sync()
        with devices.autocast(self.world.device, precision), no_sync:
            states = self.net(batch.src.repeat(copies, 1), batch.tgt_in.repeat(copies, 1), project=False)
            # The loss in fp32 whatever the precision: a sum over tokens, averaged by the caller's scale.
            loss, ce, nll = translation_loss(states, *self.model.output_layer(), batch.tgt_out, pad_id=self.tok.pad_id,
                                             smoothing=self.cfg.train.label_smoothing, rdrop=self.cfg.train.rdrop,
                                             chunked=self.cfg.train.fast)
        self.scaler.scale(loss * scale).backward()
        return torch.stack([ce, nll]).detach()  # logged: the cross-entropy (a NaN in the KL shows in the gradient)

    def _step(self) -> tuple[float, float, int, int]:
        """One optimizer update over `accum` batches; returns (loss and plain cross-entropy per
        target token, target tokens, source tokens)."""
        t, w = self.cfg.train, self.world
        # Every process draws the same accum x world batches and trains on its share of them: the
        # sampler's position stays the same everywhere, so any process's checkpoint resumes it.
        drawn = [next(self.sampler) for _ in range(t.accum * w.size)]
        step = self.progress.step + 1
        group = [self._batch(ix) for ix in drawn[w.rank::w.size]]
        group += self.backtranslation(self.model, drawn[w.rank::w.size], step, self.precision) if self.backtranslation else []
        n_tgt, n_src = w.sum([sum(b.n_tgt_tokens for b in group), sum(b.n_src_tokens for b in group)])
        # DDP averages the processes' gradients; scaling by size / all tokens makes that the
        # gradient of the loss per target token over the whole step.
        scale = w.size / n_tgt
        parts = []
        for i, b in enumerate(group):
            # Each batch's dropout masks come from a seed of its own (the run's, the step, which of
            # the step's batches): the same masks with accum N in one process as in N processes,
            # and in a resumed run as in one that never stopped, whatever the processes' generators.
            torch.manual_seed(batch_seed(self.cfg.experiment.seed, step, w.rank + i * w.size))
            parts.append(self._forward_backward(b, self.precision, scale, sync=i == len(group) - 1))
        total, nll = w.sum(torch.stack(parts).sum(0).tolist())  # read once a step: a GPU waits for it
        # A NaN/inf loss or gradient (bf16 can overflow in the backward pass while the loss looks
        # fine) would poison the weights: skip the update, count it. The norm is needed anyway to clip.
        self.scaler.unscale_(self.optimizer)  # fp16: clip and check the true gradients (else nothing)
        loss_ok = math.isfinite(total)
        finite = loss_ok and math.isfinite(
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip if t.clip > 0 else math.inf))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.skipped_steps += 1
            # In fp16 an overflow of the scaled gradients is the scaler's to handle (it lowers the
            # scale); a non-finite loss, or a non-finite gradient without a scaler, is divergence.
            if not (loss_ok and self.scaler.is_enabled()):
                self.progress.nonfinite_in_row += 1
            self.scaler.update()
        else:
            self.progress.nonfinite_in_row = 0
            end = schedule_end(step - 1, self.progress.seconds, max_steps=t.max_steps, max_time=t.max_time)
            lr = lr_at(step, lr=t.lr, schedule=t.schedule, warmup=t.warmup, d_model=self.model_config.d_model,
                       max_steps=end)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.scaler.step(self.optimizer)  # the optimizer's step (and, in fp16, the scaler's bookkeeping)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema_model is not None:
                ema_update(self.ema_model, self.model, t.ema, step)
        self.progress.step = step
        return total / n_tgt, nll / n_tgt, int(n_tgt), int(n_src)

    # -- validation (validation.py) ---------------------------------------------------------
    def validate(self, model: Transformer | None = None) -> dict:
        """The validation scores of `model` (by default the trained weights)."""
        return self.validation(model or self.model, self.world.device, self.precision)

    # -- checkpoints ------------------------------------------------------------------------
    def _state(self) -> checkpoint.Checkpoint:
        return checkpoint.Checkpoint(
            model_config=asdict(self.model_config), model=self.model.state_dict(),
            ema=self.ema_model.state_dict() if self.ema_model is not None else None,
            tokenizer=self.tok.protos, tokenizer_fingerprint=self.tok.fingerprint,  # it translates on its own
            config=self.cfg.model_dump(mode="json"), precision=self.precision, step=self.progress.step,
            data_fingerprint=self.manifest["fingerprint"], init_from=self.init_from,
            optimizer=self.optimizer.state_dict(), sampler=self.sampler.state_dict(), progress=asdict(self.progress),
            rng=self._rng_state(), scaler=self.scaler.state_dict() if self.scaler.is_enabled() else None)

    def _rng_state(self) -> dict:
        """Every random generator the run draws from: a resumed run continues their sequences."""
        state = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if self.world.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.world.device)
        return state

    def _save(self, periodic: bool, best: bool) -> None:
        """A step checkpoint (becomes last.pt) when `periodic`; best.pt when `best` (a link to the
        step checkpoint when there is one, else its own file). Rank 0 saves for all processes."""
        if not self.world.main or not (periodic or best):
            return
        if not periodic:
            return checkpoint.save(self._state(), self.ckpt_dir / "best.pt")
        step = self.progress.last_save_step = self.progress.step
        path = self.ckpt_dir / f"step_{step:07d}.pt"
        checkpoint.save(self._state(), path)
        checkpoint.link(path, self.last_path)
        if best:
            checkpoint.link(path, self.ckpt_dir / "best.pt")
        for old in sorted(self.ckpt_dir.glob("step_*.pt"))[:-self.cfg.train.keep_last]:
            old.unlink()

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        t, p, w = self.cfg.train, self.progress, self.world
        self.log = RunLog(self.cfg.workdir, p, self.last_path, active=w.main, tensorboard=t.tensorboard,
                          max_steps=t.max_steps)  # a resumed run's: cut to its checkpoint's step
        self._announce()
        self.model.train()
        clock_start, seconds_before = time.perf_counter(), p.seconds
        window, self.session = Window(), Window()  # since the last log line; this session's steps
        with StopRequest() as stop, self.log:
            while True:
                p.seconds = seconds_before + time.perf_counter() - clock_start
                stopped_by = stop_reason(t, p, self.sampler.epoch) or ("interrupted" if stop.signal else None)
                # One decision (clocks, Ctrl-C) for every process, and one clock for the schedule.
                stopped_by, p.seconds = w.from_main((stopped_by, p.seconds))
                if stopped_by:
                    break
                step_start = time.perf_counter()
                loss, nll, n_tgt, n_src = self._step()
                if p.nonfinite_in_row >= t.max_nonfinite:
                    self._stop_nonfinite()
                for tally in (window, self.session):
                    tally.add(loss, nll, n_tgt, n_src, time.perf_counter() - step_start)
                if p.step % t.log_every == 0:
                    self._log_window(window)
                    window = Window()
                self.log.at(p.step, self.sampler.epoch + 1)
                improved = p.step % t.eval_every == 0 and self._evaluate_and_keep_best()
                # No step checkpoint amid NaN/inf steps: if they come from weights already gone bad,
                # it would replace good checkpoints with them.
                self._save(p.step % t.save_every == 0 and p.nonfinite_in_row == 0, improved)
            # The end: validate unless that just happened, and save the final state (with why it
            # stopped: `mtkit run` skips a finished training and resumes an interrupted one).
            improved = stopped_by != "interrupted" and p.last_eval_step != p.step and self._evaluate_and_keep_best()
            p.stopped_by = stopped_by
            self._save(True, improved)
        p.seconds = seconds_before + time.perf_counter() - clock_start
        result = TrainResult(self.ckpt_dir, p.step, p.seconds, stopped_by, p.best_bleu, p.best_step)
        if w.main:  # rank 0 validates, logs and saves for all
            self._finish(result, stop.signal)
        return result

    def _announce(self) -> None:
        if (w := self.world).main:
            info(f"train: {sum(x.numel() for x in self.model.parameters()):,} parameters on {devices.describe(w.device)}, precision {self.precision} "
                 f"({self.precision_reason}), {torch.get_num_threads()} threads, {len(self.train_src) // self.train_copies:,} train pairs"
                 + (f" ({self.train_copies} subword-sampled copies)" if self.train_copies > 1 else "")
                 + (f"; {w.size} processes ({w.device.type})" if w.size > 1 else "")
                 + (f"; {self.backtranslation}" if self.backtranslation else ""))

    def _evaluate_and_keep_best(self) -> bool:
        """Validate (rank 0; the others wait at the next step); True when this is the best BLEU so far."""
        if not self.world.main:
            return False
        p = self.progress
        result = self.validate(self.ema_model)  # None: the trained weights
        p.last_eval_step = p.step
        improved = p.best_bleu is None or result["bleu"] > p.best_bleu
        if improved:
            p.best_bleu, p.best_step, p.bad_evals = result["bleu"], p.step, 0
        else:
            p.bad_evals += 1
        self.log.validation(result, improved)
        return improved

    def _log_window(self, window: "Window") -> None:
        p, t = self.progress, self.cfg.train
        lr = self.optimizer.param_groups[0]["lr"]
        loss, nll, tps = window.loss / window.steps, window.nll / window.steps, window.tgt / max(window.seconds, 1e-9)
        self.log.write({"event": "train", "step": p.step, "epoch": self.sampler.epoch + 1, "loss": round(loss, 4),
                        "nll": round(nll, 4), "lr": lr, "tgt_tokens_per_s": round(tps, 1),
                        "src_tokens_per_s": round(window.src / max(window.seconds, 1e-9), 1),
                        "seconds": round(p.seconds, 1), "skipped_steps": p.skipped_steps})
        # ETA: whichever comes first, the remaining steps at this pace or the time budget; the bar
        # runs to the step where the clock is expected to stop the run (not to an unreachable max_steps).
        eta = min((t.max_steps - p.step) * window.seconds / window.steps, t.max_time - p.seconds if t.max_time else math.inf)
        end = schedule_end(p.step, p.seconds, max_steps=t.max_steps, max_time=t.max_time)
        self.log.at(p.step, self.sampler.epoch + 1, total=end, loss=f"{loss:.3f} (nll {nll:.3f})", lr=f"{lr:.2e}",
                    tps=f"{tps:,.0f}", eta=clock(eta))
        self.log.line(f"step {p.step}/{end} | epoch {self.sampler.epoch + 1} | loss {loss:.4f} | nll {nll:.4f} | "
                      f"lr {lr:.3e} | tgt_tok/s {tps:.0f} | elapsed {p.seconds:.0f}s")

    def _stop_nonfinite(self) -> None:
        """Too many NaN/inf losses in a row: the run has diverged (or bf16 overflows). Stop without
        saving, so that last.pt stays the last state known to be good."""
        p, t = self.progress, self.cfg.train
        self.log.write({"event": "stopped_nonfinite", "step": p.step, "in_row": p.nonfinite_in_row,
                        "skipped_steps": p.skipped_steps})
        saved = self.last_path.exists()
        bf16 = " In bf16 an overflow can cause it too: try train.precision=fp32." if self.precision == "bf16" else ""
        raise MtkitError(
            f"training stopped at step {p.step:,}: the loss or its gradient was NaN or infinite for "
            f"{p.nonfinite_in_row} steps in a row ({p.skipped_steps} in all; their updates were skipped). "
            + (f"{self.last_path} (step {p.last_save_step:,}) is the last checkpoint, kept as it was."
               if saved else "No checkpoint had been saved yet."),
            hint=f"the learning rate is the usual cause: lower train.lr ({t.lr:g}) or lengthen train.warmup "
                 f"({t.warmup}), then mtkit train CONFIG{' --resume' if saved else ''}.{bf16}")

    def _finish(self, r: TrainResult, signal_name: str | None) -> None:
        if r.stopped_by == "interrupted":
            info(f"train: stopped by {signal_name} at step {r.step:,}; saved {self.last_path}; "
                 f"continue with: mtkit train CONFIG --resume")
        elif self.cfg.train.average_last > 1:
            self._average_last()
        self.log.write({"event": "end", "step": r.step, "stopped_by": r.stopped_by, "seconds": round(r.seconds, 1)})
        self.log.close()
        s = self.session
        print_summary(self.cfg.experiment.name, r, epochs=self.sampler.epochs_done, precision=self.precision,
                      tgt_per_s=s.tgt / s.seconds if s.seconds else None)

    def _average_last(self) -> None:
        t = self.cfg.train
        paths = checkpoint.step_checkpoints(self.ckpt_dir)[-t.average_last:]
        if len(paths) < 2:  # said here: eval.checkpoint averaged would only find it missing
            return info(f"[yellow]warning:[/] train.average_last {t.average_last}: this run saved {len(paths)} step "
                        f"checkpoint (train.save_every {t.save_every}), too few to average: no averaged.pt")
        checkpoint.save(averaged := checkpoint.average(paths), out := self.ckpt_dir / "averaged.pt")
        result = self.validate(self.world.place(averaged.build_model()))  # on the training device
        self.log.write({"event": "valid_averaged", "step": self.progress.step, "from": len(paths), **result})
        console.print(f"averaged the last {len(paths)} checkpoints -> {out}: valid BLEU {result['bleu']:.2f}")


@dataclass
class Window:
    """Training steps tallied: since the last log line, or in this session."""
    loss: float = 0.0  # label-smoothed cross-entropy per target token, summed over the steps
    nll: float = 0.0  # the same without smoothing
    steps: int = 0
    tgt: int = 0
    src: int = 0
    seconds: float = 0.0

    def add(self, loss: float, nll: float, tgt: int, src: int, seconds: float) -> None:
        self.loss, self.nll, self.tgt, self.src = self.loss + loss, self.nll + nll, self.tgt + tgt, self.src + src
        self.steps, self.seconds = self.steps + 1, self.seconds + seconds
