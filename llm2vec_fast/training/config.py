"""Training configuration: one dataclass per recipe, read from llm2vec-style ``train_configs`` JSON.

``TrainConfig`` holds the fields every recipe shares (llm2vec's key names); recipes subclass it and add
their own fields, each with a default. ``from_dict``/``from_json`` check everything that can be checked
without loading a model (unknown keys, types, required fields, the model folder's family, data paths), so
a bad config fails in a second rather than after minutes of loading weights.

    cfg = MNTPConfig.from_json("train_configs/mntp/Mistral.json")
    cfg = MNTPConfig.from_dict({"model_name_or_path": "/models/mistral", "output_dir": "out", ...})
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, FrozenSet, List, Optional, Tuple, Union

from .reporting import resolve_report_to

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The same seven projections where a family fuses them (Phi-3: one qkv_proj, one gate_up_proj).
LORA_TARGETS_BY_FAMILY = {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}
TORCH_DTYPES = ("bfloat16", "float16", "float32", "auto")
# lr_scheduler_type values (HF's names, built by transformers.get_scheduler from warmup_steps and the step count).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")
# attn_implementation values a config may name. llm2vec's configs say "flash_attention_2": that maps to ours
# (which itself dispatches to flash-attn when installed), so those configs run without the flash_attn package.
ATTN_IMPLEMENTATIONS = (None, "llm2vec_fast", "flash_attention_2", "sdpa", "eager")

# Keys of llm2vec's train_configs (HF TrainingArguments / DataTrainingArguments) that change nothing in how
# a model trains here (evaluation, logging destinations, hub, data-loading plumbing, precision flags: the
# precision is torch_dtype's): accepted so those files load unchanged, and reported once in the log.
IGNORED_LLM2VEC_KEYS = frozenset({
    "do_train", "do_eval", "do_predict", "evaluation_strategy", "eval_strategy",
    "eval_steps", "per_device_eval_batch_size", "remove_unused_columns", "save_only_model",
    "experiment_id", "logging_first_step", "logging_strategy", "logging_nan_inf_filter",
    "save_strategy", "save_safetensors", "dataloader_num_workers", "dataloader_drop_last",
    "dataloader_prefetch_factor", "dataloader_pin_memory", "dataloader_persistent_workers",
    "preprocessing_num_workers", "overwrite_cache", "validation_split_percentage", "max_eval_samples", "cache_dir",
    "use_fast_tokenizer", "model_revision", "token", "use_auth_token", "low_cpu_mem_usage",
    "ddp_find_unused_parameters", "ddp_timeout", "fp16", "bf16", "tf32", "metric_for_best_model",
    "greater_is_better", "hub_model_id", "hub_strategy", "hub_token", "config_name", "tokenizer_name", "model_type",
    "config_overrides", "dataset_name", "dataset_config_name", "validation_file", "pad_to_max_length",
    "pad_to_multiple_of_8", "local_rank",
})

def checkpoint_folders(output_dir: str) -> List[str]:
    """The ``checkpoint-N`` folders of ``output_dir`` (complete or not), lowest N first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [folder for _, folder in sorted(found)]


# Keys that would change the training if set to anything but what this trainer does: accepted at these
# values (llm2vec's, or HF's defaults), refused otherwise, so that a config never trains differently in silence.
VALUE_CHECKED_KEYS: Dict[str, Tuple[Tuple[Any, ...], str]] = {
    "optim": (("adamw_torch", "adamw_torch_fused", "adamw_hf"), "the optimizer here is torch's AdamW"),
    "line_by_line": ((False,), "MNTP groups the text into fixed-length chunks"),
    "streaming": ((False,), "the data are read from local files"),
    "trust_remote_code": ((False,), "no remote code is run"),
    "deepspeed": ((None,), "training runs with torchrun (DDP), not DeepSpeed"),
    "push_to_hub": ((False,), "checkpoints are written to output_dir only"),
    "load_best_model_at_end": ((False,), "the last step's weights are what a run saves"),
}


