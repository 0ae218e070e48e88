"""The one training loop every recipe runs on.

A recipe (MNTP, SimCSE, supervised) provides the model and data and does forward + backward; the loop
owns everything else: gradient accumulation, the cross-rank gradient SUM, clipping, AdamW with linear
warmup and the ``lr_scheduler_type`` schedule (linear decay by default), logging, checkpoints and exact resumption.

Recipe protocol (duck-typed):
    config: TrainConfig; model: torch.nn.Module (trainable params = requires_grad); tokenizer
    batches(epoch) -> iterator of this rank's micro-batches, deterministic for (seed, epoch)
    train_step(batch, grad_scale) -> detached float32 union-batch loss, after backward of loss * grad_scale
    num_samples(batch) -> int; save(folder) -> None
    num_batches() -> int (optional: batches per epoch; else counted by iterating batches(0) once)
    evaluate() -> dict of float metrics (optional; run without gradients, in eval mode, on every rank) when
        the config's ``eval_strategy`` is "steps" (every ``eval_steps``, default ``logging_steps``) or "epoch"
        (at each epoch's end), and after the last step when ``do_eval``; the metrics go to log.jsonl

Distributed rule: each rank's backward gives its share of the union-batch gradient, so the loop SUMs
the gradients over ranks (one flat all_reduce), never averages.

Checkpoints: ``output_dir/checkpoint-{step}/`` holds ``recipe.save`` output, ``trainable.safetensors``
(every trainable parameter, by name: what resuming restores), ``optimizer.pt`` (optimizer + scheduler),
``rng_state_{rank}.json`` (python, numpy, torch CPU and CUDA RNGs of each rank) and, written last,
``trainer_state.json`` (step, epoch, batch index in epoch, config): a folder without it is incomplete.
``save_total_limit`` = N keeps the newest N complete checkpoints, removing older ones once a new one is complete.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import random
import resource
import shutil
import time
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..distributed import rank_and_world
from ..models.lean import lean_layers
from .config import checkpoint_folders
from .model_setup import seed_everything
from .reporting import Reporters, resolve_report_to

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
LOG_FILE = "log.jsonl"


def _barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated on a CUDA device; the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def complete_checkpoints(output_dir: str) -> List[str]:
    """The complete (trainer_state.json present) checkpoint-N folders, oldest (lowest N) first."""
    return [folder for folder in checkpoint_folders(output_dir) if os.path.isfile(os.path.join(folder, STATE_FILE))]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The complete checkpoint-N folder with the highest N, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


class Trainer:
    """Runs ``recipe`` for ``config.max_steps`` optimizer steps (or ``num_train_epochs`` epochs)."""

    def __init__(self, recipe):
        self.recipe = recipe
        self.config = recipe.config
        self.model = recipe.model
        self.rank, self.world = rank_and_world()
        self.params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the recipe's model has no trainable parameter")
        self.device = self.params[0][1].device
        cfg = self.config
        decay = [p for _, p in self.params if p.ndim >= 2]
        no_decay = [p for _, p in self.params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        self.batches_per_epoch = self._batches_per_epoch()
        self.total_steps = self._total_steps()  # what the learning-rate schedule spans
        # The step training ends at: stop_after_n_steps (llm2vec's early stop) cuts it short of the schedule's end.
        self.last_step = min(self.total_steps, cfg.stop_after_n_steps or self.total_steps)
        from transformers import get_scheduler
        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=self.total_steps)
        self.step = 0
        self.epoch = 0
        self.batch_index = 0          # micro-batches of self.epoch already consumed
        self.step_losses: List[float] = []
        self.reporters: Optional[Reporters] = None  # report_to's integrations, open while train() runs

    # ----------------------------------------------------------------------------------------- sizing
    def _batches_per_epoch(self) -> int:
        counter = getattr(self.recipe, "num_batches", None)
        count = counter() if callable(counter) else sum(1 for _ in self.recipe.batches(0))
        if count <= 0:
            raise ValueError("the training data gives no batch (dataset smaller than one batch per rank?)")
        return count

    def _total_steps(self) -> int:
        cfg = self.config
        if cfg.max_steps > 0:
            return cfg.max_steps
        return max(math.ceil(cfg.num_train_epochs * self.steps_per_epoch), 1)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (at least one)."""
        return max(self.batches_per_epoch // self.config.gradient_accumulation_steps, 1)

    # ----------------------------------------------------------------------------------------- data
    def _micro_batches(self) -> Iterator:
        """Micro-batches from (epoch, batch_index) on, across epochs, keeping the position current."""
        while True:
            for batch in itertools.islice(self.recipe.batches(self.epoch), self.batch_index, None):
                self.batch_index += 1
                yield batch
            self.epoch += 1
            self.batch_index = 0

    # ----------------------------------------------------------------------------------------- step
    def _sum_gradients(self) -> None:
        """The distributed rule: SUM every trainable gradient over ranks, as one flat buffer."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for (_, p), g in zip(self.params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()

    def train(self) -> List[float]:
        """Trains to ``total_steps``; returns the loss of every optimizer step run by this call."""
        cfg = self.config
        resume = self._resume_folder()
        if resume is not None:
            self.load_checkpoint(resume)
        else:
            seed_everything(cfg.seed)
        self.model.train()
        os.makedirs(cfg.output_dir, exist_ok=True)
        log_file = os.path.join(cfg.output_dir, LOG_FILE)
        if resume is not None and self.rank == 0 and os.path.exists(log_file):
            _drop_records_after(log_file, self.step)  # logged by the run killed after its last checkpoint
        if resume is None and self.rank == 0:
            if os.path.exists(log_file):
                os.remove(log_file)  # a fresh run starts a fresh log; a resumed one appends
            if cfg.overwrite_output_dir and cfg.resume_from_checkpoint is None:
                for folder in checkpoint_folders(cfg.output_dir):  # the config refused them otherwise
                    logger.info("overwrite_output_dir: removing %s", folder)
                    shutil.rmtree(folder)
        _barrier()
        names = resolve_report_to(cfg.report_to) if self.rank == 0 else []
        if names:
            self.reporters = Reporters(names, output_dir=cfg.output_dir, logging_dir=cfg.logging_dir,
                                       run_name=cfg.run_name, config=cfg.to_dict())
        try:
            return self._train_steps()
        finally:
            if self.reporters is not None:
                self.reporters.close()
                self.reporters = None

    def _train_steps(self) -> List[float]:
        cfg = self.config
        bar = self._progress_bar()
        batches = self._micro_batches()
        window_losses: List[float] = []
        window_samples = 0
        window_start = start = time.perf_counter()
        scale = 1.0 / cfg.gradient_accumulation_steps
        while self.step < self.last_step:
            loss = 0.0
            for _ in range(cfg.gradient_accumulation_steps):
                batch = next(batches)
                lean = lean_layers(self.model) if cfg.lean_layers else contextlib.nullcontext()
                with lean:  # the whole step, backward included: checkpointed layers recompute what they saved
                    loss += float(self.recipe.train_step(batch, scale)) * scale
                window_samples += self.recipe.num_samples(batch)
            self._sum_gradients()
            # The norm of the summed gradients (the same on every rank), clipped where max_grad_norm > 0.
            params = [p for _, p in self.params]
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else
                         torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise FloatingPointError(f"step {self.step + 1}: the loss is {loss} and the gradient norm {norm}; "
                                         f"training stopped before this update (the checkpoints hold finite "
                                         f"weights): lower learning_rate, or train in bfloat16 or float32")
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.step_losses.append(loss)
            window_losses.append(loss)
            if self.step % cfg.logging_steps == 0 or self.step == self.last_step:
                now = time.perf_counter()
                record = {"step": self.step, "loss": sum(window_losses) / len(window_losses),
                          "lr": self.scheduler.get_last_lr()[0],
                          "samples_per_s": window_samples * self.world / max(now - window_start, 1e-9),
                          "peak_mem_mb": peak_memory_mb(self.device), "elapsed": now - start}
                self._log(record, bar)
                window_losses, window_samples, window_start = [], 0, now
            if self._evaluation_due():
                self.evaluate(bar)
            if bar is not None:
                bar.update(1)
            if self.step % cfg.save_steps == 0 or self.step == self.last_step:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        return self.step_losses

    # ----------------------------------------------------------------------------------------- evaluation
    def _evaluation_due(self) -> bool:
        cfg = self.config
        if getattr(self.recipe, "evaluate", None) is None:
            return False
        strategy = getattr(cfg, "eval_strategy", "no")
        if strategy == "steps" and self.step % (getattr(cfg, "eval_steps", None) or cfg.logging_steps) == 0:
            return True
        if strategy == "epoch" and self.step % self.steps_per_epoch == 0:
            return True
        return self.step == self.last_step and getattr(cfg, "do_eval", False)

    def evaluate(self, bar=None) -> Dict[str, float]:
        """The recipe's evaluation at this step, logged (``{"step": ..., **metrics}`` in log.jsonl). The model's
        train/eval mode is restored after; no RNG is drawn, so training goes on exactly as without it."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                metrics = self.recipe.evaluate()
        finally:
            self.model.train(was_training)
        record = {"step": self.step, **metrics}
        self._write_record(record)
        if self.rank == 0:
            if bar is not None:
                bar.write(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                                   for key, value in record.items()))
            logger.info("step %d: %s", self.step, metrics)
        return metrics

    def _progress_bar(self):
        if self.config.disable_tqdm or self.rank != 0:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.last_step, initial=self.step, desc="train", unit="step")

    def _write_record(self, record: Dict) -> None:
        if self.rank == 0:
            if self.reporters is not None:
                self.reporters.log(record)
            os.makedirs(self.config.output_dir, exist_ok=True)  # (evaluate() may run before any training)
            with open(os.path.join(self.config.output_dir, LOG_FILE), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _log(self, record: Dict, bar) -> None:
        if self.rank != 0:
            return
        self._write_record(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                            samples_s=f"{record['samples_per_s']:.1f}", peak_mb=f"{record['peak_mem_mb']:.0f}")
        else:
            logger.info("step %d: %s", self.step, record)

    # ----------------------------------------------------------------------------------- checkpoints
    def _resume_folder(self) -> Optional[str]:
        target = self.config.resume_from_checkpoint
        if target is None:
            return None
        if target == "latest":
            folder = latest_checkpoint(self.config.output_dir)
            if folder is None:
                logger.info("resume_from_checkpoint='latest': no checkpoint in %s, starting from step 0",
                            self.config.output_dir)
            return folder
        if not os.path.isfile(os.path.join(target, STATE_FILE)):
            raise ValueError(f"resume_from_checkpoint={target!r} holds no {STATE_FILE} (incomplete checkpoint?)")
        return target

    def save_checkpoint(self) -> str:
        """Writes ``output_dir/checkpoint-{step}``: rank 0 writes the shared files, every rank its RNG."""
        from safetensors.torch import save_file
        folder = os.path.join(self.config.output_dir, f"checkpoint-{self.step}")
        if self.rank == 0:
            os.makedirs(folder, exist_ok=True)
            self.recipe.save(folder)
            save_file({n: p.detach().contiguous().cpu() for n, p in self.params},
                      os.path.join(folder, TRAINABLE_FILE))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       os.path.join(folder, OPTIMIZER_FILE))
        _barrier()
        with open(os.path.join(folder, f"rng_state_{self.rank}.json"), "w", encoding="utf-8") as f:
            json.dump(_rng_state(), f)
        _barrier()
        if self.rank == 0:
            state = {"step": self.step, "epoch": self.epoch, "batch_index": self.batch_index,
                     "total_steps": self.total_steps, "world_size": self.world, "config": self.config.to_dict()}
            with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=2)
            limit = self.config.save_total_limit
            if limit is not None:  # only after this one is complete: a crash never leaves fewer than the limit
                for old in complete_checkpoints(self.config.output_dir)[:-limit]:
                    shutil.rmtree(old)
        _barrier()
        return folder

    def _check_same_run(self, folder: str, state: Dict) -> None:
        differences = _differences(state.get("config", {}), self.config.to_dict(), self.world,
                                   state.get("world_size", self.world))
        if differences:
            raise ValueError(f"checkpoint {folder!r} comes from a run with other settings, so resuming would not "
                             f"continue it (other batches, or other shapes): {'; '.join(differences)}")

    def load_checkpoint(self, folder: str) -> None:
        """Restores trainable weights, optimizer, scheduler, RNGs and the data position from ``folder``."""
        from safetensors.torch import load_file
        with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
        self._check_same_run(folder, state)
        saved = load_file(os.path.join(folder, TRAINABLE_FILE))
        names = [n for n, _ in self.params]
        if sorted(saved) != sorted(names):
            raise ValueError(f"checkpoint {folder!r} holds other trainable parameters than the model "
                             f"({len(saved)} saved, {len(names)} in the model)")
        with torch.no_grad():
            for name, param in self.params:
                param.copy_(saved[name])
        other = torch.load(os.path.join(folder, OPTIMIZER_FILE), map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(other["optimizer"])
        self.scheduler.load_state_dict(other["scheduler"])
        rng_file = os.path.join(folder, f"rng_state_{self.rank}.json")
        if os.path.isfile(rng_file):
            with open(rng_file, encoding="utf-8") as f:
                _set_rng_state(json.load(f))
        else:
            logger.warning("%s not found (other world size?): RNGs reseeded", rng_file)
            seed_everything(self.config.seed + state["step"])
        self.step, self.epoch, self.batch_index = state["step"], state["epoch"], state["batch_index"]
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", folder, self.step, self.epoch,
                    self.batch_index)


