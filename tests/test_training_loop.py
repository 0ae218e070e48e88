"""The training loop and CLI: exact resumption, logging and checkpoint layout, step counting and the
schedule, and bad configs rejected (naming the key) before any model loads."""
import json
import os
import sys
import types

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_training_mntp import make_base, mntp_config, write_corpus  # noqa: E402


# ------------------------------------------------------------------------------------------ resume
class Crash(RuntimeError):
    pass


def _crash_after(recipe, calls: int):
    """Makes recipe.train_step raise on its ``calls + 1``-th call (a run killed mid-step)."""
    step = recipe.train_step
    seen = []

    def train_step(batch, grad_scale):
        if len(seen) == calls:
            raise Crash()
        seen.append(1)
        return step(batch, grad_scale)
    recipe.train_step = train_step


def _trainable(recipe):
    return {n: p.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    """6 steps straight vs. a run killed in step 4 then resumed from checkpoint-3 (accumulation 2, 5
    micro-batches per epoch: the resume point is inside epoch 1; LoRA dropout exercises the RNGs)."""
    from llm2vec_fast.training.loop import Trainer
    from llm2vec_fast.training.mntp import MNTPRecipe
    root = str(tmp_path)
    settings = dict(max_steps=6, save_steps=3, gradient_accumulation_steps=2, max_train_samples=20,
                    lora_dropout=0.1, warmup_steps=2, logging_steps=2)
    straight = MNTPRecipe(mntp_config(root, output_dir=f"{root}/a", **settings))
    expected = Trainer(straight).train()

    killed = MNTPRecipe(mntp_config(root, output_dir=f"{root}/b", **settings))
    _crash_after(killed, 7)
    with pytest.raises(Crash):
        Trainer(killed).train()
    assert sorted(os.listdir(f"{root}/b")) == ["checkpoint-3", "log.jsonl"]
    with open(f"{root}/b/checkpoint-3/trainer_state.json") as f:
        state = json.load(f)
    assert (state["step"], state["epoch"], state["batch_index"]) == (3, 1, 1)

    resumed = MNTPRecipe(mntp_config(root, output_dir=f"{root}/b", resume_from_checkpoint="latest", **settings))
    trainer = Trainer(resumed)
    losses = trainer.train()
    assert trainer.step == 6 and len(losses) == 3
    assert losses == expected[3:]
    with open(f"{root}/a/log.jsonl") as a, open(f"{root}/b/log.jsonl") as b:
        assert [json.loads(line) for line in b][-1]["loss"] == [json.loads(line) for line in a][-1]["loss"]
    want, got = _trainable(straight), _trainable(resumed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name

    # layout of a finished run
    folder = f"{root}/a/checkpoint-6"
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.json", "tokenizer.json",
                 "trainable.safetensors", "optimizer.pt", "rng_state_0.json", "trainer_state.json"):
        assert os.path.isfile(os.path.join(folder, name)), name
    with open(f"{root}/a/log.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [2, 4, 6]
    for record in records:
        assert set(record) == {"step", "loss", "lr", "samples_per_s", "peak_mem_mb", "elapsed"}
        assert record["samples_per_s"] > 0 and record["peak_mem_mb"] > 0
    assert records[0]["loss"] == pytest.approx(sum(expected[:2]) / 2)
    assert records[0]["lr"] == pytest.approx(1e-2 * 4 / 4)   # warmup 2 of 6, after step 2: peak, then decay
    assert records[-1]["lr"] == pytest.approx(0.0)


def test_latest_checkpoint_skips_incomplete_folders(tmp_path):
    from llm2vec_fast.training.loop import latest_checkpoint
    assert latest_checkpoint(str(tmp_path / "missing")) is None
    for step, complete in ((5, True), (20, True), (100, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-20")


# ------------------------------------------------------------------------------------------ loop on a toy recipe
class ToyRecipe:
    """Linear regression: 5 micro-batches of 3 samples per epoch."""

    def __init__(self, config):
        torch.manual_seed(0)
        self.config = config
        self.model = torch.nn.Linear(4, 1)
        self.tokenizer = None
        self.seen = []

    def batches(self, epoch):
        g = torch.Generator().manual_seed(epoch)
        for index in range(5):
            self.seen.append((epoch, index))
            yield torch.randn(3, 4, generator=g)

    def train_step(self, batch, grad_scale):
        loss = self.model(batch).pow(2).mean()
        (loss * grad_scale).backward()
        return loss.detach().float()

    def num_samples(self, batch):
        return batch.shape[0]

    def save(self, folder):
        torch.save(self.model.state_dict(), os.path.join(folder, "toy.pt"))


@pytest.mark.parametrize("schedule,warmup_key", [("linear", "warmup_steps"), ("cosine", "warmup_ratio"),
                                                 ("constant_with_warmup", "warmup_steps")])
def test_learning_rate_schedules(tmp_path, schedule, warmup_key):
    """lr_scheduler_type: linear warmup over warmup_steps (or ceil(warmup_ratio * steps)), then the named schedule,
    step by step (the learning rate each step's update used, as logged); AdamW takes the adam_* keys."""
    import math

    from llm2vec_fast.training.loop import LOG_FILE, Trainer
    from llm2vec_fast.training.mntp import MNTPRecipe
    base_lr, warmup, total = 1e-2, 2, 8
    config = mntp_config(str(tmp_path), max_steps=total, learning_rate=base_lr, lr_scheduler_type=schedule,
                         logging_steps=1, adam_beta2=0.98, adam_epsilon=1e-6,
                         **{warmup_key: warmup if warmup_key == "warmup_steps" else 0.2})  # ceil(0.2 * 8) = 2
    trainer = Trainer(MNTPRecipe(config))
    assert trainer.optimizer.defaults["betas"] == (0.9, 0.98) and trainer.optimizer.defaults["eps"] == 1e-6
    trainer.train()
    with open(os.path.join(config.output_dir, LOG_FILE)) as f:
        logged = [json.loads(line)["lr"] for line in f if '"lr"' in line]

    def expected(step):  # the rate after `step` optimizer steps (what the log records at that step)
        if step < warmup:
            return base_lr * step / warmup
        progress = (step - warmup) / (total - warmup)
        return base_lr * {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
                          "constant_with_warmup": 1.0}[schedule]
    assert logged == pytest.approx([expected(step) for step in range(1, total + 1)], abs=1e-9)


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path):
    """save_total_limit=2, a checkpoint every step: only the two newest complete checkpoints remain, and a
    resume from "latest" finds the newest."""
    from llm2vec_fast.training.loop import Trainer, latest_checkpoint
    from llm2vec_fast.training.mntp import MNTPRecipe
    root = str(tmp_path)
    config = mntp_config(root, max_steps=5, save_steps=1, save_total_limit=2)
    Trainer(MNTPRecipe(config)).train()
    kept = sorted(name for name in os.listdir(config.output_dir) if name.startswith("checkpoint-"))
    assert kept == ["checkpoint-4", "checkpoint-5"]
    assert latest_checkpoint(config.output_dir) == os.path.join(config.output_dir, "checkpoint-5")
    unlimited = mntp_config(root, output_dir=os.path.join(root, "all"), max_steps=3, save_steps=1)
    Trainer(MNTPRecipe(unlimited)).train()
    assert len([n for n in os.listdir(unlimited.output_dir) if n.startswith("checkpoint-")]) == 3


def test_epochs_set_the_step_count(tmp_path):
    from llm2vec_fast.training import TrainConfig
    from llm2vec_fast.training.loop import Trainer
    base = make_base(str(tmp_path / "base"))
    config = TrainConfig.from_dict(dict(model_name_or_path=base, output_dir=str(tmp_path / "out"),
                                        num_train_epochs=2, gradient_accumulation_steps=2, disable_tqdm=True,
                                        learning_rate=0.1, warmup_steps=1))
    recipe = ToyRecipe(config)
    trainer = Trainer(recipe)
    assert trainer.total_steps == 4  # 5 batches // 2 per step = 2 steps per epoch, 2 epochs
    recipe.seen.clear()  # (counted by iterating epoch 0: the toy has no num_batches)
    losses = trainer.train()
    assert len(losses) == 4 and all(loss > 0 for loss in losses)
    assert recipe.seen[:8] == [(0, i) for i in range(5)] + [(1, i) for i in range(3)]
    assert os.listdir(tmp_path / "out" / "checkpoint-4") != []


def test_stop_after_n_steps_stops_early_on_the_epochs_schedule(tmp_path):
    """llm2vec's stop_after_n_steps is a callback: training ends after N steps while the learning-rate schedule
    spans num_train_epochs (it was max_steps here, which decayed the rate to 0 at step N)."""
    from llm2vec_fast.training import TrainConfig
    from llm2vec_fast.training.loop import LOG_FILE, Trainer
    base = make_base(str(tmp_path / "base"))
    config = TrainConfig.from_dict(dict(model_name_or_path=base, output_dir=str(tmp_path / "out"),
                                        num_train_epochs=3, stop_after_n_steps=4, disable_tqdm=True,
                                        learning_rate=0.1, logging_steps=1, save_steps=100))
    trainer = Trainer(ToyRecipe(config))
    assert (trainer.total_steps, trainer.last_step) == (15, 4)  # 5 batches an epoch, 3 epochs
    assert len(trainer.train()) == 4
    with open(os.path.join(config.output_dir, LOG_FILE)) as f:
        logged = [json.loads(line)["lr"] for line in f if '"lr"' in line]
    assert logged == pytest.approx([0.1 * (1 - step / 15) for step in range(1, 5)], abs=1e-12)
    assert sorted(n for n in os.listdir(config.output_dir) if n.startswith("checkpoint-")) == ["checkpoint-4"]


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """A run killed in step 5 had logged steps 1 to 4 but saved only checkpoint-3; its resume logs 4 again. The
    log keeps one record a step (it held step 4 twice), the resumed run's."""
    from llm2vec_fast.training import TrainConfig
    from llm2vec_fast.training.loop import LOG_FILE, Trainer
    base = make_base(str(tmp_path / "base"))
    settings = dict(model_name_or_path=base, output_dir=str(tmp_path / "out"), max_steps=6, save_steps=3,
                    logging_steps=1, disable_tqdm=True, learning_rate=0.1)
    killed = ToyRecipe(TrainConfig.from_dict(settings))
    _crash_after(killed, 4)
    with pytest.raises(Crash):
        Trainer(killed).train()
    Trainer(ToyRecipe(TrainConfig.from_dict(dict(settings, resume_from_checkpoint="latest")))).train()
    with open(os.path.join(settings["output_dir"], LOG_FILE)) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]


def test_a_fresh_run_leaves_another_runs_checkpoints_alone_unless_told(tmp_path):
    """A new run in an output_dir holding an earlier run's checkpoint-100: save_total_limit kept the highest step
    numbers, so it deleted each of the new run's checkpoints at once. The config refuses it, naming the ways out;
    overwrite_output_dir=true removes the old checkpoints first."""
    from llm2vec_fast.training import TrainConfig
    from llm2vec_fast.training.loop import Trainer
    base = make_base(str(tmp_path / "base"))
    out = tmp_path / "out"
    (out / "checkpoint-100").mkdir(parents=True)
    (out / "checkpoint-100" / "trainer_state.json").write_text("{}")
    settings = dict(model_name_or_path=base, output_dir=str(out), max_steps=3, save_steps=1, save_total_limit=1,
                    disable_tqdm=True)
    with pytest.raises(ValueError, match=r"holds checkpoints of an earlier run \(checkpoint-100\); resume it with "
                                         r"resume_from_checkpoint='latest', set overwrite_output_dir=true"):
        TrainConfig.from_dict(settings)
    Trainer(ToyRecipe(TrainConfig.from_dict(dict(settings, overwrite_output_dir=True)))).train()
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-3"]


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])  # clipped, and not clipped (the norm computed alone)
def test_a_non_finite_loss_stops_training_before_the_update(tmp_path, max_grad_norm):
    """A NaN in the step (e.g. float16 overflow) stops training with FloatingPointError before the optimizer
    applies it: the weights keep their last finite values and no checkpoint of that step is written."""
    from llm2vec_fast.training import TrainConfig
    from llm2vec_fast.training.loop import Trainer
    base = make_base(str(tmp_path / "base"))
    config = TrainConfig.from_dict(dict(model_name_or_path=base, output_dir=str(tmp_path / "out"), max_steps=4,
                                        save_steps=1, disable_tqdm=True, learning_rate=0.1,
                                        max_grad_norm=max_grad_norm))
    recipe = ToyRecipe(config)
    step = recipe.train_step
    calls = []

    def poisoned(batch, grad_scale):
        calls.append(1)
        loss = step(batch, grad_scale)
        if len(calls) == 3:
            for param in recipe.model.parameters():
                param.grad.fill_(float("nan"))
            return float("nan")
        return loss
    recipe.train_step = poisoned
    trainer = Trainer(recipe)
    with pytest.raises(FloatingPointError, match="step 3: the loss is nan and the gradient norm nan"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in recipe.model.parameters())
    assert sorted(n for n in os.listdir(config.output_dir) if n.startswith("checkpoint-")) == \
        ["checkpoint-1", "checkpoint-2"]


