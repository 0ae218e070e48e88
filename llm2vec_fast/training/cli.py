"""``llm2vec-fast train {mntp,simcse,supervised} --config CONFIG.json [--set key=value ...] [--print-config]``.

The config is validated (keys, types, model family, data paths) before anything loads. Run several
processes with ``torchrun --nproc_per_node N -m llm2vec_fast.cli train ...``.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, Tuple

RECIPES = ("mntp", "simcse", "supervised")


def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a recipe (mntp, simcse, supervised) from a JSON config",
                                   description=__doc__)
    parser.add_argument("recipe", choices=RECIPES)
    parser.add_argument("--config", required=True, help="JSON file with llm2vec train_configs keys")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key; VALUE is parsed as JSON when it can be (repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the validated config (every key, defaults filled in, aliases resolved) as JSON "
                             "and exit without loading a model")
    parser.set_defaults(run=run)


def recipe_classes(name: str) -> Tuple[type, type]:
    """(config class, recipe class) of a recipe; the contrastive ones come from training.contrastive."""
    if name == "mntp":
        from .config import MNTPConfig
        from .mntp import MNTPRecipe
        return MNTPConfig, MNTPRecipe
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {name!r}")
    try:
        from . import contrastive
    except ImportError as err:
        raise ImportError(f"the {name!r} recipe needs llm2vec_fast.training.contrastive, which failed to "
                          f"import: {err}") from err
    names = {"simcse": ("SimCSEConfig", "SimCSERecipe"), "supervised": ("SupervisedConfig", "SupervisedRecipe")}
    config_name, recipe_name = names[name]
    missing = [n for n in (config_name, recipe_name) if not hasattr(contrastive, n)]
    if missing:
        raise ImportError(f"llm2vec_fast.training.contrastive has no {', '.join(missing)}")
    return getattr(contrastive, config_name), getattr(contrastive, recipe_name)


def parse_overrides(items) -> Dict[str, Any]:
    """``key=value`` strings -> dict; values are JSON when they parse (1e-4, true, null, [..]), else strings."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def load_config(args):
    """The validated config of ``args.recipe``: the JSON file with ``--set`` overrides applied."""
    config_class, _ = recipe_classes(args.recipe)
    try:
        with open(args.config, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--config {args.config!r}: no such file") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--config {args.config!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise TypeError(f"--config {args.config!r} must hold a JSON object, got {type(data).__name__}")
    overrides = parse_overrides(getattr(args, "overrides", []) or [])
    target = config_class.ALIASES.get  # alias -> key; a key maps to itself
    for key in overrides:  # --set max_steps=3 replaces the file's stop_after_n_steps (its alias), and back
        for other in [k for k in data if k != key and target(k, k) == target(key, key)]:
            del data[other]
    data.update(overrides)
    return config_class.from_dict(data)


def run(args) -> int:
    """Validates the config, builds the recipe and trains it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args)
    if getattr(args, "print_config", False):
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return 0
    _, recipe_class = recipe_classes(args.recipe)
    from .loop import Trainer
    import torch.distributed as dist
    try:
        recipe = recipe_class(config)
        Trainer(recipe).train()
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