def _drop_records_after(log_file: str, step: int) -> None:
    """Keeps the log records up to ``step``: a run resumed there logs the later steps again (once, not twice)."""
    with open(log_file, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except ValueError:
            continue  # a record cut short by the kill
        kept.append(line)
    if len(kept) != len(lines):
        with open(log_file + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(log_file + ".tmp", log_file)


# The settings a resumed run must share with the checkpoint's: they fix the data order and position (what batch
# `batch_index` counts), the masks, and the shape of what is restored.
RESUME_KEYS = ("seed", "gradient_accumulation_steps", "max_seq_length", "lora_r", "lora_alpha", "lora_target_modules",
               "dataset_file_path", "mlm_probability", "data_collator_type", "mask_token_type")


def _differences(saved: Dict, current: Dict, world: int, saved_world: int) -> List[str]:
    found = [f"{key}: {saved[key]!r} in the checkpoint, {current[key]!r} now" for key in RESUME_KEYS
             if key in saved and key in current and saved[key] != current[key]]
    batch, saved_batch = current["per_device_train_batch_size"] * world, \
        saved.get("per_device_train_batch_size", 0) * saved_world
    if saved_batch and batch != saved_batch:
        found.append(f"global batch (per_device_train_batch_size x processes): {saved_batch} in the checkpoint, "
                     f"{batch} now")
    return found


def _rng_state() -> Dict:
    """Every RNG as JSON-able lists (a JSON file, unlike a pickle, cannot run code when loaded)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
