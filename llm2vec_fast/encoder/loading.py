"""Checkpoint loading for :meth:`LLM2Vec.from_pretrained`: local-first, safetensors only, no remote code.

Files are found in a local folder, or else through ``huggingface_hub`` (its cache; it honours
``HF_HUB_OFFLINE=1``), so a local checkpoint never touches the network.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from typing import Any, Dict, Iterator, Optional, Tuple

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LLM2VEC_CONFIG = "llm2vec_config.json"
# from_pretrained kwargs that also apply to the tokenizer, the config and adapter files.
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download")


def hub_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    return {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}


def resolve_file(path_or_id: str, filename: str, hub: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """The local path of ``filename`` in a folder or hub repository, or None when it has no such file."""
    path_or_id = os.fspath(path_or_id)
    if os.path.isdir(path_or_id):
        path = os.path.join(path_or_id, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    try:
        return hf_hub_download(path_or_id, filename, **(hub or {}))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def read_json(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def adapter_folder(path_or_id: str, hub: Optional[Dict[str, Any]] = None) -> str:
    """A local folder holding the adapter's config and safetensors weights (raises if it has only pickles)."""
    config = resolve_file(path_or_id, ADAPTER_CONFIG, hub)
    if config is None and not os.path.isdir(os.fspath(path_or_id)):
        raise ValueError(f"{path_or_id!r} is no local folder, and the hub cache holds no {ADAPTER_CONFIG} for it: "
                         f"pass the adapter's local folder, or download it first (nothing is fetched with "
                         f"HF_HUB_OFFLINE=1 or without a network)")
    if config is None:
        raise ValueError(f"{path_or_id!r} holds no {ADAPTER_CONFIG}: not a peft adapter")
    weights = resolve_file(path_or_id, ADAPTER_WEIGHTS, hub)
    if weights is None:
        raise ValueError(f"{path_or_id!r} holds no {ADAPTER_WEIGHTS}: only safetensors adapters are loaded (a "
                         f"pickled adapter_model.bin can run arbitrary code; convert it with safetensors first)")
    if os.path.dirname(config) != os.path.dirname(weights):
        raise ValueError(f"{path_or_id!r}: adapter config and weights resolved to different folders")
    return os.path.dirname(config)


def fit_vocabulary(model, adapter_folder_path: str) -> None:
    """Resizes ``model``'s token embeddings to the rows of the embedding matrix the adapter saved whole, where
    that has more (peft saves it where training added tokens, as MNTP's ``<mask>``): peft could not load it
    onto the smaller matrix."""
    from safetensors import safe_open
    embeddings = model.get_input_embeddings()
    name = next((n for n, module in model.named_modules() if module is embeddings), None)
    if name is None:
        return
    with safe_open(os.path.join(adapter_folder_path, ADAPTER_WEIGHTS), framework="pt") as f:
        rows = [f.get_slice(key).get_shape()[0] for key in f.keys() if key.endswith(f"{name}.weight")]
    if rows and max(rows) > embeddings.weight.shape[0]:
        model.resize_token_embeddings(max(rows), mean_resizing=False)


# The files each layout of a saved model consists of (what from_pretrained reads to choose and load it).
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin")
WEIGHT_FILES = re.compile(r"model\.safetensors|model\.safetensors\.index\.json|model-\d+-of-\d+\.safetensors")