def _check_value(key: str, value: Any) -> None:
    allowed, why = VALUE_CHECKED_KEYS[key]
    if not any(value is a if a is None or isinstance(a, bool) else value == a for a in allowed):
        raise ValueError(f"config key {key!r} is {value!r}, which this trainer does not do ({why}); remove the key "
                         f"or set it to {' or '.join(repr(a) for a in allowed)}")


@dataclass
class TrainConfig:
    """Fields shared by every recipe. ``model_name_or_path`` and ``output_dir`` are required."""

    model_name_or_path: Optional[str] = None
    output_dir: Optional[str] = None
    peft_model_name_or_path: Optional[str] = None
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # HF's: warmup over ceil(ratio * total steps) when warmup_steps is 0
    lr_scheduler_type: str = "linear"  # after the linear warmup (see LR_SCHEDULERS)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    # HF TrainingArguments' default: llm2vec's MNTP and SimCSE train_configs leave it out, so their learning-rate
    # schedules span 3 epochs (stop_after_n_steps ends those runs long before).
    num_train_epochs: float = 3.0
    max_steps: int = -1
    # llm2vec's callback: stop after N optimizer steps, the learning-rate schedule still spanning max_steps (or
    # num_train_epochs), where max_steps ends the schedule too.
    stop_after_n_steps: Optional[int] = None
    seed: int = 42
    max_seq_length: int = 512
    lora_r: int = 16
    lora_alpha: Optional[int] = None  # None: 2 * lora_r, as llm2vec's run scripts set it
    lora_dropout: float = 0.05
    lora_target_modules: Optional[List[str]] = None  # None: every projection of the family (lora_targets)
    gradient_checkpointing: bool = True
    torch_dtype: str = "bfloat16"
    attn_implementation: Optional[str] = None
    bidirectional: bool = True
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: Optional[int] = None  # keep the newest N complete checkpoints (HF's key); None: all
    max_grad_norm: float = 1.0
    resume_from_checkpoint: Optional[str] = None
    # A run that does not resume refuses an output_dir holding checkpoints (their rotation would be mixed with its
    # own, and "latest" would find them); True removes them first (HF's overwrite of the output directory).
    overwrite_output_dir: bool = False
    device: Optional[str] = None
    disable_tqdm: bool = False
    # Hugging Face's: "none", "all", or integrations ("tensorboard", "wandb"); see training/reporting.py.
    report_to: Optional[Union[str, List[str]]] = None
    run_name: Optional[str] = None
    logging_dir: Optional[str] = None  # TensorBoard's event files; None: <output_dir>/runs
    grad_cache_chunk_size: Optional[int] = None
    # Each step inside models.lean.lean_layers: MLP activations, RMSNorms and LoRA terms recomputed in the
    # backward (same gradients, about a third of the activation memory per layer, some elementwise work twice).
    lean_layers: bool = True

    REQUIRED: ClassVar[Tuple[str, ...]] = ("model_name_or_path", "output_dir")
    ALIASES: ClassVar[Dict[str, str]] = {}
    IGNORED_KEYS: ClassVar[FrozenSet[str]] = IGNORED_LLM2VEC_KEYS

    # ----------------------------------------------------------------------------------------------- build
    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainConfig":
        """A validated config from a dict of llm2vec-style keys (aliases mapped, ignored keys dropped)."""
        if not isinstance(data, dict):
            raise TypeError(f"a training config must be a JSON object (dict), got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        values: Dict[str, Any] = {}
        ignored = []
        for key, value in data.items():
            target = key if key in names else cls.ALIASES.get(key)
            if target is None or target not in names:
                if key in VALUE_CHECKED_KEYS:
                    _check_value(key, value)
                elif key not in cls.IGNORED_KEYS:
                    raise ValueError(f"unknown config key {key!r} for {cls.__name__}; valid keys: "
                                     f"{', '.join(sorted(names | set(cls.ALIASES)))}")
                ignored.append(key)
                continue
            if target in values:
                raise ValueError(f"config key {key!r} sets {target!r}, which is already set by another key")
            values[target] = value
        if ignored:
            logger.info("ignoring llm2vec config keys with no meaning here: %s", ", ".join(sorted(ignored)))
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_json(cls, path: str) -> "TrainConfig":
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"config file {path!r} is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # -------------------------------------------------------------------------------------------- validate
    def validate(self) -> None:
        """Checks that need no model. Subclasses extend it (call ``super().validate()`` first)."""
        for name in self.REQUIRED:
            if getattr(self, name) in (None, ""):
                raise ValueError(f"config key {name!r} is required (got {getattr(self, name)!r})")
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_type(f.name, getattr(self, f.name), hints[f.name])
        # ints where floats are expected are fine; store floats so the loop never sees a mix.
        for f in dataclasses.fields(self):
            if hints[f.name] is float and isinstance(getattr(self, f.name), int):
                setattr(self, f.name, float(getattr(self, f.name)))

        for f in dataclasses.fields(self):  # NaN passes every comparison below, and inf overflows the schedule
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"config key {f.name!r} must be a finite number, got {value!r}")
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_r
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"config key 'seed' must be in [0, 2**32), got {self.seed!r}")
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length", "lora_r",
                    "lora_alpha", "logging_steps", "save_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"config key {name!r} must be > 0, got {getattr(self, name)!r}")
        for name in ("learning_rate", "weight_decay", "warmup_steps", "max_grad_norm", "num_train_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"config key {name!r} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"config key 'lora_dropout' must be in [0, 1), got {self.lora_dropout!r}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set 'max_steps' (> 0) or 'num_train_epochs' (> 0); got "
                             f"max_steps={self.max_steps!r}, num_train_epochs={self.num_train_epochs!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"config key 'warmup_ratio' must be in [0, 1), got {self.warmup_ratio!r}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"config key {name!r} must be in [0, 1), got {getattr(self, name)!r}")
        if self.adam_epsilon <= 0:
            raise ValueError(f"config key 'adam_epsilon' must be > 0, got {self.adam_epsilon!r}")
        resolve_report_to(self.report_to)
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise ValueError(f"config key 'lr_scheduler_type' must be one of {LR_SCHEDULERS}, "
                             f"got {self.lr_scheduler_type!r}")
        if self.torch_dtype not in TORCH_DTYPES:
            raise ValueError(f"config key 'torch_dtype' must be one of {TORCH_DTYPES}, got {self.torch_dtype!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"config key 'attn_implementation' must be one of {ATTN_IMPLEMENTATIONS}, "
                             f"got {self.attn_implementation!r}")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ValueError("config key 'lora_target_modules' must name at least one module, or be null (every "
                             "projection of the family), got []")
        if self.stop_after_n_steps is not None and self.stop_after_n_steps <= 0:
            raise ValueError(f"config key 'stop_after_n_steps' must be > 0 or null, got {self.stop_after_n_steps!r}")
        if self.save_total_limit is not None and self.save_total_limit <= 0:
            raise ValueError(f"config key 'save_total_limit' must be > 0 or null, got {self.save_total_limit!r}")
        if self.grad_cache_chunk_size is not None and self.grad_cache_chunk_size <= 0:
            raise ValueError(f"config key 'grad_cache_chunk_size' must be > 0 or null, "
                             f"got {self.grad_cache_chunk_size!r}")
        self.model_type  # noqa: B018  (raises for a missing folder or an unsupported family)
        if os.path.isfile(self.output_dir):
            raise ValueError(f"config key 'output_dir' must be a folder, got {self.output_dir!r}: a file")
        if self.device is not None:
            try:
                import torch
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"config key 'device' must be a torch device such as 'cuda', 'cuda:1' or 'cpu', "
                                 f"got {self.device!r}") from None
        earlier = checkpoint_folders(self.output_dir)
        if self.resume_from_checkpoint is None and earlier and not self.overwrite_output_dir:
            raise ValueError(f"output_dir {self.output_dir!r} holds checkpoints of an earlier run "
                             f"({', '.join(os.path.basename(f) for f in earlier[-3:])}); resume it with "
                             f"resume_from_checkpoint='latest', set overwrite_output_dir=true to remove them and start "
                             f"over, or choose another output_dir")
        if self.peft_model_name_or_path is not None and not os.path.isdir(self.peft_model_name_or_path):
            raise ValueError(f"config key 'peft_model_name_or_path' must be a local adapter folder; "
                             f"{self.peft_model_name_or_path!r} does not exist")
        if (self.resume_from_checkpoint not in (None, "latest")
                and not os.path.isdir(self.resume_from_checkpoint)):
            raise ValueError(f"config key 'resume_from_checkpoint' must be 'latest' or a checkpoint folder; "
                             f"{self.resume_from_checkpoint!r} does not exist")

    @property
    def model_type(self) -> str:
        """``model_type`` from the model folder's config.json; raises unless it is a supported family."""
        from ..models.bidirectional import SUPPORTED_MODEL_TYPES
        folder = self.model_name_or_path
        config_file = os.path.join(folder, "config.json")
        if not os.path.isdir(folder):
            raise ValueError(f"config key 'model_name_or_path' must be a local model folder (training never "
                             f"downloads); {folder!r} does not exist")
        if not os.path.isfile(config_file):
            raise ValueError(f"config key 'model_name_or_path': {folder!r} holds no config.json")
        with open(config_file, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config key 'model_name_or_path': model family {model_type!r} of {folder!r} is not "
                             f"supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
        return model_type

    @property
    def lora_targets(self) -> List[str]:
        """``lora_target_modules``, or by default every attention and MLP projection of the model's family
        (q, k, v, o, gate, up, down; llm2vec's choice)."""
        if self.lora_target_modules is not None:
            return list(self.lora_target_modules)
        return list(LORA_TARGETS_BY_FAMILY.get(self.model_type, DEFAULT_LORA_TARGETS))

    @property
    def attention(self) -> str:
        """The attn_implementation to load with (None and "flash_attention_2" mean ours)."""
        if self.attn_implementation in (None, "flash_attention_2"):
            return "llm2vec_fast"
        return self.attn_implementation


# The evaluation keys of llm2vec's run_mntp.py (HF's names): MNTP evaluates, the other recipes ignore them.
EVALUATION_KEYS = frozenset({"do_eval", "evaluation_strategy", "eval_strategy", "eval_steps",
                             "per_device_eval_batch_size", "validation_file", "validation_split_percentage",
                             "max_eval_samples"})


@dataclass
class MNTPConfig(TrainConfig):
    """Masked next-token prediction (llm2vec's ``run_mntp.py`` keys; its ``train_file`` names the data too).

    Evaluation (llm2vec's ``do_eval`` / ``evaluation_strategy`` / ``eval_steps``): the MNTP loss, token
    accuracy and perplexity on held-out chunks, every ``eval_steps`` steps with ``eval_strategy="steps"``,
    at each epoch's end with ``"epoch"``, and after the last step with ``do_eval``. The held-out text is
    ``validation_file``, else the first ``validation_split_percentage`` % of the documents, which then do
    not train (llm2vec's split; without evaluation every document trains).
    """

    dataset_file_path: Optional[str] = None
    mask_token_type: str = "blank"
    data_collator_type: str = "default"
    mlm_probability: float = 0.2
    max_train_samples: Optional[int] = None
    do_eval: bool = False
    eval_strategy: str = "no"
    eval_steps: Optional[int] = None
    per_device_eval_batch_size: int = 8
    validation_file: Optional[str] = None
    validation_split_percentage: int = 5
    max_eval_samples: Optional[int] = None

    ALIASES: ClassVar[Dict[str, str]] = {**TrainConfig.ALIASES, "train_file": "dataset_file_path",
                                         "evaluation_strategy": "eval_strategy"}
    IGNORED_KEYS: ClassVar[FrozenSet[str]] = IGNORED_LLM2VEC_KEYS - EVALUATION_KEYS
    MASK_TOKEN_TYPES: ClassVar[Tuple[str, ...]] = ("blank", "eos", "mask")
    COLLATOR_TYPES: ClassVar[Tuple[str, ...]] = ("default", "all_mask")
    EVAL_STRATEGIES: ClassVar[Tuple[str, ...]] = ("no", "steps", "epoch")

    @property
    def evaluates(self) -> bool:
        """Whether this run evaluates at all (and so holds text out)."""
        return self.do_eval or self.eval_strategy != "no"

    def validate(self) -> None:
        super().validate()
        if self.max_seq_length < 2:
            raise ValueError(f"config key 'max_seq_length' must be >= 2 for MNTP (token i is predicted at position "
                             f"i - 1: a one-token chunk predicts nothing), got {self.max_seq_length}")
        if self.mask_token_type not in self.MASK_TOKEN_TYPES:
            raise ValueError(f"config key 'mask_token_type' must be one of {self.MASK_TOKEN_TYPES}, "
                             f"got {self.mask_token_type!r}")
        if self.data_collator_type not in self.COLLATOR_TYPES:
            raise ValueError(f"config key 'data_collator_type' must be one of {self.COLLATOR_TYPES}, "
                             f"got {self.data_collator_type!r}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"config key 'mlm_probability' must be in (0, 1), got {self.mlm_probability!r}")
        if self.max_train_samples is not None and self.max_train_samples <= 0:
            raise ValueError(f"config key 'max_train_samples' must be > 0 or null, got {self.max_train_samples!r}")
        if not self.bidirectional:
            raise ValueError("config key 'bidirectional' must be true for MNTP (it trains the bidirectional model)")
        if self.peft_model_name_or_path is not None:
            raise ValueError(f"config key 'peft_model_name_or_path' is not used by MNTP (it trains a fresh LoRA on "
                             f"the base); got {self.peft_model_name_or_path!r}")
        if self.dataset_file_path is None:
            raise ValueError("config key 'dataset_file_path' is required for MNTP (a .txt/.jsonl file or a folder "
                             "of them; hub datasets such as 'dataset_name' are not downloaded)")
        data_files(self.dataset_file_path)  # raises when missing or empty
        if self.eval_strategy not in self.EVAL_STRATEGIES:
            raise ValueError(f"config key 'eval_strategy' must be one of {self.EVAL_STRATEGIES}, "
                             f"got {self.eval_strategy!r}")
        for name in ("eval_steps", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"config key {name!r} must be > 0 or null, got {getattr(self, name)!r}")
        if self.per_device_eval_batch_size <= 0:
            raise ValueError(f"config key 'per_device_eval_batch_size' must be > 0, "
                             f"got {self.per_device_eval_batch_size!r}")
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError(f"config key 'validation_split_percentage' must be in (0, 100), "
                             f"got {self.validation_split_percentage!r}")
        if self.validation_file is not None:
            data_files(self.validation_file, key="validation_file")


DATA_SUFFIXES = (".txt", ".jsonl")


def data_files(path: str, key: str = "dataset_file_path") -> List[str]:
    """The .txt/.jsonl files at ``path`` (a file, or a folder searched recursively), sorted. ``key`` names the
    config key in errors."""
    if os.path.isfile(path):
        if not path.endswith(DATA_SUFFIXES):
            raise ValueError(f"config key {key!r}: {path!r} must end in one of {DATA_SUFFIXES}")
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"config key {key!r}: {path!r} does not exist")
    found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                   if name.endswith(DATA_SUFFIXES))
    if not found:
        raise ValueError(f"config key {key!r}: folder {path!r} holds no {DATA_SUFFIXES} files")
    return found


# ------------------------------------------------------------------------------------------------ type checks
def check_type(name: str, value: Any, hint: Any) -> None:
    """Raises TypeError unless ``value`` matches the annotation ``hint`` (bool is not an int here)."""
    if not _matches(value, hint):
        raise TypeError(f"config key {name!r} expects {_describe(hint)}, got {value!r} ({type(value).__name__})")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, List):
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin in (dict, Dict):
        return isinstance(value, dict)
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin in (list, List):
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))
