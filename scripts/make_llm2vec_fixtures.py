#!/usr/bin/env python3
"""Builds the llm2vec 0.2.3 parity fixtures in ``tests/fixtures/llm2vec/``.

llm2vec 0.2.3 only runs on transformers 4.43.1 to 4.44.2, so this script runs in a SEPARATE virtual
environment, never the project's own::

    python3 -m venv /tmp/llm2vec_ref
    /tmp/llm2vec_ref/bin/pip install torch==2.13.0 transformers==4.44.2 'peft<0.14' numpy tqdm \\
        datasets evaluate scikit-learn
    /tmp/llm2vec_ref/bin/pip install --no-deps llm2vec==0.2.3
    /tmp/llm2vec_ref/bin/python scripts/make_llm2vec_fixtures.py

(fixtures were made with torch 2.13.0+cpu, transformers 4.44.2, tokenizers 0.19.1, peft 0.13.2.)

What it writes, per case (a folder each):
- ``config.json``: the model config as transformers 4.44.2 saves it, with ``_name_or_path`` set to
  the name that keys llm2vec's chat templates and EOS texts;
- ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``: a tiny BPE tokenizer
  trained here (sentencepiece-style with byte fallback for Llama-2/Mistral/Gemma, byte-level for
  Llama-3/Qwen2), loaded as ``PreTrainedTokenizerFast`` so both transformers versions run the very
  same ``tokenizer.json``;
- ``reference.pt``: llm2vec's embeddings and what they came from (see ``run_case``).
Weights are not stored: :func:`generate_state_dict` makes them from a seed, deterministically, and
the tests regenerate them (checked against the SHA-256 kept in ``reference.pt``).

This module is also imported by ``tests/test_encoder.py`` for :func:`generate_state_dict`,
:data:`CASES` and :data:`INPUTS`: keep everything that imports transformers or llm2vec inside
functions.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(HERE), "tests", "fixtures", "llm2vec")

# The inputs every case encodes: plain texts, [instruction, text] pairs, texts longer than
# doc_max_length words, empty-ish texts, the separator inside a text, a literal "</s>", unicode.
LONG_1 = ("Embedding models map a piece of text to a vector so that texts with similar meaning land close "
          "together. Large decoder models can be turned into strong text encoders by enabling bidirectional "
          "attention, training with masked next token prediction, and finishing with unsupervised or "
          "supervised contrastive learning on pairs of related sentences from many different sources.")
LONG_2 = ("The tide rises and falls twice a day because the moon pulls on the water of the oceans, and the sun "
          "adds a smaller pull of its own; when both line up the tides are larger, which sailors have known for "
          "a very long time and written down in their books and charts.")
INPUTS: List = [
    "The quick brown fox jumps over the lazy dog.",
    ["Given a web search query, retrieve relevant passages that answer the query:", "how do tides work"],
    "Tides are caused by the gravitational pull of the moon and the sun on the oceans.",
    ["Retrieve semantically similar text: ", "  A man is playing a guitar on the stage.  "],
    LONG_1,
    ["Represent the document for retrieval:", LONG_2],
    "",
    " ",
    ["Given a claim, find documents that refute it:", ""],
    ["", "an empty instruction with a text"],
    "naïve café — Zürich 東京 🙂",
    "a text with the separator !@#$%^&*() inside it",
    "it ends with an eos </s> token",
    "Line one.\nLine two.\tTabbed.",
    "x",
    "One more sentence about embeddings and retrieval.",
]

ALL_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")
NO_BOS_MODES = ("mean", "weighted_mean", "eos_token", "last_token")
# (max_length, doc_max_length): P1 truncates long texts by words; P2 truncates by max_length only.
PARAMS_WORDS = (64, 24)
PARAMS_TOKENS = (20, 400)

# name: family (model_type), tokenizer kind, the config's _name_or_path, weight seed, pooling modes,
# and whether the model is llm2vec's bidirectional one (enable_bidirectional).
CASES: Dict[str, Dict] = {
    "llama": dict(family="llama", tokenizer="sp", name="tiny-random/llama-2", seed=1, modes=ALL_MODES),
    "mistral": dict(family="mistral", tokenizer="sp", name="mistralai/Mistral-7B-Instruct-v0.2", seed=2,
                    modes=ALL_MODES),
    "llama3_instruct": dict(family="llama", tokenizer="llama3", name="meta-llama/Meta-Llama-3-8B-Instruct", seed=3,
                            modes=ALL_MODES),
    "llama3_base": dict(family="llama", tokenizer="llama3", name="meta-llama/Meta-Llama-3-8B", seed=3,
                        modes=("mean", "eos_token")),
    "gemma": dict(family="gemma", tokenizer="gemma", name="tiny-random/gemma", seed=4, modes=ALL_MODES),
    # The gemma-2-9b-it template writes a literal "<bos>": two BOS tokens, so no bos_token pooling.
    "gemma_it": dict(family="gemma", tokenizer="gemma", name="google/gemma-2-9b-it", seed=4, modes=NO_BOS_MODES),
    # Qwen2 tokenizers add no BOS: no bos_token pooling (llm2vec's mask selects nothing).
    "qwen2": dict(family="qwen2", tokenizer="qwen2", name="Qwen/Qwen2-1.5B-Instruct", seed=5, modes=NO_BOS_MODES),
    "llama_causal": dict(family="llama", tokenizer="sp", name="tiny-random/llama-2", seed=1,
                         modes=("mean", "weighted_mean", "eos_token"), enable_bidirectional=False),
}
# The adapter case: a base checkpoint (the "llama" weights), an MNTP folder holding config, tokenizer
# and a LoRA adapter whose adapter_config points at the base, and a second ("simcse") adapter with an
# llm2vec_config.json, loaded with peft_model_name_or_path.
ADAPTER_CASE = "mntp_lora"
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
MNTP_SEED, SIMCSE_SEED = 11, 12
SIMCSE_LLM2VEC_CONFIG = {"pooling_mode": "mean", "max_length": 64, "doc_max_length": 24, "skip_instruction": True}
ADAPTER_RUNS = (
    # (merge_peft, encoder kwargs given to from_pretrained)
    (False, {}),
    (True, {"pooling_mode": "weighted_mean", "skip_instruction": False}),
)

# The tiny model every case uses: 2 layers, hidden 128, 2 query heads and 1 KV head of dim 64.
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=512, rms_norm_eps=1e-6)
BATCH_SIZE = 8  # llm2vec's encode batch for the padded references

CORPUS = """
The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
Tides are caused by the gravitational pull of the moon and the sun on the oceans of the earth.
Given a web search query, retrieve relevant passages that answer the query.
Retrieve semantically similar text. Represent the document for retrieval.
Given a claim, find documents that refute it or support it with evidence.
A man is playing a guitar on the stage and the people are singing along.
Embedding models map a piece of text to a vector so that similar texts land close together.
Large language models can be turned into text encoders with bidirectional attention and contrastive training.
Masked next token prediction adapts a decoder to see the words on both sides of every position.
Supervised contrastive learning uses pairs of related sentences, queries and documents, and hard negatives.
The sailors wrote the times of the tides in their books and charts for a very long time.
One more sentence about embeddings, retrieval, search, ranking, clustering and classification.
Line one. Line two. Tabbed text and new lines are white space too.
It ends with an end of sequence token, and the separator is a strange string of symbols.
Numbers like 1, 2, 3, 10, 42 and 2024 appear in many documents about history and science.
What is the capital of France? Paris is the capital and the largest city of France.
How do I bake bread? Mix flour, water, salt and yeast, then let the dough rise before baking.
""".strip()


# ------------------------------------------------------------------------------------------ weights

def generate_tensor(name: str, shape: Sequence[int], seed: int, family: str) -> torch.Tensor:
    """One parameter, a pure function of (name, shape, seed, family): independent of module order."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode("utf-8")))
    x = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    if name.endswith("norm.weight"):
        # Gemma's RMSNorm scales by (1 + weight); the others by weight.
        return x * 0.1 + (0.0 if family.startswith("gemma") else 1.0)
    if "embed_tokens" in name:
        return x
    if name.endswith(".bias"):
        return x * 0.05
    if ".lora_B." in name or name.endswith("lora_B.weight"):
        return x * (0.5 / math.sqrt(shape[-1]))
    return x * (1.0 / math.sqrt(shape[-1]))