def remove_other_layout(folder: str, adapter: bool) -> None:
    """After a save of an adapter (``adapter=True``) or of full weights into ``folder``: removes the other
    layout's files an earlier save left there, which from_pretrained would combine with the new ones (an old
    adapter merged again into merged weights, or old weights under a new adapter), with a warning."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    stale = sorted(n for n in names if (WEIGHT_FILES.fullmatch(n) if adapter else n in ADAPTER_FILES))
    for name in stale:
        os.remove(os.path.join(folder, name))
    if stale:
        warnings.warn(f"save: removed {', '.join(stale)} from {folder!r}, left by an earlier save of "
                      f"{'full weights' if adapter else 'an adapter'}: loading the folder would have combined them "
                      f"with the {'adapter' if adapter else 'weights'} saved now", UserWarning, stacklevel=3)


def name_or_path(base: str, loaded_from: str) -> str:
    """The name llm2vec keys its templates on: for a local folder, the ``_name_or_path`` recorded in its
    config.json ("" if absent, as transformers 4.44 reads it); otherwise the path the weights were
    loaded from (what transformers sets)."""
    config_file = os.path.join(os.fspath(base), "config.json")
    if os.path.isdir(os.fspath(base)) and os.path.isfile(config_file):
        return str(read_json(config_file).get("_name_or_path", ""))
    return os.fspath(loaded_from)


def llm2vec_config(path_or_id: Optional[str]) -> Dict[str, Any]:
    """``llm2vec_config.json`` of a local folder ({} when absent; llm2vec reads it from folders only)."""
    if path_or_id is None:
        return {}
    path = os.path.join(os.fspath(path_or_id), LLM2VEC_CONFIG)
    return read_json(path) if os.path.exists(path) else {}


def record_name_or_path(folder: str, name: str) -> None:
    """Writes ``_name_or_path`` into ``folder/config.json`` (transformers 5 no longer saves it, and
    llm2vec's templates are keyed on it)."""
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        return
    data = read_json(config_file)
    data = {"_name_or_path": name, **{k: v for k, v in data.items() if k != "_name_or_path"}}
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def holds_weights(folder: str) -> bool:
    """Whether a local folder holds full safetensors model weights."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return False
    return any(os.path.isfile(os.path.join(folder, name))
               for name in ("model.safetensors", "model.safetensors.index.json"))


@contextlib.contextmanager
def without_adapter(folder: str) -> Iterator[str]:
    """A temporary folder linking every file of ``folder`` except the peft adapter's."""
    with tempfile.TemporaryDirectory(prefix="llm2vec_fast_") as view:
        for name in os.listdir(folder):
            if name == ADAPTER_CONFIG or name.startswith("adapter_model."):
                continue
            source = os.path.join(os.path.abspath(folder), name)
            target = os.path.join(view, name)
            try:
                os.symlink(source, target)
            except OSError:
                (shutil.copytree if os.path.isdir(source) else shutil.copy)(source, target)
        yield view


def merged_weights(peft_model) -> Tuple[Any, Dict[str, Any]]:
    """The transformers model under ``peft_model`` and the state dict ``merge_and_unload()`` would leave it
    with, computed layer by layer (``W + get_delta_weight``, as peft's merge adds it) without changing the
    model: an unmerged adapter saved as full weights, the encoder keeping its adapter. Plain LoRA on linear
    layers only (llm2vec's adapters); anything else raises ValueError."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    def unsupported(name: str, what: str) -> ValueError:
        return ValueError(f"the encoder's peft model can be saved merged here only with plain LoRA on linear "
                          f"layers; {name} has {what}. Merge it first (encoder.model = "
                          f"encoder.model.merge_and_unload()) or save the adapter with LLM2Vec.save")

    base = peft_model.get_base_model()
    merged: Dict[str, Any] = {}
    for name, module in base.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            raise unsupported(name, "modules_to_save")
        if not isinstance(module, BaseTunerLayer):
            continue
        if not isinstance(module, LoraLinear):
            raise unsupported(name, f"a {type(module).__name__} layer")
        if module.disable_adapters:
            raise unsupported(name, "its adapters disabled")
        weight = module.get_base_layer().weight.detach()
        for adapter in module.active_adapters:
            if adapter not in module.lora_A or adapter in module.merged_adapters:
                continue
            if adapter in module.lora_variant or module.lora_bias[adapter]:
                raise unsupported(name, f"adapter {adapter!r} with DoRA or a LoRA bias")
            weight = weight + module.get_delta_weight(adapter).detach()
        merged[f"{name}.weight"] = weight
    state = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")  # peft's wrapped layer: its own weights are the model's
        state[key] = merged.get(key, tensor)
    return base, state