def test_resume_refuses_a_checkpoint_of_a_run_with_other_settings(tmp_path):
    """A resume continues the checkpoint's run only with its batches: another global batch or seed (other rows at
    the recorded batch index) or another LoRA rank (other shapes) is refused, naming each difference."""
    from llm2vec_fast.training.loop import Trainer
    from llm2vec_fast.training.mntp import MNTPRecipe
    root = str(tmp_path)
    Trainer(MNTPRecipe(mntp_config(root, max_steps=1, save_steps=1, per_device_train_batch_size=4))).train()
    changed = mntp_config(root, max_steps=2, per_device_train_batch_size=2, seed=7,
                          resume_from_checkpoint="latest")
    with pytest.raises(ValueError, match=r"comes from a run with other settings.*seed: 42 in the checkpoint, 7 now; "
                                         r"global batch .*: 4 in the checkpoint, 2 now"):
        Trainer(MNTPRecipe(changed)).train()


# ------------------------------------------------------------------------------------------ config + CLI
def _parser():
    import argparse

    from llm2vec_fast.training.cli import add_train_parser
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A complete llm2vec-style MNTP config (with llm2vec's ignored keys and its step alias) on disk."""
    root = tmp_path_factory.mktemp("cli")
    base = make_base(str(root / "base"))
    data = write_corpus(str(root / "data.txt"))
    config = {"model_name_or_path": base, "dataset_file_path": data, "output_dir": str(root / "out"),
              "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "do_train": True,
              "do_eval": True, "max_seq_length": 32, "mask_token_type": "blank", "data_collator_type": "default",
              "mlm_probability": 0.2, "overwrite_output_dir": True, "evaluation_strategy": "steps",
              "eval_steps": 100, "validation_split_percentage": 25, "save_steps": 200, "stop_after_n_steps": 2,
              "lora_r": 16,
              "gradient_checkpointing": True, "torch_dtype": "float32", "attn_implementation": "flash_attention_2",
              "dataset_name": "wikitext", "disable_tqdm": True}
    path = root / "mntp.json"
    path.write_text(json.dumps(config))
    return str(path), config, root


def test_llm2vec_config_keys_are_accepted(valid):
    from llm2vec_fast.training.cli import load_config
    path, _, _ = valid
    config = load_config(_parser().parse_args(["train", "mntp", "--config", path, "--set", "learning_rate=3e-4",
                                               "--set", "lora_target_modules=[\"q_proj\"]",
                                               "--set", "eval_strategy=epoch"]))  # the file says evaluation_strategy
    assert config.stop_after_n_steps == 2 and config.max_steps == -1  # llm2vec's early stop, not the schedule's end
    assert config.learning_rate == 3e-4 and config.lora_target_modules == ["q_proj"] and config.eval_strategy == "epoch"
    assert config.lora_alpha == 32  # 2 * lora_r, as llm2vec's scripts set it
    assert config.attention == "llm2vec_fast"  # llm2vec's flash_attention_2 runs on our kernels


def test_cli_trains_mntp(valid):
    from llm2vec_fast.cli import main
    path, config, root = valid
    assert main(["train", "mntp", "--config", path, "--set", f"output_dir=\"{root / 'run'}\""]) == 0
    assert os.path.isfile(root / "run" / "checkpoint-2" / "adapter_model.safetensors")
    with open(root / "run" / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    evaluations = [r for r in records if "eval_loss" in r]  # do_eval: once, after the last step
    assert [r["step"] for r in evaluations] == [2] and evaluations[0]["eval_tokens"] > 0


def test_cli_prints_the_validated_config(valid, capsys, monkeypatch):
    """--print-config: every key of the validated config (defaults filled in, llm2vec's aliases resolved), and no
    model loads."""
    from llm2vec_fast.cli import main
    from llm2vec_fast.training import mntp

    def never(*args, **kwargs):
        raise AssertionError("--print-config loaded a model")
    monkeypatch.setattr(mntp.MNTPRecipe, "__init__", never)
    path, _, _ = valid
    assert main(["train", "mntp", "--config", path, "--set", "learning_rate=3e-4", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["stop_after_n_steps"] == 2 and printed["max_steps"] == -1 and printed["learning_rate"] == 3e-4
    assert printed["eval_strategy"] == "steps" and printed["lr_scheduler_type"] == "linear"
    assert "evaluation_strategy" not in printed and "dataset_name" not in printed


def _a_file(root):
    (root / "a_file").write_text("")
    return str(root / "a_file")


def _earlier_run(root):
    (root / "earlier" / "checkpoint-7").mkdir(parents=True, exist_ok=True)
    return str(root / "earlier")


def _gpt2_folder(root):
    folder = root / "gpt2"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return str(folder)


@pytest.mark.parametrize("change, error, words", [
    ({"model_name_or_path": None}, ValueError, ["'model_name_or_path'", "required"]),
    ({"learning_rate": "fast"}, TypeError, ["'learning_rate'", "float", "'fast'"]),
    ({"lora_r": 1.5}, TypeError, ["'lora_r'", "int", "1.5"]),
    ({"gradient_checkpointing": "yes"}, TypeError, ["'gradient_checkpointing'", "bool"]),
    ({"learning_rat": 1e-4}, ValueError, ["'learning_rat'", "valid keys", "learning_rate"]),
    ({"model_name_or_path": "GPT2"}, ValueError, ["'gpt2'", "not supported", "mistral"]),
    ({"model_name_or_path": "/nonexistent/model"}, ValueError, ["'model_name_or_path'", "does not exist"]),
    ({"dataset_file_path": "/nonexistent/data.txt"}, ValueError, ["'dataset_file_path'", "does not exist"]),
    ({"dataset_file_path": None}, ValueError, ["'dataset_file_path'", "required"]),
    ({"mask_token_type": "star"}, ValueError, ["'mask_token_type'", "'star'"]),
    ({"torch_dtype": "float8"}, ValueError, ["'torch_dtype'", "'float8'"]),
    ({"mlm_probability": 1.5}, ValueError, ["'mlm_probability'", "1.5"]),
    ({"lr_scheduler_type": "reduce_lr_on_plateau"}, ValueError,
     ["'lr_scheduler_type'", "'reduce_lr_on_plateau'", "'cosine'"]),
    ({"optim": "adafactor"}, ValueError, ["'optim'", "'adafactor'", "AdamW"]),
    ({"line_by_line": True}, ValueError, ["'line_by_line'", "True", "chunks"]),
    ({"deepspeed": "ds.json"}, ValueError, ["'deepspeed'", "'ds.json'", "torchrun"]),
    ({"trust_remote_code": True}, ValueError, ["'trust_remote_code'", "remote code"]),
    ({"evaluation_strategy": "sometimes"}, ValueError, ["'eval_strategy'", "'sometimes'", "'steps'"]),
    ({"eval_steps": 0}, ValueError, ["'eval_steps'", "> 0"]),
    ({"validation_split_percentage": 100}, ValueError, ["'validation_split_percentage'", "(0, 100)", "100"]),
    ({"validation_file": "/nonexistent/valid.txt"}, ValueError, ["'validation_file'", "does not exist"]),
    ({"per_device_eval_batch_size": 0}, ValueError, ["'per_device_eval_batch_size'", "> 0"]),
    ({"do_eval": "yes"}, TypeError, ["'do_eval'", "bool"]),
    ({"save_total_limit": 0}, ValueError, ["'save_total_limit'", "> 0"]),
    ({"lora_target_modules": []}, ValueError, ["'lora_target_modules'", "at least one"]),
    ({"warmup_ratio": 1.0}, ValueError, ["'warmup_ratio'", "[0, 1)"]),
    ({"adam_beta2": 1.0}, ValueError, ["'adam_beta2'", "[0, 1)"]),
    ({"adam_epsilon": 0}, ValueError, ["'adam_epsilon'", "> 0"]),
    ({"report_to": "mlflow"}, ValueError, ["'report_to'", "'mlflow'"]),
    ({"report_to": 3}, TypeError, ["'report_to'", "3"]),
    ({"learning_rate": float("nan")}, ValueError, ["'learning_rate'", "finite", "nan"]),
    ({"num_train_epochs": float("inf")}, ValueError, ["'num_train_epochs'", "finite", "inf"]),
    ({"max_grad_norm": float("nan")}, ValueError, ["'max_grad_norm'", "finite"]),  # NaN > 0 turned clipping off
    ({"seed": -1}, ValueError, ["'seed'", "[0, 2**32)", "-1"]),
    ({"seed": 2 ** 32}, ValueError, ["'seed'", "[0, 2**32)", "4294967296"]),
    ({"lora_alpha": 0}, ValueError, ["'lora_alpha'", "> 0"]),  # a LoRA scaling of 0 trains nothing
    ({"max_seq_length": 1}, ValueError, ["'max_seq_length'", ">= 2", "predicts nothing"]),
    ({"stop_after_n_steps": 0}, ValueError, ["'stop_after_n_steps'", "> 0"]),
    ({"device": "gpu"}, ValueError, ["'device'", "'gpu'"]),
    ({"output_dir": "FILE"}, ValueError, ["'output_dir'", "a file"]),
    ({"overwrite_output_dir": False, "output_dir": "EARLIER_RUN"}, ValueError,
     ["checkpoint-7", "resume_from_checkpoint='latest'", "overwrite_output_dir"]),
])
def test_bad_configs_fail_before_loading(valid, monkeypatch, change, error, words):
    from llm2vec_fast.training import cli, mntp
    _, config, root = valid

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")
    monkeypatch.setattr(mntp.MNTPRecipe, "__init__", never)
    data = dict(config)
    for key, value in change.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = {"GPT2": _gpt2_folder, "FILE": _a_file, "EARLIER_RUN": _earlier_run}.get(
                value, lambda root: value)(root) if isinstance(value, str) else value
    path = root / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(error) as info:
        cli.run(_parser().parse_args(["train", "mntp", "--config", str(path)]))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# The keys of llm2vec's shipped train_configs (mntp/qwen2.json, simcse/MetaLlama3.json and
# supervised/MetaLlama3.json), with hub names replaced by local paths.
LLM2VEC_CONFIGS = {
    "mntp": {"model_name_or_path": "BASE", "dataset_name": "wikitext", "dataset_config_name": "wikitext-103-raw-v1",
             "train_file": "TEXT", "per_device_train_batch_size": 32, "per_device_eval_batch_size": 32,
             "gradient_accumulation_steps": 1, "do_train": True, "do_eval": True, "max_seq_length": 512,
             "mask_token_type": "blank", "data_collator_type": "default", "mlm_probability": 0.2,
             "overwrite_output_dir": True, "output_dir": "OUT", "evaluation_strategy": "steps", "eval_steps": 100,
             "save_steps": 200, "stop_after_n_steps": 1000, "lora_r": 16, "gradient_checkpointing": True,
             "torch_dtype": "float16", "attn_implementation": "eager", "dataloader_num_workers": 4,
             "dataloader_prefetch_factor": 2},
    "simcse": {"model_name_or_path": "BASE", "peft_model_name_or_path": None, "simcse_dropout": 0.3,
               "bidirectional": True, "pooling_mode": "mean", "dataset_name": "Wiki1M", "dataset_file_path": "TEXT",
               "remove_unused_columns": False, "learning_rate": 3e-5, "loss_scale": 20,
               "per_device_train_batch_size": 128, "gradient_accumulation_steps": 1, "do_train": True,
               "disable_tqdm": False, "max_seq_length": 128, "overwrite_output_dir": True, "output_dir": "OUT",
               "logging_steps": 50, "save_steps": 200, "save_only_model": True, "stop_after_n_steps": 1000,
               "lora_r": 16, "gradient_checkpointing": True, "torch_dtype": "bfloat16",
               "attn_implementation": "flash_attention_2", "seed": 42},
    "supervised": {"model_name_or_path": "BASE", "peft_model_name_or_path": None, "bidirectional": True,
                   "pooling_mode": "mean", "dataset_name": "E5", "dataset_file_path": "ECHO",
                   "remove_unused_columns": False, "learning_rate": 2e-4, "num_train_epochs": 3, "warmup_steps": 300,
                   "per_device_train_batch_size": 64, "per_device_eval_batch_size": 64,
                   "gradient_accumulation_steps": 1, "do_train": True, "disable_tqdm": False, "max_seq_length": 512,
                   "overwrite_output_dir": True, "output_dir": "OUT", "logging_steps": 50, "save_steps": 200,
                   "save_only_model": True, "stop_after_n_steps": 1000, "lora_r": 16, "gradient_checkpointing": True,
                   "torch_dtype": "bfloat16", "attn_implementation": "flash_attention_2", "seed": 42},
}


@pytest.mark.parametrize("kind", sorted(LLM2VEC_CONFIGS))
def test_llm2vec_shipped_configs_load(valid, kind):
    from llm2vec_fast.training.cli import recipe_classes
    _, config, root = valid
    echo = root / "echo"
    echo.mkdir(exist_ok=True)
    (echo / "nq.jsonl").write_text(json.dumps({"query": "q", "positive": "p", "negative": "n"}) + "\n")
    paths = {"BASE": config["model_name_or_path"], "TEXT": config["dataset_file_path"], "ECHO": str(echo),
             "OUT": str(root / f"out-{kind}")}
    data = {key: paths.get(value, value) if isinstance(value, str) else value
            for key, value in LLM2VEC_CONFIGS[kind].items()}
    loaded = recipe_classes(kind)[0].from_dict(data)
    assert loaded.stop_after_n_steps == 1000 and loaded.max_steps == -1 and loaded.lora_alpha == 32
    assert loaded.dataset_file_path == paths["ECHO" if kind == "supervised" else "TEXT"]
    assert loaded.per_device_train_batch_size == data["per_device_train_batch_size"]
    # The MNTP and SimCSE files set no num_train_epochs: HF's default 3 sizes their schedules (5 toy batches an epoch).
    from llm2vec_fast.training.loop import Trainer
    assert loaded.num_train_epochs == 3 and Trainer(ToyRecipe(loaded)).total_steps == 15


def test_cli_argument_errors(valid, tmp_path, monkeypatch):
    from llm2vec_fast.training import cli
    path, _, _ = valid
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cli.run(_parser().parse_args(["train", "mntp", "--config", path, "--set", "novalue"]))
    with pytest.raises(ValueError, match="no such file"):
        cli.run(_parser().parse_args(["train", "mntp", "--config", str(tmp_path / "none.json")]))
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(TypeError, match="JSON object"):
        cli.run(_parser().parse_args(["train", "mntp", "--config", str(tmp_path / "list.json")]))
    with pytest.raises(SystemExit):
        _parser().parse_args(["train", "bogus", "--config", path])
    # the contrastive recipes come from training.contrastive: a clear error when it lacks them
    import llm2vec_fast.training as training
    monkeypatch.delattr(training, "contrastive", raising=False)
    monkeypatch.setitem(sys.modules, "llm2vec_fast.training.contrastive", types.ModuleType("contrastive"))
    with pytest.raises(ImportError, match="SimCSEConfig"):
        cli.recipe_classes("simcse")


# ------------------------------------------------------------------------------------------ report_to
class _FakeSummaryWriter:
    """torch.utils.tensorboard's SummaryWriter, recording (tag, value, step) (tensorboard is not a dependency)."""
    instances = []

    def __init__(self, log_dir=None):
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def _fake_wandb():
    calls = []
    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: calls.append(("init", kwargs))
    module.log = lambda data, step: calls.append(("log", data, step))
    module.finish = lambda: calls.append(("finish",))
    return module, calls


def test_report_to_tensorboard_and_wandb(tmp_path, monkeypatch):
    """report_to ["tensorboard", "wandb"]: every log.jsonl record (training and evaluation) goes to both as
    Hugging Face's scalar names at its step; the writer is closed and the run finished at the end, even when a
    step raises. Fake modules stand in for the packages (not dependencies)."""
    from llm2vec_fast.training import reporting
    from llm2vec_fast.training.loop import LOG_FILE, Trainer
    from llm2vec_fast.training.mntp import MNTPRecipe
    board = types.ModuleType("torch.utils.tensorboard")
    board.SummaryWriter = _FakeSummaryWriter
    wandb, calls = _fake_wandb()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", board)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setattr(reporting, "installed", lambda name: True)
    _FakeSummaryWriter.instances.clear()
    config = mntp_config(str(tmp_path), max_steps=4, logging_steps=2, report_to=["tensorboard", "wandb"],
                         run_name="tiny", do_eval=True, validation_split_percentage=20)
    Trainer(MNTPRecipe(config)).train()
    with open(os.path.join(config.output_dir, LOG_FILE)) as f:
        records = [json.loads(line) for line in f]
    assert any("eval_loss" in r for r in records)
    expected = [(reporting.scalar_name(k), float(v), r["step"]) for r in records for k, v in r.items() if k != "step"]
    (writer,) = _FakeSummaryWriter.instances
    assert writer.log_dir == os.path.join(config.output_dir, "runs") and writer.closed
    assert writer.scalars == expected
    assert ("train/learning_rate", records[0]["lr"], 2) in writer.scalars
    assert ("eval/loss", [r for r in records if "eval_loss" in r][0]["eval_loss"], 4) in writer.scalars
    assert calls[0][0] == "init" and calls[0][1]["name"] == "tiny" and calls[0][1]["config"]["max_steps"] == 4
    assert [(name, step) for name, *rest in calls[1:-1] for step in rest[1:]] == [("log", r["step"]) for r in records]
    assert calls[-1] == ("finish",)
    # a run that fails still closes its integrations
    failing = MNTPRecipe(mntp_config(str(tmp_path), output_dir=str(tmp_path / "failing"), max_steps=4,
                                     report_to="tensorboard", logging_dir=str(tmp_path / "tb")))
    _crash_after(failing, 1)
    with pytest.raises(Crash):
        Trainer(failing).train()
    assert _FakeSummaryWriter.instances[-1].closed and _FakeSummaryWriter.instances[-1].log_dir == str(tmp_path / "tb")


def test_report_to_values(monkeypatch):
    from llm2vec_fast.training import reporting
    monkeypatch.setattr(reporting, "installed", lambda name: name == "tensorboard")
    assert reporting.resolve_report_to(None) == [] and reporting.resolve_report_to("none") == []
    assert reporting.resolve_report_to("all") == ["tensorboard"]
    assert reporting.resolve_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]
    with pytest.raises(ValueError, match=r"names 'wandb', which needs the wandb package: pip install wandb"):
        reporting.resolve_report_to(["tensorboard", "wandb"])
    with pytest.raises(ValueError, match=r"'report_to' takes 'none', 'all' or names from .*got 'mlflow'"):
        reporting.resolve_report_to("mlflow")
    assert reporting.scalar_name("eval_accuracy") == "eval/accuracy"
    assert reporting.scalar_name("samples_per_s") == "train/samples_per_s"
