"""Tests of the contrastive recipes (``llm2vec_fast.training.contrastive``): SimCSE and supervised.

All on the CPU in float32 (one bf16 smoke step) with a tiny random Llama (the llama fixture's config and
tokenizer) and a random MNTP LoRA adapter: training through the Trainer lowers the loss, the saved adapter
reloads through ``LLM2Vec.from_pretrained`` with equal embeddings, GradCache gives the full batch's LoRA
gradients (dropout on), 2 gloo processes give the union batch's loss and gradients, the supervised sampler
and instruction formatting follow llm2vec, and bad configs fail before any model loads.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import time

import pytest
import torch

from llm2vec_fast.encoder.text import SEPARATOR
from llm2vec_fast.training import contrastive as ct
from llm2vec_fast.training.contrastive import (ContrastiveBatch, SimCSEConfig, SimCSERecipe, SupervisedConfig,
                                               SupervisedRecipe, dataset_batches, embed, read_supervised,
                                               shard)
from llm2vec_fast.training.e5 import E5_INSTRUCTIONS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(REPO, "tests", "fixtures", "llm2vec", "llama")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WORDS = "the moon tide ocean sailor guitar stage bread flour water salt yeast capital paris history science".split()
INSTRUCTIONS = {"alpha": "Retrieve passages that answer the question", "beta": "Find a similar sentence;"}
WORLD = 2


def _sentence(i: int) -> str:
    return " ".join(WORDS[(i * k + 3) % len(WORDS)] for k in range(1, 3 + i % 6)) + f" {i}."


def _rows(name: str, count: int, offset: int, negatives: bool = True):
    rows = []
    for i in range(count):
        row = {"query": f"{name} question {_sentence(offset + i)}", "positive": _sentence(offset + i + 1)}
        if negatives and i % 3 != 2:  # some rows without a hard negative
            row["negative"] = _sentence(offset + 7 * i + 2)
        rows.append(row)
    return rows


def _write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny base model, an MNTP adapter folder (llm2vec's layout: config, tokenizer, adapter) and data."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    from llm2vec_fast.models import LlamaBiModel
    root = str(tmp_path_factory.mktemp("contrastive"))
    base, mntp = os.path.join(root, "base"), os.path.join(root, "mntp")
    torch.manual_seed(0)
    LlamaBiModel(AutoConfig.from_pretrained(FIXTURE)).save_pretrained(base)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(FIXTURE, name), base)
    adapter = get_peft_model(LlamaBiModel.from_pretrained(base),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    adapter.save_pretrained(mntp)
    with open(os.path.join(mntp, "adapter_config.json")) as f:
        adapter_config = json.load(f)
    adapter_config["base_model_name_or_path"] = base
    with open(os.path.join(mntp, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f)
    for name in ("config.json",) + TOKENIZER_FILES:
        shutil.copy(os.path.join(base, name), mntp)

    sentences = os.path.join(root, "sentences.txt")  # alike, so that telling them apart takes training
    with open(sentences, "w") as f:
        f.write("\n".join(f"the history of science in paris and the ocean {WORDS[i % 16]} {WORDS[i * 5 % 16]}"
                          for i in range(40)) + "\n\n")
    eleven = os.path.join(root, "eleven.jsonl")
    _write_jsonl(eleven, [{"text": _sentence(100 + i)} for i in range(11)])
    echo = os.path.join(root, "echo")
    os.makedirs(echo)
    _write_jsonl(os.path.join(echo, "alpha.jsonl"), _rows("alpha", 12, 0))
    _write_jsonl(os.path.join(echo, "beta.jsonl"), _rows("beta", 9, 50))
    single = os.path.join(root, "single.jsonl")
    _write_jsonl(single, [dict(r, dataset="alpha") for r in _rows("alpha", 8, 0)]
                 + [dict(r, dataset="gamma", instruction="Own instruction") for r in _rows("gamma", 8, 30)])
    return dict(root=root, base=base, mntp=mntp, sentences=sentences, eleven=eleven, echo=echo, single=single)


def simcse_config(files, tmp_path, **overrides) -> SimCSEConfig:
    values = dict(model_name_or_path=files["base"], peft_model_name_or_path=files["mntp"], output_dir=str(tmp_path),
                  dataset_file_path=files["sentences"], torch_dtype="float32", per_device_train_batch_size=8,
                  lora_r=4, lora_alpha=8, lora_dropout=0.0, simcse_dropout=0.0, learning_rate=3e-3, logging_steps=1,
                  save_steps=1000, disable_tqdm=True)
    values.update(overrides)
    return SimCSEConfig.from_dict(values)


def supervised_config(files, tmp_path, **overrides) -> SupervisedConfig:
    values = dict(model_name_or_path=files["base"], peft_model_name_or_path=files["mntp"], output_dir=str(tmp_path),
                  dataset_file_path=files["echo"], instructions=INSTRUCTIONS, torch_dtype="float32",
                  per_device_train_batch_size=4, lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=3e-3,
                  logging_steps=1, save_steps=1000, disable_tqdm=True)
    values.update(overrides)
    return SupervisedConfig.from_dict(values)


def lora_grads(model):
    return {name: param.grad.detach().clone() for name, param in model.named_parameters()
            if param.requires_grad and param.grad is not None}


def assert_same_grads(got, want, rtol=1e-4, label=""):
    """fp32 agreement: each element within rtol of itself or of its tensor's largest entry (a sum of many
    float32 terms, added in another order, moves its near-zero entries by that much)."""
    assert sorted(got) == sorted(want) and want, label
    assert any(float(w.abs().max()) > 0 for w in want.values()), f"{label}: all gradients are zero"
    for name in want:
        atol = rtol * float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{label} {name}: {m}")


def assert_reloads(recipe, folder, mntp, texts):
    from llm2vec_fast import LLM2Vec
    for name in ("adapter_config.json", "adapter_model.safetensors", "llm2vec_config.json", "tokenizer.json"):
        assert os.path.isfile(os.path.join(folder, name)), name
    with open(os.path.join(folder, "llm2vec_config.json")) as f:
        settings = json.load(f)
    cfg = recipe.config
    assert settings == {"pooling_mode": cfg.pooling_mode, "max_length": cfg.max_seq_length,
                        "doc_max_length": cfg.doc_max_length, "skip_instruction": cfg.skip_instruction}
    reloaded = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=folder)
    assert reloaded.pooling_mode == cfg.pooling_mode and reloaded.max_length == cfg.max_seq_length
    got = reloaded.encode(texts, show_progress_bar=False)
    want = recipe.encoder.encode(texts, show_progress_bar=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    untrained = LLM2Vec.from_pretrained(mntp).encode(texts, show_progress_bar=False)
    assert float((got - untrained).abs().max()) > 1e-3  # the trained LoRA is in the folder


# ------------------------------------------------------------------------------------------- training

def test_simcse_trains_saves_and_reloads(files, tmp_path):
    from llm2vec_fast.training.loop import Trainer
    recipe = SimCSERecipe(simcse_config(files, tmp_path, max_steps=8, simcse_dropout=0.3))
    assert recipe.num_batches() == 5
    losses = Trainer(recipe).train()
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:2]) / 2, losses
    assert_reloads(recipe, os.path.join(str(tmp_path), "checkpoint-8"), files["mntp"], recipe.sentences[:5])


def test_supervised_trains_saves_and_reloads(files, tmp_path):
    from llm2vec_fast.training.loop import Trainer
    recipe = SupervisedRecipe(supervised_config(files, tmp_path, max_steps=10))
    assert recipe.num_batches() == 3 + 2  # alpha: 12 // 4, beta: 9 // 4 (the remainder is dropped)
    losses = Trainer(recipe).train()
    assert sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses
    recipe.save(str(tmp_path / "final"))
    assert_reloads(recipe, str(tmp_path / "final"), files["mntp"], [[INSTRUCTIONS["alpha"], "a question"], "a text"])


def test_simcse_trains_a_gemma3_base(files, tmp_path):
    """A family llm2vec cannot train (Gemma3: q/k norms, sliding and full layers, a window shorter than the
    sentences), from its base without an MNTP adapter: finite losses, a trained adapter that changes the
    embeddings, and a saved folder that reloads to the same embeddings."""
    from transformers import AutoConfig, Gemma3TextConfig

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.models import Gemma3BiModel
    from llm2vec_fast.training.loop import Trainer
    llama = AutoConfig.from_pretrained(FIXTURE)
    config = Gemma3TextConfig(vocab_size=llama.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
                              sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                              bos_token_id=llama.bos_token_id, eos_token_id=llama.eos_token_id)
    base = str(tmp_path / "gemma3")
    torch.manual_seed(0)
    Gemma3BiModel(config).save_pretrained(base)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(FIXTURE, name), base)
    recipe = SimCSERecipe(simcse_config(files, tmp_path, model_name_or_path=base, peft_model_name_or_path=None,
                                        max_steps=4, simcse_dropout=0.3))
    losses = Trainer(recipe).train()
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and min(losses) > 0, losses
    recipe.save(str(tmp_path / "final"))
    texts = recipe.sentences[:4]
    got = LLM2Vec.from_pretrained(base, peft_model_name_or_path=str(tmp_path / "final")).encode(
        texts, show_progress_bar=False)
    torch.testing.assert_close(got, recipe.encoder.encode(texts, show_progress_bar=False), rtol=1e-5, atol=1e-5)
    untrained = LLM2Vec.from_pretrained(base).encode(texts, show_progress_bar=False)
    assert float((got - untrained).abs().max()) > 1e-3


def test_causal_training_runs_packed(files, tmp_path, monkeypatch):
    """``bidirectional: false`` (llm2vec's causal variant): the encoder stays causal and still runs packed on our
    attention (forward_packed with causal=True); the adapter trains and reloads causal."""
    import llm2vec_fast.encoder.llm2vec as encoder_module
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.models import is_bidirectional
    from llm2vec_fast.training.loop import Trainer
    calls = []
    original = encoder_module.forward_packed
    monkeypatch.setattr(encoder_module, "forward_packed",
                        lambda *a, **kw: calls.append(kw.get("causal")) or original(*a, **kw))
    recipe = SimCSERecipe(simcse_config(files, tmp_path, bidirectional=False, pooling_mode="last_token", max_steps=3,
                                        simcse_dropout=0.3))
    assert not is_bidirectional(recipe.model) and recipe.encoder._packable()
    losses = Trainer(recipe).train()
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))) and calls and set(calls) == {True}
    recipe.save(str(tmp_path / "final"))
    texts = recipe.sentences[:4]
    reloaded = LLM2Vec.from_pretrained(files["mntp"], peft_model_name_or_path=str(tmp_path / "final"),
                                       enable_bidirectional=False)
    recipe.model.eval()
    torch.testing.assert_close(reloaded.encode(texts, show_progress_bar=False),
                               recipe.encoder.encode(texts, show_progress_bar=False), rtol=1e-5, atol=1e-5)


def test_bf16_step(files, tmp_path):
    recipe = SimCSERecipe(simcse_config(files, tmp_path, torch_dtype="bfloat16", simcse_dropout=0.3))
    loss = recipe.train_step(next(iter(recipe.batches(0))), 1.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and loss > 0
    grads = lora_grads(recipe.model)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert any(float(g.abs().max()) > 0 for g in grads.values())
    assert recipe.model.get_input_embeddings().weight.dtype == torch.bfloat16


@pytest.mark.parametrize("recipe", ["simcse", "supervised"])
def test_cli_runs_an_llm2vec_style_config(files, tmp_path, recipe):
    """llm2vec's train_configs keys (aliases and ignored keys included) run through ``llm2vec-fast train``."""
    import argparse

    from llm2vec_fast.training import cli
    config = {"model_name_or_path": files["base"], "peft_model_name_or_path": files["mntp"],
              "output_dir": str(tmp_path / "out"), "stop_after_n_steps": 2, "per_device_train_batch_size": 4,
              "torch_dtype": "float32", "attn_implementation": "flash_attention_2", "gradient_checkpointing": True,
              "lora_r": 4, "bf16": True, "do_train": True, "remove_unused_columns": False, "save_only_model": True,
              "overwrite_output_dir": True, "logging_steps": 1, "save_steps": 2, "disable_tqdm": True, "seed": 42}
    if recipe == "simcse":
        config.update(dataset_name="Wiki1M", dataset_file_path=files["sentences"], simcse_dropout=0.3,
                      loss_scale=20, pooling_mode="mean", max_seq_length=128)
    else:
        config.update(dataset_name="E5", dataset_file_path=files["echo"], loss_scale=50, max_seq_length=512,
                      warmup_steps=1, instructions=INSTRUCTIONS)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    parser = argparse.ArgumentParser()
    cli.add_train_parser(parser.add_subparsers(dest="command", required=True))
    assert cli.run(parser.parse_args(["train", recipe, "--config", str(path), "--set", "learning_rate=1e-3"])) == 0
    saved = tmp_path / "out" / "checkpoint-2"
    assert (saved / "adapter_model.safetensors").is_file() and (saved / "llm2vec_config.json").is_file()


# ------------------------------------------------------------------------------------------ dropout

def test_simcse_copies_get_different_dropout_masks(files, tmp_path):
    recipe = SimCSERecipe(simcse_config(files, tmp_path, simcse_dropout=0.3))
    layers = recipe.model.config.num_hidden_layers
    assert recipe.model.config.attention_dropout == 0.3
    assert all(m.attention_dropout == 0.3 for m in recipe.model.modules() if hasattr(m, "is_causal")
               and hasattr(m, "attention_dropout"))
    batch = next(iter(recipe.batches(0)))
    assert batch.queries == batch.positives and not batch.negatives
    plan = recipe.encoder.plan(batch.items())
    n = len(batch.queries)
    with torch.no_grad():
        emb = embed(recipe.encoder, plan.input_ids, plan.embed_counts)
        assert float((emb[:n] - emb[n:]).abs().min(dim=1).values.max()) > 0
        assert float((emb[:n] - emb[n:]).abs().max()) > 1e-3
        assert ct.set_attention_dropout(recipe.model, 0.0) == layers
        emb = embed(recipe.encoder, plan.input_ids, plan.embed_counts)
        torch.testing.assert_close(emb[:n], emb[n:], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------- GradCache

def _chunked_reference(recipe, batch, chunk):
    """The full batch with gradient, embedded in the same chunks as GradCache (so dropout draws the same
    masks), one loss, one backward."""
    plan = recipe.encoder.plan(batch.items())
    ids, counts = plan.input_ids, plan.embed_counts
    emb = torch.cat([embed(recipe.encoder, ids[s:s + chunk], counts[s:s + chunk]) for s in range(0, len(ids), chunk)])
    loss = recipe.loss(emb, batch)
    loss.backward()
    return loss.detach()


def test_grad_cache_equals_full_batch_with_dropout(files, tmp_path, step_block=None):
    """``step_block``: a context manager factory (given the model) entered around each step, as the training loop
    enters ``lean_layers``; by default none (the recipe's step called on its own)."""
    import contextlib
    chunk = 3
    recipe = SimCSERecipe(simcse_config(files, tmp_path, simcse_dropout=0.3, lora_dropout=0.1,
                                        grad_cache_chunk_size=chunk))
    batch = next(iter(recipe.batches(0)))
    block = step_block or (lambda model: contextlib.nullcontext())
    torch.manual_seed(5)
    with block(recipe.model):
        want_loss = _chunked_reference(recipe, batch, chunk)
    want, want_rng = lora_grads(recipe.model), torch.get_rng_state()
    recipe.model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    with block(recipe.model):
        got_loss = recipe.train_step(batch, 1.0)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert_same_grads(lora_grads(recipe.model), want, label="GradCache")
    assert torch.equal(torch.get_rng_state(), want_rng)  # the step consumed randomness as one pass does
    # The dropout is real: other masks give other gradients.
    recipe.model.zero_grad(set_to_none=True)
    torch.manual_seed(6)
    with block(recipe.model):
        recipe.train_step(batch, 1.0)
    other = lora_grads(recipe.model)
    assert max(float((other[k] - want[k]).abs().max()) for k in want) > 1e-4


def test_matryoshka_loss_is_the_weighted_sum_over_prefixes(files, tmp_path):
    """matryoshka_dims / matryoshka_weights: the loss is sum_i w_i * loss(first d_i dimensions), computed here
    by hand on the same embeddings, with its gradient; GradCache gives the same gradients."""
    import llm2vec_fast as lf
    dims, weights = [128, 32, 8], [1.0, 0.5, 0.25]
    recipe = SupervisedRecipe(supervised_config(files, tmp_path, per_device_train_batch_size=4, matryoshka_dims=dims,
                                                matryoshka_weights=weights))
    batch = next(iter(recipe.batches(0)))
    plan = recipe.encoder.plan(batch.items())
    emb = embed(recipe.encoder, plan.input_ids, plan.embed_counts).detach().requires_grad_(True)
    got = recipe.loss(emb, batch)
    n = len(batch.queries)
    want = sum(w * lf.contrastive_loss(emb[:n, :d], emb[n:2 * n, :d], emb[2 * n:, :d], scale=50.0)
               for d, w in zip(dims, weights))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    full_only = lf.contrastive_loss(emb[:n], emb[n:2 * n], emb[2 * n:], scale=50.0)
    assert abs(float(got) - float(full_only)) > 1e-3  # the prefixes count
    (grad,) = torch.autograd.grad(got, emb)
    (grad_want,) = torch.autograd.grad(want, emb)
    torch.testing.assert_close(grad, grad_want, rtol=1e-5, atol=1e-7)
    assert float(grad[:, 32:].abs().max()) > 0 and float(grad[:, :8].abs().max()) > 0
    # GradCache (chunks of 5 sequences) == the plain step, with the Matryoshka loss.
    recipe.model.zero_grad(set_to_none=True)
    plain_loss = recipe.train_step(batch, 1.0)
    plain = lora_grads(recipe.model)
    recipe.model.zero_grad(set_to_none=True)
    recipe.config.grad_cache_chunk_size = 5
    cached_loss = recipe.train_step(batch, 1.0)
    torch.testing.assert_close(cached_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(lora_grads(recipe.model), plain, label="Matryoshka GradCache")
    with pytest.raises(ValueError, match=r"'matryoshka_dims' must be <= the model's hidden size 128, got \[256, 8\]"):
        SupervisedRecipe(supervised_config(files, tmp_path, matryoshka_dims=[256, 8]))


def test_grad_cache_equals_plain_step_supervised(files, tmp_path):
    """The real code paths, dropout off: GradCache (chunks of 5 sequences) == one forward of the batch."""
    batch_config = dict(per_device_train_batch_size=6, grad_cache_chunk_size=None)
    plain = SupervisedRecipe(supervised_config(files, tmp_path, **batch_config))
    batch = next(iter(plain.batches(0)))
    assert batch.negatives and len(batch.negatives) < len(batch.queries)
    want_loss = plain.train_step(batch, 0.5)
    cached = SupervisedRecipe(supervised_config(files, tmp_path, **dict(batch_config, grad_cache_chunk_size=5)))
    got_loss = cached.train_step(batch, 0.5)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert_same_grads(lora_grads(cached.model), lora_grads(plain.model), label="supervised GradCache")


# ------------------------------------------------------------------------------- supervised data

def test_supervised_batches_come_from_one_dataset(files, tmp_path):
    recipe = SupervisedRecipe(supervised_config(files, tmp_path))
    epoch0 = list(recipe.batches(0))
    assert len(epoch0) == recipe.num_batches() == 5
    assert sorted(b.dataset for b in epoch0) == ["alpha"] * 3 + ["beta"] * 2
    for batch in epoch0:
        rows = {e.query[1]: e for e in recipe.data[batch.dataset]}
        assert len(batch.queries) == len(batch.positives) == 4
        for query, positive in zip(batch.queries, batch.positives):
            assert query[1] in rows and query == (INSTRUCTIONS[batch.dataset] + ";", query[1])
            assert positive == rows[query[1]].positive and positive[0] == ""
        assert batch.negatives == [n for q in batch.queries for n in rows[q[1]].negatives]
        assert all(instruction == "" for instruction, _ in batch.negatives)
    assert [b.queries for b in recipe.batches(0)] == [b.queries for b in epoch0]  # deterministic
    assert [b.queries for b in recipe.batches(1)] != [b.queries for b in epoch0]  # reshuffled per epoch


def test_dataset_batches_sampler():
    got = dataset_batches({"a": 10, "b": 7}, 3, seed=1, epoch=0)
    assert sorted(name for name, _ in got) == ["a"] * 3 + ["b"] * 2
    for name in ("a", "b"):
        seen = [i for n, rows in got if n == name for i in rows]
        assert len(seen) == len(set(seen)) and all(0 <= i < {"a": 10, "b": 7}[name] for i in seen)
    assert got == dataset_batches({"a": 10, "b": 7}, 3, seed=1, epoch=0)
    assert got != dataset_batches({"a": 10, "b": 7}, 3, seed=1, epoch=1)
    assert [shard(list(range(7)), r, 2) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6]]
    assert [shard(list(range(2)), r, 3) for r in range(3)] == [[0], [1], []]


def test_instruction_formatting_matches_llm2vec(files, tmp_path):
    """Queries are [instruction + ";", query], documents ["", text]: the strings llm2vec's E5 loader writes,
    "{instruction}; !@#$%^&*(){query}" and "!@#$%^&*(){text}", with the token ids and embed counts of
    llm2vec's tokenize of those strings."""
    recipe = SupervisedRecipe(supervised_config(files, tmp_path, dataset_file_path=files["single"],
                                                instructions={"alpha": INSTRUCTIONS["alpha"]}))
    assert sorted(recipe.data) == ["alpha", "gamma"]
    assert recipe.data["gamma"][0].query[0] == "Own instruction;"  # a row's own instruction
    batch = next(b for b in recipe.batches(0) if b.dataset == "alpha")
    query, document = batch.queries[0], batch.positives[0]
    plan = recipe.encoder.plan([query, document])
    strings = [f"{INSTRUCTIONS['alpha']}; {SEPARATOR}{query[1]}", f"{SEPARATOR}{document[1]}"]
    assert plan.prepared == strings
    features = recipe.encoder.tokenize(strings)  # llm2vec's padded features
    for row in range(2):
        real = features["attention_mask"][row].bool()
        assert plan.input_ids[row] == features["input_ids"][row][real].tolist()
        assert plan.embed_counts[row] == int(features["embed_mask"][row].sum())
    assert plan.embed_counts[0] < len(plan.input_ids[0])  # the instruction is not pooled


def test_training_tokenises_long_texts_as_llm2vecs_collator(files, tmp_path, monkeypatch):
    """llm2vec's training collator tokenises "{separator}{text}" cut at max_seq_length only: doc_max_length's cut by
    words is encode's. Run in training, it cut a text past doc_max_length tokens, and emptied one without spaces (a
    long Chinese passage) down to its BOS."""
    spaced = " ".join(f"word{i}" for i in range(60))
    unspaced = "".join(f"w{i}" for i in range(60))
    path = tmp_path / "long.jsonl"
    _write_jsonl(str(path), [{"dataset": "x", "query": "q one", "positive": spaced},
                             {"dataset": "x", "query": "q two", "positive": unspaced}])
    config = supervised_config(files, tmp_path, dataset_file_path=str(path), instructions={"x": "Find"},
                               per_device_train_batch_size=2, max_seq_length=200, doc_max_length=64)
    recipe = SupervisedRecipe(config)
    seen = []

    def recording(encoder, ids, counts):
        seen.append((ids, counts))
        return embed(encoder, ids, counts)
    monkeypatch.setattr(ct, "embed", recording)
    (batch,) = list(recipe.batches(0))
    recipe.train_step(batch, 1.0)
    ((ids, counts),) = seen
    strings = [f"Find; {SEPARATOR}{text}" for _, text in batch.queries] + \
        [f"{SEPARATOR}{text}" for _, text in batch.positives]
    features = recipe.encoder.tokenize(strings)  # llm2vec's padded features of its collator's strings
    for row in range(len(strings)):
        real = features["attention_mask"][row].bool()
        assert ids[row] == features["input_ids"][row][real].tolist(), row
        assert counts[row] == int(features["embed_mask"][row].sum()), row
    assert max(len(row) for row in ids) == 200  # max_seq_length still cuts


def test_an_empty_text_without_tokens_embeds_to_zeros(files, tmp_path):
    """A negative "" with a tokenizer that adds no BOS (Qwen2's) has no token at all: it embeds to zeros, as encode
    embeds it (training raised ValueError at the first batch holding one), and GradCache in chunks of one sequence
    (a chunk of only that input runs no forward) gives the plain step's loss and gradients."""
    from transformers import AutoConfig

    from llm2vec_fast.models import Qwen2BiModel
    qwen = os.path.join(REPO, "tests", "fixtures", "llm2vec", "qwen2")
    base = str(tmp_path / "qwen2")
    torch.manual_seed(0)
    Qwen2BiModel(AutoConfig.from_pretrained(qwen)).save_pretrained(base)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(qwen, name), base)
    path = tmp_path / "empty.jsonl"
    _write_jsonl(str(path), [{"dataset": "x", "query": _sentence(i), "positive": _sentence(i + 1),
                              "negative": "" if i == 1 else _sentence(i + 20)} for i in range(4)])
    settings = dict(model_name_or_path=base, peft_model_name_or_path=None, dataset_file_path=str(path),
                    instructions={"x": "Find"}, per_device_train_batch_size=4)
    plain = SupervisedRecipe(supervised_config(files, tmp_path, **settings))
    (batch,) = list(plain.batches(0))
    plan = plain.encoder.plan(batch.items(), word_cut=False)
    empty = [i for i, ids in enumerate(plan.input_ids) if not ids]
    assert len(empty) == 1 and batch.items()[empty[0]] == ("", "")
    with torch.no_grad():
        emb = embed(plain.encoder, plan.input_ids, plan.embed_counts)
    assert not emb[empty[0]].any() and emb.abs().sum(dim=1).gt(0).sum() == len(emb) - 1
    want_loss = plain.train_step(batch, 1.0)
    assert torch.isfinite(want_loss)
    cached = SupervisedRecipe(supervised_config(files, tmp_path, grad_cache_chunk_size=1, **settings))
    torch.testing.assert_close(cached.train_step(batch, 1.0), want_loss, rtol=1e-6, atol=1e-6)
    assert_same_grads(lora_grads(cached.model), lora_grads(plain.model), label="empty input")


def test_rows_with_several_hard_negatives(files, tmp_path):
    """A row's list of ``negatives`` (mined hard negatives): every one is a candidate for every query of the
    batch; the loss is contrastive_loss with all of them; rows may mix one, several and none."""
    import llm2vec_fast as lf
    path = tmp_path / "mined.jsonl"
    rows = []
    for i in range(8):
        row = {"dataset": "mined", "query": _sentence(300 + i), "positive": _sentence(400 + i)}
        if i % 3 == 0:
            row["negatives"] = [_sentence(500 + 10 * i + j) for j in range(3)]
        elif i % 3 == 1:
            row["negative"] = _sentence(600 + i)
        rows.append(row)
    _write_jsonl(str(path), rows)
    data = read_supervised(str(path), {"mined": "Find it"}, ";")
    assert [len(e.negatives) for e in data["mined"]] == [3, 1, 0, 3, 1, 0, 3, 1]
    assert data["mined"][0].negatives[2] == ("", _sentence(502))
    recipe = SupervisedRecipe(supervised_config(files, tmp_path, dataset_file_path=str(path),
                                                per_device_train_batch_size=8, instructions={"mined": "Find it"}))
    (batch,) = list(recipe.batches(0))
    assert len(batch.negatives) == 3 + 1 + 0 + 3 + 1 + 0 + 3 + 1
    plan = recipe.encoder.plan(batch.items())
    emb = embed(recipe.encoder, plan.input_ids, plan.embed_counts).detach()
    torch.testing.assert_close(recipe.loss(emb, batch), lf.contrastive_loss(emb[:8], emb[8:16], emb[16:], scale=50.0))
    loss = recipe.train_step(batch, 1.0)
    assert torch.isfinite(loss) and lora_grads(recipe.model)
    for bad, match in (({"negatives": "one"}, "must be a list of strings"), ({"negatives": [1]}, "list of strings"),
                       ({"negatives": ["a"], "negative": "b"}, "not both")):
        _write_jsonl(str(tmp_path / "bad.jsonl"), [dict(rows[0], **bad)])
        with pytest.raises(ValueError, match=match):
            read_supervised(str(tmp_path / "bad.jsonl"), {"mined": "Find it"})


def test_e5_symmetric_datasets_and_merged_splits(tmp_path):
    """llm2vec's E5 rules: documents of its symmetric datasets carry the instruction; <name>_split1/2 share
    batches under <name>; instruction_suffix "" and merge_splits False turn both off."""
    folder = tmp_path / "echo"
    folder.mkdir()
    for name, start in (("allnli_split1", 0), ("allnli_split2", 20), ("quora_duplicates_split1", 40), ("nq", 60)):
        _write_jsonl(str(folder / f"{name}.jsonl"), _rows(name, 3, start))
    instructions = {"allnli_split1": "Entail", "allnli_split2": "Similar", "quora_duplicates_split1": "Same",
                    "nq": "Answer"}
    symmetric = ["allnli_split2", "quora_duplicates_split1", "quora_duplicates_split2"]
    data = read_supervised(str(folder), instructions, ";", symmetric, merge_splits=True)
    assert sorted(data) == ["allnli", "nq", "quora_duplicates"] and len(data["allnli"]) == 6
    first, second = data["allnli"][0], data["allnli"][3]  # split1 rows, then split2 rows
    assert first.query[0] == "Entail;" and first.positive[0] == "" and first.negatives[0][0] == ""
    assert second.query[0] == "Similar;" and second.positive[0] == "Similar;" and second.negatives[0][0] == "Similar;"
    assert data["quora_duplicates"][0].positive[0] == "Same;" and data["nq"][0].positive[0] == ""
    plain = read_supervised(str(folder), instructions)
    assert sorted(plain) == ["allnli_split1", "allnli_split2", "nq", "quora_duplicates_split1"]
    assert plain["allnli_split2"][0].query[0] == "Similar" and plain["allnli_split2"][0].positive[0] == ""


def test_echo_data_needs_no_instructions(files, tmp_path):
    """A folder of llm2vec's echo-data files trains with the E5 table: the query strings are llm2vec's
    f"{E5_EMBEDDING_PROMPTS[dataset]}; " + separator + query; the config overrides an entry and adds one."""
    folder = tmp_path / "echo-data"
    folder.mkdir()
    for name, start in (("msmarco_passage", 0), ("quora_duplicates_split2", 20), ("fever", 40), ("mine", 60)):
        _write_jsonl(str(folder / f"{name}.jsonl"), _rows(name, 4, start))
    assert "mine" not in E5_INSTRUCTIONS and len(E5_INSTRUCTIONS) == 16
    with pytest.raises(ValueError, match=r"no instruction for dataset\(s\) \['mine'\]"):
        SupervisedRecipe(supervised_config(files, tmp_path, dataset_file_path=str(folder), instructions={}))
    recipe = SupervisedRecipe(supervised_config(files, tmp_path, dataset_file_path=str(folder),
                                                instructions={"mine": "Mine", "fever": "Check the claim"}))
    data = recipe.data
    assert sorted(data) == ["fever", "mine", "msmarco_passage", "quora_duplicates"]
    web = "Given a web search query, retrieve relevant passages that answer the query"
    example = data["msmarco_passage"][0]
    assert recipe.encoder.plan([example.query, example.positive]).prepared == [
        f"{web}; {SEPARATOR}{example.query[1]}", f"{SEPARATOR}{example.positive[1]}"]
    quora = "Find questions that have the same meaning as the input question;"
    assert data["quora_duplicates"][0].query[0] == data["quora_duplicates"][0].positive[0] == quora  # symmetric
    assert data["fever"][0].query[0] == "Check the claim;" and data["mine"][0].query[0] == "Mine;"


# ----------------------------------------------------------------------------------------- configs

def test_config_defaults_and_alias(files, tmp_path):
    simcse = SimCSEConfig.from_dict(dict(model_name_or_path=files["base"], output_dir=str(tmp_path),
                                         dataset_file_path=files["sentences"], attention_dropout=0.1))
    assert (simcse.per_device_train_batch_size, simcse.max_seq_length, simcse.loss_scale, simcse.pooling_mode,
            simcse.simcse_dropout) == (128, 128, 20.0, "mean", 0.1)
    supervised = SupervisedConfig.from_dict(dict(model_name_or_path=files["base"], output_dir=str(tmp_path),
                                                 dataset_file_path=files["echo"]))
    assert (supervised.loss_scale, supervised.per_device_train_batch_size, supervised.max_seq_length) == (50.0, 64, 512)


@pytest.mark.parametrize("kind,change,exc,match", [
    ("simcse", {"loss_scale": "20"}, TypeError, "loss_scale"),
    ("simcse", {"simcse_dropout": 1.0}, ValueError, "simcse_dropout"),
    ("simcse", {"dataset_file_path": "/nonexistent/wiki.txt"}, ValueError, "dataset_file_path"),
    ("simcse", {"pooling_mode": "max"}, ValueError, "pooling_mode"),
    ("simcse", {"grad_cache_chunk_size": 0}, ValueError, "grad_cache_chunk_size"),
    ("supervised", {"instructions": {"alpha": 3}}, TypeError, "instructions"),
    ("supervised", {"instructions": ["x"]}, TypeError, "instructions"),
    ("supervised", {"dataset_file_path": "/nonexistent/echo"}, ValueError, "dataset_file_path"),
    ("supervised", {"dataset_file_path": None}, ValueError, "dataset_file_path"),
    ("supervised", {"matryoshka_dims": [64, 0]}, ValueError, r"'matryoshka_dims' .*distinct sizes > 0"),
    ("supervised", {"matryoshka_dims": [64, 64]}, ValueError, r"'matryoshka_dims' .*distinct"),
    ("supervised", {"matryoshka_dims": []}, ValueError, r"'matryoshka_dims' must be a non-empty list"),
    ("supervised", {"matryoshka_dims": [64.5]}, TypeError, r"'matryoshka_dims'"),
    ("simcse", {"matryoshka_dims": [64, 32], "matryoshka_weights": [1.0]}, ValueError,
     r"'matryoshka_weights' needs one weight per entry"),
    ("simcse", {"matryoshka_weights": [1.0]}, ValueError, r"'matryoshka_weights' needs one weight"),
    ("simcse", {"matryoshka_dims": [64, 32], "matryoshka_weights": [0, 0]}, ValueError, r"one > 0"),
    ("simcse", {"matryoshka_dims": [64, 32], "matryoshka_weights": [float("nan"), 1.0]}, ValueError,
     r"'matryoshka_weights'"),  # every loss NaN, and an all-NaN adapter saved
    ("simcse", {"per_device_train_batch_size": 1}, ValueError,
     r"'per_device_train_batch_size' must give SimCSE at least 2 sentences a batch .*got 1 on 1 process"),
])
def test_bad_configs(files, tmp_path, kind, change, exc, match):
    make = simcse_config if kind == "simcse" else supervised_config
    with pytest.raises(exc, match=match):
        make(files, tmp_path, **change)


@pytest.fixture
def no_model_loading(monkeypatch):
    from llm2vec_fast.training import model_setup

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")
    monkeypatch.setattr(model_setup, "load_encoder_model", refuse)


def test_bad_data_fails_before_the_model_loads(files, tmp_path, no_model_loading):
    with pytest.raises(ValueError, match=r"no instruction for dataset\(s\) \['beta'\]"):
        SupervisedRecipe(supervised_config(files, tmp_path, instructions={"alpha": "x"}))
    with pytest.raises(ValueError, match=r"no instruction for dataset\(s\) \['alpha'\]"):
        SupervisedRecipe(supervised_config(files, tmp_path, dataset_file_path=files["single"], instructions={}))
    broken = tmp_path / "broken.jsonl"
    _write_jsonl(str(broken), [{"dataset": "alpha", "query": "q", "positive": "p"}, {"dataset": "alpha", "query": "q"}])
    with pytest.raises(ValueError, match=r"broken.jsonl:2: field 'positive' must be a string"):
        SupervisedRecipe(supervised_config(files, tmp_path, dataset_file_path=str(broken)))
    with pytest.raises(ValueError, match="no dataset has a full global batch"):
        SupervisedRecipe(supervised_config(files, tmp_path, per_device_train_batch_size=64))
    bad_text = tmp_path / "bad.jsonl"
    _write_jsonl(str(bad_text), [{"text": 5}])
    with pytest.raises(ValueError, match="field 'text' must be a string"):
        SimCSERecipe(simcse_config(files, tmp_path, dataset_file_path=str(bad_text)))
    with pytest.raises(TypeError, match="config must be a SimCSEConfig"):
        SimCSERecipe(supervised_config(files, tmp_path))


# -------------------------------------------------------------------------------------- distributed

DIST_CASES = [  # (name, recipe kind, config overrides, which batch of epoch 0)
    ("supervised", "supervised", {}, 0),
    ("supervised_grad_cache", "supervised", {"grad_cache_chunk_size": 3}, 1),
    ("simcse_uneven", "simcse", {"per_device_train_batch_size": 4, "dataset_file_path": "eleven"}, 1),
    ("supervised_matryoshka", "supervised", {"matryoshka_dims": [128, 16], "matryoshka_weights": [1.0, 0.5]}, 0),
]


def _make_recipe(files, out_dir, kind, overrides):
    overrides = dict(overrides)
    if overrides.get("dataset_file_path") == "eleven":
        overrides["dataset_file_path"] = files["eleven"]
    if kind == "supervised":
        return SupervisedRecipe(supervised_config(files, out_dir, **overrides))
    return SimCSERecipe(simcse_config(files, out_dir, **overrides))


def _dist_worker(rank, files, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    results = {}
    for name, kind, overrides, index in DIST_CASES:
        recipe = _make_recipe(files, out_dir, kind, overrides)
        batch = list(recipe.batches(0))[index]
        loss = recipe.train_step(batch, 1.0)
        results[name] = dict(batch=batch, loss=loss, grads=lora_grads(recipe.model))
    dist.barrier()
    dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def distributed_results(files, tmp_path_factory):
    import torch.multiprocessing as mp
    out_dir = str(tmp_path_factory.mktemp("dist"))
    context = mp.start_processes(_dist_worker, args=(files, out_dir), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("distributed workers did not finish within 240 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("case", DIST_CASES, ids=[c[0] for c in DIST_CASES])
def test_distributed_matches_union_batch(files, tmp_path, distributed_results, case):
    """Each rank's loss is the union batch's; the SUM of the ranks' LoRA gradients (what the loop
    all-reduces) is the union batch's gradient in one process."""
    name, kind, overrides, _ = case
    parts = [r[name] for r in distributed_results]
    batches = [p["batch"] for p in parts]
    if name == "simcse_uneven":
        assert [len(b.queries) for b in batches] == [2, 1]
    else:
        assert len({b.dataset for b in batches}) == 1  # both ranks hold parts of one dataset's batch
    union = ContrastiveBatch(queries=[q for b in batches for q in b.queries],
                             positives=[p for b in batches for p in b.positives],
                             negatives=[n for b in batches for n in b.negatives], dataset=batches[0].dataset)
    recipe = _make_recipe(files, str(tmp_path), kind, overrides)
    want_loss = recipe.train_step(union, 1.0)
    want = lora_grads(recipe.model)
    for rank, part in enumerate(parts):
        torch.testing.assert_close(part["loss"], want_loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"rank {rank}: {m}")
    summed = {k: sum(p["grads"][k] for p in parts) for k in want}
    assert_same_grads(summed, want, label=name)