def generate_state_dict(named_shapes: Iterable[Tuple[str, Sequence[int]]], seed: int, family: str
                        ) -> Dict[str, torch.Tensor]:
    return {name: generate_tensor(name, shape, seed, family) for name, shape in sorted(named_shapes)}


def state_dict_sha256(state: Dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode("utf-8"))
        digest.update(state[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def lora_file_key(parameter_name: str) -> str:
    """peft's in-memory name ``...q_proj.lora_A.default.weight`` -> the saved key ``...q_proj.lora_A.weight``."""
    return parameter_name.replace(".default.", ".")


def model_config_kwargs(family: str, vocab_size: int, tokenizer_ids: Dict[str, Optional[int]]) -> Dict:
    kwargs = dict(MODEL_SHAPE, vocab_size=vocab_size, tie_word_embeddings=False,
                  bos_token_id=tokenizer_ids.get("bos"), eos_token_id=tokenizer_ids.get("eos"),
                  pad_token_id=tokenizer_ids.get("pad"))
    if family == "mistral":
        kwargs["sliding_window"] = 4096
    if family == "gemma":
        kwargs.update(head_dim=64, hidden_activation="gelu_pytorch_tanh")
    if family == "qwen2":
        kwargs.update(use_sliding_window=False, sliding_window=4096, max_window_layers=2)
    return kwargs


# ----------------------------------------------------------------------------------------- tokenizers

TOKENIZER_SPECIALS = {
    "sp": dict(bos="<s>", eos="</s>", unk="<unk>", pad=None, extra=[]),
    "gemma": dict(bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>", extra=["<start_of_turn>", "<end_of_turn>"]),
    "llama3": dict(bos="<|begin_of_text|>", eos="<|end_of_text|>", unk=None, pad=None,
                   extra=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "qwen2": dict(bos=None, eos="<|im_end|>", unk=None, pad="<|endoftext|>", extra=["<|endoftext|>", "<|im_start|>"]),
}


def corpus_lines() -> List[str]:
    lines = CORPUS.splitlines()
    for item in INPUTS:
        lines.extend(item if isinstance(item, list) else [item])
    return [line for line in lines if line.strip()]


def build_tokenizer(kind: str):
    """A tiny trained BPE tokenizer of the given kind (a ``tokenizers.Tokenizer``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    spec = TOKENIZER_SPECIALS[kind]
    if kind in ("sp", "gemma"):
        # sentencepiece-style BPE: "▁" for spaces, byte fallback, leading specials then 256 byte tokens.
        trainer_tok = Tokenizer(models.BPE(unk_token=None))
        trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁",
                                                             prepend_scheme="always" if kind == "sp" else "never")
        trainer = trainers.BpeTrainer(vocab_size=420, min_frequency=2, show_progress=False)
        trainer_tok.train_from_iterator(corpus_lines(), trainer)
        learned = json.loads(trainer_tok.to_str())["model"]
        specials = ["<unk>", "<s>", "</s>"] if kind == "sp" else ["<pad>", "<eos>", "<bos>", "<unk>"]
        vocab: Dict[str, int] = {}
        for token in specials + [f"<0x{i:02X}>" for i in range(256)]:
            vocab[token] = len(vocab)
        for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
            if token not in vocab:
                vocab[token] = len(vocab)
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        if kind == "sp":  # Llama-2 / Mistral tokenizer.json (legacy): prepend "▁", spaces to "▁"
            tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        else:  # Gemma: no dummy prefix
            tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + spec["extra"]])
    else:
        # Byte-level BPE (GPT-2 style regex), specials appended after the learned vocabulary.
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        if kind == "qwen2":
            tok.normalizer = normalizers.NFC()
        trainer = trainers.BpeTrainer(vocab_size=560, min_frequency=2, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(corpus_lines(), trainer)
        specials = [t for t in [spec["bos"], spec["eos"]] + spec["extra"] if t]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)])
    bos = spec["bos"]
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_tokenizer(kind: str, folder: str) -> Dict[str, Optional[int]]:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns bos/eos/pad ids."""
    tok = build_tokenizer(kind)
    spec = TOKENIZER_SPECIALS[kind]
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    special_map = {f"{key}_token": spec[key] for key in ("bos", "eos", "unk", "pad") if spec[key] is not None}
    config = dict(special_map, tokenizer_class="PreTrainedTokenizerFast", model_max_length=1_000_000,
                  clean_up_tokenization_spaces=False,
                  model_input_names=["input_ids", "attention_mask"])
    if spec["extra"]:
        special_map["additional_special_tokens"] = list(spec["extra"])
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special_map, f, indent=2, sort_keys=True)
    ids = {key: (tok.token_to_id(spec[key]) if spec[key] else None) for key in ("bos", "eos", "pad")}
    ids["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


def padded_vocab(size: int) -> int:
    return int(math.ceil(size / 64) * 64)


# ------------------------------------------------------------------------- the reference (old stack)

def _old_stack():
    import llm2vec  # noqa: F401  (fails loudly outside the reference venv)
    import transformers
    if not (transformers.__version__.startswith("4.43") or transformers.__version__.startswith("4.44")):
        raise SystemExit(f"run this in the llm2vec 0.2.3 venv (transformers <= 4.44.2), not transformers "
                         f"{transformers.__version__}")


def patch_qwen2_bidirectional():
    """llm2vec 0.2.3's Qwen2BiModel keeps transformers 4.44's causal mask (it sets is_causal=False on the
    attention modules but does not override ``_update_causal_mask``, unlike its Llama/Mistral/Gemma
    classes), so on "sdpa"/"eager" it is causal. The fixtures use the intended bidirectional model:
    the same padding-only mask as llm2vec's Llama class."""
    from llm2vec.models import bidirectional_qwen2

    def _update_causal_mask(self, attention_mask, input_tensor, cache_position, past_key_values,
                            output_attentions):
        dtype, device = input_tensor.dtype, input_tensor.device
        batch, length = input_tensor.shape[:2]
        mask = torch.zeros((batch, 1, length, length), dtype=dtype, device=device)
        if attention_mask is not None and attention_mask.dim() == 2:
            pad = (attention_mask == 0)[:, None, None, :].expand(-1, 1, length, -1)
            mask = mask.masked_fill(pad, torch.finfo(dtype).min)
        return mask

    original = bidirectional_qwen2.Qwen2BiModel._update_causal_mask
    bidirectional_qwen2.Qwen2BiModel._update_causal_mask = _update_causal_mask
    return original


def old_model_class(family: str, bidirectional: bool):
    import transformers
    from llm2vec.models import GemmaBiModel, LlamaBiModel, MistralBiModel, Qwen2BiModel
    if not bidirectional:
        return {"llama": transformers.LlamaModel, "mistral": transformers.MistralModel,
                "gemma": transformers.GemmaModel, "qwen2": transformers.Qwen2Model}[family]
    return {"llama": LlamaBiModel, "mistral": MistralBiModel, "gemma": GemmaBiModel, "qwen2": Qwen2BiModel}[family]


def old_config(family: str, kwargs: Dict):
    import transformers
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "gemma": transformers.GemmaConfig, "qwen2": transformers.Qwen2Config}[family]
    return cls(**kwargs)


def write_checkpoint(case: Dict, folder: str, tokenizer_folder: Optional[str] = None) -> Tuple[object, Dict]:
    """Config, tokenizer and generated weights into ``folder`` (transformers 4.44 save_pretrained)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    ids = write_tokenizer(case["tokenizer"], folder)
    config = old_config(case["family"], model_config_kwargs(case["family"], padded_vocab(ids["vocab_size"]), ids))
    config._name_or_path = case["name"]
    model = old_model_class(case["family"], True)(config)
    shapes = [(name, tuple(p.shape)) for name, p in model.state_dict().items()]
    state = generate_state_dict(shapes, case["seed"], case["family"])
    model.load_state_dict(state)
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    return model, {"weights_sha256": state_dict_sha256(state), "parameter_shapes": sorted(shapes)}


def llm2vec_internals(encoder, item) -> Dict:
    """What llm2vec computes for one input: its final string, the text part after the separator, the
    tokens of both (bs=1), and the embed count n (tokens of the text part alone)."""
    instruction, text = ("", item) if isinstance(item, str) else (item[0], item[1])
    prepared = encoder.prepare_for_tokenization(encoder._convert_to_str(instruction, text))
    parts = prepared.split("!@#$%^&*()")
    text_part = parts[1] if len(parts) > 1 else ""
    full = encoder.tokenizer(["".join(parts)], truncation=True, max_length=encoder.max_length)["input_ids"][0]
    alone = encoder.tokenizer([text_part], truncation=True, max_length=encoder.max_length,
                              add_special_tokens=False)["input_ids"][0]
    return {"prepared": prepared, "input_ids": list(full), "embed_count": len(alone)}


def encode_llm2vec(encoder, items, batch_size: int) -> torch.Tensor:
    pairs = [["", item] if isinstance(item, str) else list(item) for item in items]
    return encoder.encode(pairs, batch_size=batch_size, show_progress_bar=False, device="cpu")


def run_case(name: str, case: Dict, root: str) -> Dict:
    """llm2vec 0.2.3's ``LLM2Vec.from_pretrained(...).encode`` for every (params, pooling, skip)."""
    from llm2vec import LLM2Vec
    bidirectional = case.get("enable_bidirectional", True)
    checkpoint = os.path.join(root, name)
    _, weights = write_checkpoint(case, checkpoint)
    runs = []
    encoder = LLM2Vec.from_pretrained(checkpoint, enable_bidirectional=bidirectional)
    assert encoder.model.config._name_or_path == case["name"], encoder.model.config._name_or_path
    settings = [(PARAMS_WORDS, mode, skip) for mode in case["modes"] for skip in (True, False)]
    settings += [(PARAMS_TOKENS, "mean", skip) for skip in (True, False)]
    for (max_length, doc_max_length), mode, skip in settings:
        encoder.pooling_mode, encoder.skip_instruction = mode, skip
        encoder.max_length, encoder.doc_max_length = max_length, doc_max_length
        runs.append(reference_run(encoder, dict(pooling_mode=mode, skip_instruction=skip, max_length=max_length,
                                                doc_max_length=doc_max_length)))
    return {"case": name, **case_meta(case), **weights, "runs": runs}


def reference_run(encoder, settings: Dict) -> Dict:
    """One llm2vec encode: padded (batch of BATCH_SIZE) and, for rows whose padded result depends on the
    padding, alone; plus the float64 run for llm2vec's own float32 rounding error."""
    internals = [llm2vec_internals(encoder, item) for item in INPUTS]
    padded = encode_llm2vec(encoder, INPUTS, BATCH_SIZE)
    mode, skip = encoder.pooling_mode, encoder.skip_instruction
    # Rows llm2vec pools from padding: mean with skip_instruction and nothing after the separator
    # (its `x[i, -0:]` is the whole padded row), or an embed count above the row's real length.
    padding_dependent, unsupported = [], []
    for row, info in enumerate(internals):
        length = len(info["input_ids"])
        if length == 0:
            unsupported.append(row)  # no token at all (Qwen2, empty text): llm2vec cannot encode it alone
        elif skip and mode in ("mean", "weighted_mean") and (
                (info["embed_count"] == 0 and mode == "mean") or info["embed_count"] > length):
            padding_dependent.append(row)
    alone = {}
    for row in padding_dependent:
        alone[row] = encode_llm2vec(encoder, [INPUTS[row]], 1)[0]
    model = encoder.model
    model.double()
    try:
        padded64 = encode_llm2vec(encoder, INPUTS, BATCH_SIZE)
    finally:
        model.float()
    keep = [row for row in range(len(INPUTS)) if row not in padding_dependent and row not in unsupported]
    floor = float((padded[keep] - padded64[keep]).abs().max())
    return dict(settings, embeddings=padded.to(torch.float32).clone(), alone=alone,
                padding_dependent=padding_dependent, unsupported=unsupported,
                input_ids=[info["input_ids"] for info in internals],
                embed_counts=[info["embed_count"] for info in internals],
                prepared=[info["prepared"] for info in internals], float64_floor=floor)


def case_meta(case: Dict) -> Dict:
    from importlib.metadata import version

    import peft
    import tokenizers
    import transformers
    return {"family": case["family"], "tokenizer": case["tokenizer"], "name_or_path": case["name"],
            "seed": case["seed"], "enable_bidirectional": case.get("enable_bidirectional", True),
            "versions": {"llm2vec": version("llm2vec"), "transformers": transformers.__version__,
                         "torch": str(torch.__version__), "tokenizers": str(tokenizers.__version__),
                         "peft": peft.__version__},
            "batch_size": BATCH_SIZE}


def make_lora_adapter(base_model, seed: int, folder: str, family: str, base_path: str) -> str:
    """A LoRA adapter (LORA) on ``base_model`` with generated weights, saved by peft to ``folder``, its
    adapter_config.json pointing at ``base_path``."""
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(base_model, LoraConfig(**LORA))
    named = {lora_file_key(n): p for n, p in peft_model.named_parameters() if "lora_" in n}
    state = generate_state_dict([(k, tuple(p.shape)) for k, p in named.items()], seed, family)
    with torch.no_grad():
        for key, param in named.items():
            param.copy_(state[key])
    peft_model.save_pretrained(folder)
    peft_model.unload()  # leave base_model as it was
    config_file = os.path.join(folder, "adapter_config.json")
    with open(config_file) as f:
        adapter_config = json.load(f)
    adapter_config["base_model_name_or_path"] = base_path
    with open(config_file, "w") as f:
        json.dump(adapter_config, f, indent=2)
    return state_dict_sha256(state)


def run_adapter_case(root: str) -> Dict:
    """MNTP folder beside the base (adapter_config -> base), a second adapter, merge_peft False/True."""
    from llm2vec import LLM2Vec
    base_case = CASES["llama"]
    base = os.path.join(root, "adapter_base")
    base_model, weights = write_checkpoint(base_case, base)
    mntp = os.path.join(root, "adapter_mntp")
    simcse = os.path.join(root, "adapter_simcse")
    mntp_sha = make_lora_adapter(base_model, MNTP_SEED, mntp, base_case["family"], base)
    # The MNTP folder also holds the config and tokenizer (as the published llm2vec MNTP repos do).
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(base, file), os.path.join(mntp, file))
    simcse_sha = make_lora_adapter(base_model, SIMCSE_SEED, simcse, base_case["family"], base)
    with open(os.path.join(simcse, "llm2vec_config.json"), "w") as f:
        json.dump(SIMCSE_LLM2VEC_CONFIG, f, indent=4)
    runs = []
    for merge, kwargs in ADAPTER_RUNS:
        encoder = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=simcse, merge_peft=merge, **kwargs)
        settings = dict(merge_peft=merge, kwargs=kwargs, pooling_mode=encoder.pooling_mode,
                        skip_instruction=encoder.skip_instruction, max_length=encoder.max_length,
                        doc_max_length=encoder.doc_max_length, model_class=type(encoder.model).__name__)
        runs.append(reference_run(encoder, settings))
    # What llm2vec's MNTP step amounts to, by hand: the base, plus each adapter's delta once.
    from peft import PeftModel
    import transformers
    check = old_model_class("llama", True).from_pretrained(base)
    check = PeftModel.from_pretrained(check, mntp).merge_and_unload()
    check = PeftModel.from_pretrained(check, simcse).merge_and_unload()
    by_hand = LLM2Vec(check, transformers.AutoTokenizer.from_pretrained(mntp), **SIMCSE_LLM2VEC_CONFIG)
    by_hand.tokenizer.pad_token = by_hand.tokenizer.eos_token
    by_hand.tokenizer.padding_side = "left"
    by_hand_embeddings = encode_llm2vec(by_hand, INPUTS, BATCH_SIZE)
    first = runs[0]
    keep = [r for r in range(len(INPUTS)) if r not in first["padding_dependent"]]
    merged_once_diff = float((by_hand_embeddings[keep] - first["embeddings"][keep]).abs().max())
    meta = case_meta(base_case)
    return {"case": ADAPTER_CASE, **meta, **weights, "mntp_sha256": mntp_sha, "simcse_sha256": simcse_sha,
            "lora": LORA, "mntp_seed": MNTP_SEED, "simcse_seed": SIMCSE_SEED,
            "simcse_llm2vec_config": SIMCSE_LLM2VEC_CONFIG, "runs": runs,
            "merged_once_max_abs_diff": merged_once_diff}


def unpatched_qwen2_run(name: str, case: Dict, root: str) -> torch.Tensor:
    """llm2vec 0.2.3's Qwen2 as it ships (mean, no skip_instruction), before the mask patch."""
    from llm2vec import LLM2Vec
    folder = os.path.join(root, name + "_unpatched")
    write_checkpoint(case, folder)
    encoder = LLM2Vec.from_pretrained(folder, pooling_mode="mean", skip_instruction=False,
                                      max_length=PARAMS_WORDS[0], doc_max_length=PARAMS_WORDS[1])
    return encode_llm2vec(encoder, INPUTS, BATCH_SIZE)


def copy_case_files(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(src, file), os.path.join(dst, file))


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the network
    _old_stack()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    only = set(argv or sys.argv[1:])
    original_qwen2_mask = None
    with tempfile.TemporaryDirectory() as root:
        for name, case in CASES.items():
            if only and name not in only:
                continue
            unpatched = None
            if case["family"] == "qwen2" and original_qwen2_mask is None:
                unpatched = unpatched_qwen2_run(name, case, root)
                original_qwen2_mask = patch_qwen2_bidirectional()
            result = run_case(name, case, root)
            if case["family"] == "qwen2":
                result["qwen2_mask_patched"] = True
                if unpatched is not None:  # how far llm2vec's own (causal) Qwen2 is from the bidirectional one
                    patched = next(r for r in result["runs"] if r["pooling_mode"] == "mean"
                                   and not r["skip_instruction"] and r["max_length"] == PARAMS_WORDS[0])
                    keep = [i for i in range(len(INPUTS)) if i not in patched["unsupported"]]
                    diff = (unpatched[keep] - patched["embeddings"][keep]).abs().max()
                    result["unpatched_max_abs_diff"] = float(diff)
            copy_case_files(os.path.join(root, name), os.path.join(FIXTURES, name))
            torch.save(result, os.path.join(FIXTURES, name, "reference.pt"))
            print(f"{name}: {len(result['runs'])} runs, float64 floor "
                  f"{max(run['float64_floor'] for run in result['runs']):.2e}")
        if not only or ADAPTER_CASE in only:
            result = run_adapter_case(root)
            copy_case_files(os.path.join(root, "adapter_mntp"), os.path.join(FIXTURES, ADAPTER_CASE))
            torch.save(result, os.path.join(FIXTURES, ADAPTER_CASE, "reference.pt"))
            print(f"{ADAPTER_CASE}: {len(result['runs'])} runs, merged-once check "
                  f"{result['merged_once_max_abs_diff']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
