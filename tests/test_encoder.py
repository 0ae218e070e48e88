"""Tests of ``llm2vec_fast.LLM2Vec``, the drop-in for llm2vec 0.2.3's encoder.

Parity: ``tests/fixtures/llm2vec/<case>/reference.pt`` holds llm2vec 0.2.3's own embeddings (made by
``scripts/make_llm2vec_fixtures.py`` under transformers 4.44.2) for tiny random checkpoints of the
Llama (Llama-2 and Llama-3 tokenizers), Mistral, Gemma and Qwen2 families, every pooling mode and
skip_instruction, two (max_length, doc_max_length) settings, and llm2vec's MNTP + second-adapter
loading. The weights are regenerated here from their seed (checked by SHA-256) and saved as a
transformers 5 checkpoint next to the fixture's 4.44 config and tokenizer.

Tolerance: ``PARITY_ATOL = 1e-5`` absolute, on embeddings whose entries are of order 0.5 (norms 4-12).
llm2vec's own float32 result differs from its float64 result by at most 1.9e-6 on these models
(``float64_floor`` in each run), and ours differs from llm2vec's by at most as much; anything
semantic (one token more or less in a pooled set, another position, another template) moves an
embedding by 1e-2 or more. All on the CPU in float32.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from llm2vec_fast.encoder.text import normalize_inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "llm2vec")
PARITY_ATOL = 1e-5
SAME_ATOL = 1e-5  # two runs of our own that may differ only in batch composition / packing
CASE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _load_fixture_module():
    spec = importlib.util.spec_from_file_location("make_llm2vec_fixtures",
                                                  os.path.join(REPO, "scripts", "make_llm2vec_fixtures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mk = _load_fixture_module()
INPUTS = mk.INPUTS
CASES = list(mk.CASES)


def reference(case: str):
    return torch.load(os.path.join(FIXTURES, case, "reference.pt"), weights_only=True)


def run_id(run) -> str:
    return f"{run['pooling_mode']}-skip{int(run['skip_instruction'])}-ml{run['max_length']}"


PARITY_PARAMS = [pytest.param(case, index, id=f"{case}-{run_id(run)}")
                 for case in CASES for index, run in enumerate(reference(case)["runs"])]


# ------------------------------------------------------------------------------------ checkpoints

def write_checkpoint(case: str, folder: str) -> str:
    """The fixture's config and tokenizer plus the regenerated weights, as a transformers 5 folder."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from llm2vec_fast.models import BI_MODELS
    ref = reference(case)
    os.makedirs(folder, exist_ok=True)
    for name in CASE_FILES:
        shutil.copy(os.path.join(FIXTURES, case, name), folder)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = BI_MODELS[config.model_type](config)
    shapes = sorted((name, tuple(p.shape)) for name, p in model.state_dict().items())
    assert shapes == [(name, tuple(shape)) for name, shape in ref["parameter_shapes"]], \
        "transformers 5's state-dict keys differ from transformers 4.44's"
    state = mk.generate_state_dict(shapes, ref["seed"], ref["family"])
    assert mk.state_dict_sha256(state) == ref["weights_sha256"], "regenerated weights differ from the fixture's"
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm2vec_checkpoints")
    made = {}

    def get(case: str) -> str:
        if case not in made:
            made[case] = write_checkpoint(case, str(root / case))
        return made[case]
    return get


@pytest.fixture(scope="session")
def encoders(checkpoints):
    from llm2vec_fast import LLM2Vec
    made = {}

    def get(case: str):
        if case not in made:
            enable = reference(case)["enable_bidirectional"]
            made[case] = LLM2Vec.from_pretrained(checkpoints(case), enable_bidirectional=enable)
        return made[case]
    return get


def configure(encoder, run) -> None:
    encoder.pooling_mode, encoder.skip_instruction = run["pooling_mode"], run["skip_instruction"]
    encoder.max_length, encoder.doc_max_length = run["max_length"], run["doc_max_length"]


def as_items(inputs):
    return [("", x) if isinstance(x, str) else (x[0], x[1]) for x in inputs]


def assert_matches_reference(emb: torch.Tensor, run) -> float:
    """Rows llm2vec pools without padding: its padded batch; rows it pools from padding: the input
    encoded alone; rows without a token: zeros. Returns the largest error."""
    worst = 0.0
    for row in range(len(INPUTS)):
        if row in run["unsupported"]:
            assert torch.equal(emb[row], torch.zeros_like(emb[row])), f"row {row} has no token: expected zeros"
            continue
        expected = run["alone"][row] if row in run["padding_dependent"] else run["embeddings"][row]
        error = float((emb[row] - expected).abs().max())
        assert error <= PARITY_ATOL, f"row {row} ({INPUTS[row]!r:.60}): max abs error {error:.3g}"
        worst = max(worst, error)
    return worst


# ---------------------------------------------------------------------------------------- parity

def test_fixtures_come_from_llm2vec_0_2_3():
    for case in CASES + [mk.ADAPTER_CASE]:
        versions = reference(case)["versions"]
        assert versions["transformers"] == "4.44.2" and versions["llm2vec"] == "0.2.3", (case, versions)


@pytest.mark.parametrize("case,index", PARITY_PARAMS)
def test_tokenization_matches_llm2vec(encoders, case, index):
    """Token ids (templates, EOS texts, word truncation, max_length) and embed counts, exactly."""
    encoder = encoders(case)
    run = reference(case)["runs"][index]
    configure(encoder, run)
    plan = encoder.plan(as_items(INPUTS))
    assert plan.prepared == run["prepared"]
    assert plan.input_ids == run["input_ids"]
    assert plan.embed_counts == run["embed_counts"]


@pytest.mark.parametrize("case,index", PARITY_PARAMS)
def test_parity_with_llm2vec(encoders, case, index):
    encoder = encoders(case)
    run = reference(case)["runs"][index]
    configure(encoder, run)
    emb = encoder.encode(INPUTS, show_progress_bar=False)
    assert emb.dtype == torch.float32 and emb.device.type == "cpu" and emb.shape == run["embeddings"].shape
    assert_matches_reference(emb, run)


def test_parity_checks_the_semantics(encoders):
    """The tolerance is far below what any semantic slip costs: pooling one token fewer fails it."""
    encoder = encoders("llama")
    run = reference("llama")["runs"][0]
    configure(encoder, run)
    plan = encoder.plan(as_items(INPUTS))
    emb = encoder._embed_batch(plan.input_ids[:1], [plan.embed_counts[0] - 1], False)
    assert float((emb[0] - run["embeddings"][0]).abs().max()) > 100 * PARITY_ATOL


def adapter_folders(root: str, checkpoints) -> tuple:
    """Base (the llama weights), an MNTP folder (config, tokenizer, LoRA adapter -> base) and a second
    adapter with llm2vec_config.json: the layout llm2vec's published MNTP + supervised models use."""
    from peft import LoraConfig, get_peft_model

    from llm2vec_fast.models import LlamaBiModel
    ref = reference(mk.ADAPTER_CASE)
    base = checkpoints("llama")
    shas = []
    folders = []
    for seed, name in ((mk.MNTP_SEED, "mntp"), (mk.SIMCSE_SEED, "simcse")):
        folder = os.path.join(root, name)
        peft_model = get_peft_model(LlamaBiModel.from_pretrained(base), LoraConfig(**mk.LORA))
        named = {mk.lora_file_key(n): p for n, p in peft_model.named_parameters() if "lora_" in n}
        state = mk.generate_state_dict([(k, tuple(p.shape)) for k, p in named.items()], seed, "llama")
        with torch.no_grad():
            for key, param in named.items():
                param.copy_(state[key])
        peft_model.save_pretrained(folder)
        with open(os.path.join(folder, "adapter_config.json")) as f:
            adapter_config = json.load(f)
        adapter_config["base_model_name_or_path"] = base
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(adapter_config, f)
        shas.append(mk.state_dict_sha256(state))
        folders.append(folder)
    assert shas == [ref["mntp_sha256"], ref["simcse_sha256"]], "regenerated LoRA weights differ from the fixture's"
    mntp, simcse = folders
    for name in CASE_FILES:
        shutil.copy(os.path.join(FIXTURES, mk.ADAPTER_CASE, name), mntp)
    with open(os.path.join(simcse, "llm2vec_config.json"), "w") as f:
        json.dump(mk.SIMCSE_LLM2VEC_CONFIG, f)
    return base, mntp, simcse


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, checkpoints):
    return adapter_folders(str(tmp_path_factory.mktemp("adapters")), checkpoints)


@pytest.mark.parametrize("index", range(len(mk.ADAPTER_RUNS)),
                         ids=[f"merge_peft={m}" for m, _ in mk.ADAPTER_RUNS])
def test_parity_mntp_and_second_adapter(adapters, index):
    """llm2vec's MNTP flow: the adapter beside the base merged, a second adapter loaded (merged or not),
    llm2vec_config.json from the second adapter, kwargs overriding it."""
    from peft import PeftModel

    from llm2vec_fast import LLM2Vec
    _, mntp, simcse = adapters
    run = reference(mk.ADAPTER_CASE)["runs"][index]
    encoder = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=simcse, merge_peft=run["merge_peft"],
                                      **run["kwargs"])
    assert isinstance(encoder.model, PeftModel) == (not run["merge_peft"])
    assert (encoder.pooling_mode, encoder.skip_instruction, encoder.max_length, encoder.doc_max_length) == (
        run["pooling_mode"], run["skip_instruction"], run["max_length"], run["doc_max_length"])
    assert_matches_reference(encoder.encode(INPUTS, show_progress_bar=False), run)


def test_adapter_inside_a_full_checkpoint_is_merged_once(adapters, tmp_path):
    """A folder holding full weights and an adapter: its own weights plus the adapter, merged once
    (transformers 5 would also load the adapter itself)."""
    from llm2vec_fast import LLM2Vec
    base, mntp, _ = adapters
    both = str(tmp_path / "both")
    shutil.copytree(base, both)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(os.path.join(mntp, name), both)
    expected = LLM2Vec.from_pretrained(mntp).encode(INPUTS[:6], show_progress_bar=False)
    got = LLM2Vec.from_pretrained(both).encode(INPUTS[:6], show_progress_bar=False)
    plain = LLM2Vec.from_pretrained(base).encode(INPUTS[:6], show_progress_bar=False)
    assert torch.allclose(got, expected, atol=SAME_ATOL, rtol=0)
    assert float((got - plain).abs().max()) > 1e-3  # the adapter did change the model


# ------------------------------------------------------------------------------ our own invariants

def _switch_attention(encoder, impl: str) -> None:
    from llm2vec_fast.models import decoder_body
    decoder_body(encoder.model).set_attn_implementation(impl)


@pytest.mark.parametrize("case", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize("mode", ["mean", "weighted_mean", "eos_token", "bos_token"])
def test_packed_equals_padded(checkpoints, case, mode):
    """The packed path (attn "llm2vec_fast") and the padded one (attn "sdpa", the model's own forward),
    and llm2vec's tokenize -> forward, give the same embeddings."""
    from llm2vec_fast import LLM2Vec
    if mode == "bos_token" and case == "qwen2":
        pytest.skip("Qwen2 tokenizers add no BOS")
    packed = LLM2Vec.from_pretrained(checkpoints(case), pooling_mode=mode, max_length=64, doc_max_length=24)
    padded = LLM2Vec.from_pretrained(checkpoints(case), pooling_mode=mode, max_length=64, doc_max_length=24,
                                     attn_implementation="sdpa")
    assert packed._packable() and not padded._packable()
    a = packed.encode(INPUTS, show_progress_bar=False)
    b = padded.encode(INPUTS, show_progress_bar=False)
    assert torch.allclose(a, b, atol=SAME_ATOL, rtol=0)
    # llm2vec's step-by-step API on one padded batch, both paths
    prepared = [packed.prepare_for_tokenization(packed._convert_to_str(i, t)) for i, t in as_items(INPUTS[:8])]
    features = packed.tokenize(prepared)
    with torch.no_grad():
        c = packed.forward(dict(features))
        d = padded.forward(dict(features))
    assert torch.allclose(c, a[:8], atol=SAME_ATOL, rtol=0)
    assert torch.allclose(d, a[:8], atol=SAME_ATOL, rtol=0)


@pytest.mark.parametrize("impl", ["llm2vec_fast", "sdpa"])
def test_encode_tokens(checkpoints, impl):
    """Token embeddings: per input, the hidden states of every token it was encoded with, equal to that
    input's own forward; mean pooling of its last embed_count rows is encode's embedding; None gives
    dicts whose sentence_embedding is encode's, from the same forward. Packed and padded paths."""
    from llm2vec_fast import LLM2Vec
    encoder = LLM2Vec.from_pretrained(checkpoints("llama"), max_length=64, doc_max_length=24,
                                      **({} if impl == "llm2vec_fast" else {"attn_implementation": impl}))
    assert encoder._packable() == (impl == "llm2vec_fast")
    items = INPUTS[:9] + [""]  # "": no tokens at all
    plan = encoder.plan(as_items(items))
    tokens = encoder.encode_tokens(items, max_tokens_per_batch=40)  # several batches
    assert isinstance(tokens, list) and len(tokens) == len(items)
    pooled = encoder.encode(items, show_progress_bar=False)
    for i, (t, ids, n) in enumerate(zip(tokens, plan.input_ids, plan.embed_counts)):
        assert t.dtype == torch.float32 and t.device.type == "cpu" and t.shape == (len(ids), encoder._hidden_size()), i
        if not ids:
            continue
        with torch.no_grad():
            alone = encoder.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        assert torch.allclose(t, alone, atol=SAME_ATOL, rtol=0), i
        assert torch.allclose(t[-min(n, len(ids)):].mean(0), pooled[i], atol=SAME_ATOL, rtol=0), i
    outputs = encoder.encode_tokens(items, output_value=None, normalize_embeddings=True, max_tokens_per_batch=40)
    normalized = encoder.encode(items, show_progress_bar=False, normalize_embeddings=True)
    for i, (out, ids) in enumerate(zip(outputs, plan.input_ids)):
        assert set(out) == {"input_ids", "token_embeddings", "sentence_embedding"}
        assert out["input_ids"].tolist() == ids
        assert torch.equal(out["token_embeddings"], tokens[i])
        assert torch.allclose(out["sentence_embedding"], normalized[i], atol=SAME_ATOL, rtol=0), i
    # truncate_dim cuts sentence_embedding as encode does (normalised after the cut), not the token states.
    cut = encoder.encode_tokens(items, output_value=None, normalize_embeddings=True, truncate_dim=24,
                                max_tokens_per_batch=40)
    want = encoder.encode(items, show_progress_bar=False, normalize_embeddings=True, truncate_dim=24)
    for i, out in enumerate(cut):
        assert out["sentence_embedding"].shape == (24,) and torch.equal(out["token_embeddings"], tokens[i]), i
        assert torch.allclose(out["sentence_embedding"], want[i], atol=SAME_ATOL, rtol=0), i
    assert torch.allclose(want[:-1].norm(dim=1), torch.ones(len(items) - 1), atol=1e-5)  # "" stays zero
    assert encoder.encode_tokens("one text")[0].shape[0] == len(encoder.plan(as_items(["one text"])).input_ids[0])
    with pytest.raises(ValueError, match="truncate_dim must be a positive int, got -3"):
        encoder.encode_tokens(items, output_value=None, truncate_dim=-3)
    with pytest.raises(ValueError, match="output_value must be 'token_embeddings' or None, got 'sentence'"):
        encoder.encode_tokens(items, output_value="sentence")
    with pytest.raises(ValueError, match="max_tokens_per_batch must be a positive int, got 0"):
        encoder.encode_tokens(items, max_tokens_per_batch=0)


def test_tokenize_is_llm2vecs_padded_batch(encoders):
    """tokenize: left padding with pad = eos, embed_mask over the last n positions."""
    encoder = encoders("mistral")
    run = reference("mistral")["runs"][0]
    configure(encoder, run)
    features = encoder.tokenize(run["prepared"])
    width = max(len(ids) for ids in run["input_ids"])
    assert features["input_ids"].shape == (len(INPUTS), width)
    pad = encoder.tokenizer.eos_token_id
    assert encoder.tokenizer.pad_token_id == pad and encoder.tokenizer.padding_side == "left"
    for row, (ids, n) in enumerate(zip(run["input_ids"], run["embed_counts"])):
        assert features["input_ids"][row].tolist() == [pad] * (width - len(ids)) + ids
        assert features["attention_mask"][row].tolist() == [0] * (width - len(ids)) + [1] * len(ids)
        n = min(n, width)
        assert features["embed_mask"][row].tolist() == [0] * (width - n) + [1] * n
    for name, tensor in encoder.tokenize([]).items():  # no texts: empty (0, 0) features (was a reshape error)
        assert tensor.shape == (0, 0) and tensor.dtype == torch.long, name


def test_get_pooling_mean_with_nothing_to_pool(encoders):
    """mean + skip_instruction with an empty text part pools every real token (never NaN)."""
    encoder = encoders("llama")
    encoder.pooling_mode, encoder.skip_instruction = "mean", True
    hidden = torch.randn(2, 4, 8)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    embed = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1]])
    out = encoder.get_pooling({"attention_mask": mask, "embed_mask": embed}, hidden)
    assert torch.allclose(out[0], hidden[0, 1:].mean(0), atol=1e-6)
    assert torch.allclose(out[1], hidden[1, 2:].mean(0), atol=1e-6)


@pytest.mark.parametrize("budget", [1, 30, 100, 100_000])
def test_batch_size_invariance(encoders, budget):
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    expected = encoder.encode(INPUTS, batch_size=1, show_progress_bar=False)
    got = encoder.encode(INPUTS, show_progress_bar=False, max_tokens_per_batch=budget)
    assert torch.allclose(got, expected, atol=SAME_ATOL, rtol=0)
    assert torch.allclose(encoder.encode(INPUTS, batch_size=64, show_progress_bar=False), expected,
                          atol=SAME_ATOL, rtol=0)


def _fits_in(monkeypatch, encoder, max_tokens: int):
    """Makes batches of more than ``max_tokens`` real tokens raise torch.OutOfMemoryError, as a device would;
    returns the token counts of the batches that ran."""
    ran = []
    run_batch = type(encoder)._run_batch

    def limited(self, prepared, normalize):
        tokens = prepared.packed.num_tokens if prepared.packed is not None else int(prepared.mask.sum())
        if tokens > max_tokens:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test: {tokens} > {max_tokens} tokens)")
        ran.append(tokens)
        return run_batch(self, prepared, normalize)
    monkeypatch.setattr(type(encoder), "_run_batch", limited)
    return ran


def test_out_of_memory_splits_the_batch_and_lowers_the_budget(encoders, monkeypatch):
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    expected = encoder.encode(INPUTS, show_progress_bar=False)
    longest = max(len(ids) for ids in encoder.plan(normalize_inputs(INPUTS)).input_ids)
    ran = _fits_in(monkeypatch, encoder, max_tokens=longest + 3)
    with pytest.warns(RuntimeWarning, match=r"out of device memory .* max_tokens_per_batch=\d+"):
        got = encoder.encode(INPUTS, show_progress_bar=False, max_tokens_per_batch=100_000)
    assert torch.allclose(got, expected, atol=SAME_ATOL, rtol=0)  # every row, in order, nothing lost
    assert len(ran) > 1 and max(ran) <= longest + 3


def test_an_input_too_long_to_run_alone_names_its_length(encoders, monkeypatch):
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    lengths = [len(ids) for ids in encoder.plan(normalize_inputs(INPUTS)).input_ids]
    _fits_in(monkeypatch, encoder, max_tokens=max(lengths) - 1)
    with pytest.warns(RuntimeWarning), pytest.raises(torch.OutOfMemoryError,
                                                     match=f"one input of {max(lengths)} tokens .* max_length"):
        encoder.encode(INPUTS, show_progress_bar=False)


@pytest.mark.parametrize("plan_chunk", [1, 5, 8, 16384])
@pytest.mark.parametrize("count", [0, 1, 2, 7, 63, 64, 65, 95, 96, 97, 200, 384, 1000, 20000, 40000])
def test_plan_chunks_cover_every_input_once(monkeypatch, count, plan_chunk):
    """Chunks are consecutive, cover [0, count) once and hold at most PLAN_CHUNK inputs; without the ramp
    each holds PLAN_CHUNK (the last the rest); with it they start at FIRST_PLAN_CHUNK and double, and only
    the last may break that, by taking in a remainder under half the chunk before it."""
    from llm2vec_fast.encoder import llm2vec as module
    monkeypatch.setattr(module, "PLAN_CHUNK", plan_chunk)
    for ramp in (False, True):
        chunks = module.plan_chunks(count, ramp)
        assert [start for start, _ in chunks] == [0, *(stop for _, stop in chunks)][:len(chunks)]
        assert (chunks[-1][1] if chunks else 0) == count
        sizes = [stop - start for start, stop in chunks]
        assert all(0 < size <= plan_chunk for size in sizes), sizes
        if not ramp:
            assert sizes[:-1] == [plan_chunk] * (len(sizes) - 1)
            continue
        planned = [min(module.FIRST_PLAN_CHUNK * 2 ** k, plan_chunk) for k in range(len(sizes))]
        assert sizes[:-1] == planned[:-1], sizes
        if len(sizes) > 1:  # the last: its planned size cut short, or that plus a small remainder
            assert sizes[-1] <= planned[-1] or sizes[-1] - planned[-1] < planned[-1] // 2, sizes
    monkeypatch.setattr(module, "PLAN_CHUNK", 16384)
    assert [stop - start for start, stop in module.plan_chunks(384, ramp=True)] == [64, 128, 192]
    assert [stop - start for start, stop in module.plan_chunks(200, ramp=True)] == [64, 136]  # not 64, 128, 8
    assert module.plan_chunks(384) == [(0, 384)]


def test_a_ramped_encode_plans_small_chunks_first_and_gives_the_same_rows(encoders, monkeypatch):
    """On a GPU's settings (plan-ahead forced here on the CPU, so the ramp is on) the first chunk holds
    FIRST_PLAN_CHUNK inputs and the next ones double; every row equals the one-chunk encode's."""
    from llm2vec_fast.encoder import llm2vec as module
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    items = ENCODE_ITEMS + [f"{word} tide {i}" for i, word in enumerate("one two three four five six".split() * 5)]
    expected = encoder.encode(items, show_progress_bar=False)
    monkeypatch.setattr(module, "_plan_ahead", lambda device: True)
    monkeypatch.setattr(module, "FIRST_PLAN_CHUNK", 2)
    planned = []
    plan = type(encoder).plan

    def recording_plan(self, chunk_items, direct=False):
        planned.append(len(chunk_items))
        return plan(self, chunk_items, direct)
    monkeypatch.setattr(type(encoder), "plan", recording_plan)
    got = encoder.encode(items, show_progress_bar=False)
    distinct = len(dict.fromkeys(normalize_inputs(items)))
    assert planned == [stop - start for start, stop in module.plan_chunks(distinct, ramp=True)]
    assert planned[:4] == [2, 4, 8, 16] and sum(planned) == distinct
    assert torch.allclose(got, expected, atol=SAME_ATOL, rtol=0)


def test_next_chunk_is_tokenised_while_this_one_runs(encoders, monkeypatch):
    """With plan-ahead (a GPU's setting, forced here on the CPU), chunk k+1 is tokenised on a background
    thread while chunk k's batches run: the first batch of chunk 0 waits until the plan of chunk 1 has
    started (it would time out if plans ran only between chunks). The rows equal the sequential run's."""
    import threading

    from llm2vec_fast.encoder import llm2vec as module
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    monkeypatch.setattr(module, "PLAN_CHUNK", 5)
    expected = encoder.encode(INPUTS, show_progress_bar=False)
    monkeypatch.setattr(module, "_plan_ahead", lambda device: True)
    second_plan_started = threading.Event()
    planned_on = []
    plan, run_batch = type(encoder).plan, type(encoder)._run_batch

    def recording_plan(self, items, direct=False):
        planned_on.append(threading.current_thread().name)
        if items[0] == normalize_inputs(INPUTS)[5]:
            second_plan_started.set()
        return plan(self, items, direct)

    def waiting_run_batch(self, prepared, normalize):
        assert second_plan_started.wait(timeout=30), "chunk 1 was not tokenised while chunk 0 ran"
        return run_batch(self, prepared, normalize)
    monkeypatch.setattr(type(encoder), "plan", recording_plan)
    monkeypatch.setattr(type(encoder), "_run_batch", waiting_run_batch)
    got = encoder.encode(INPUTS, show_progress_bar=False)
    assert torch.allclose(got, expected, atol=SAME_ATOL, rtol=0)
    chunks = -(-len(INPUTS) // 5)
    assert len(planned_on) == chunks and all(name.startswith("llm2vec-fast-plan") for name in planned_on)


def test_benchmark_baseline_is_llm2vecs_algorithm(encoders):
    """benchmarks/bench_encode.py's baseline (llm2vec 0.2.3's encode re-implemented on transformers 5)
    gives llm2vec's embeddings (rows pooled from padding aside: transformers 5 computes padding positions
    differently from 4.44)."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from benchmarks.bench_encode import llm2vec_reference_encode
    from llm2vec_fast.models import decoder_body
    encoder = encoders("llama")
    body = decoder_body(encoder.model)
    for run in reference("llama")["runs"]:
        if run["pooling_mode"] not in ("mean", "weighted_mean"):
            continue
        try:
            body.set_attn_implementation("sdpa")
            emb = llm2vec_reference_encode(encoder.model, encoder.tokenizer, INPUTS, "cpu",
                                           pooling_mode=run["pooling_mode"], max_length=run["max_length"],
                                           doc_max_length=run["doc_max_length"],
                                           skip_instruction=run["skip_instruction"], batch_size=mk.BATCH_SIZE)
        finally:
            body.set_attn_implementation("llm2vec_fast")
        keep = [r for r in range(len(INPUTS)) if r not in run["padding_dependent"]]
        assert torch.allclose(emb[keep], run["embeddings"][keep], atol=PARITY_ATOL, rtol=0), run_id(run)


def test_cpu_token_budget_default(encoders, monkeypatch):
    """On the CPU the default pack holds at most CPU_TOKEN_BUDGET tokens (batch_size * max_length else)."""
    from llm2vec_fast.encoder import llm2vec as module
    seen = []
    original = module.token_batches

    def spy(order, lengths, budget, padded=False):
        seen.append(budget)
        return original(order, lengths, budget, padded)
    monkeypatch.setattr(module, "token_batches", spy)
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    encoder.encode(INPUTS[:3], show_progress_bar=False)
    encoder.encode(INPUTS[:3], batch_size=2, show_progress_bar=False)
    encoder.encode(INPUTS[:3], max_tokens_per_batch=99_999, show_progress_bar=False)
    assert seen == [module.CPU_TOKEN_BUDGET, 2 * encoder.max_length, 99_999]


def test_token_batches_respect_the_budget():
    from llm2vec_fast.encoder import token_batches
    lengths = [9, 7, 7, 5, 3, 3, 2, 1, 30]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = token_batches(order, lengths, 12)
    assert [i for b in batches for i in b] == order
    assert batches[0] == [8]  # longer than the budget: alone
    assert all(sum(lengths[i] for i in b) <= 12 for b in batches[1:])
    padded = token_batches(order, lengths, 21, padded=True)
    assert all(len(b) * max(lengths[i] for i in b) <= 21 for b in padded[1:])


def test_input_order_is_preserved(encoders):
    encoder = encoders("qwen2")
    configure(encoder, reference("qwen2")["runs"][0])
    expected = encoder.encode(INPUTS, show_progress_bar=False)
    permutation = torch.randperm(len(INPUTS), generator=torch.Generator().manual_seed(3)).tolist()
    shuffled = encoder.encode([INPUTS[i] for i in permutation], show_progress_bar=False)
    assert torch.allclose(shuffled, expected[permutation], atol=SAME_ATOL, rtol=0)
    doubled = encoder.encode(INPUTS + INPUTS[::-1], show_progress_bar=False)
    assert torch.allclose(doubled, torch.cat([expected, expected.flip(0)]), atol=SAME_ATOL, rtol=0)


def test_input_edge_cases(encoders):
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    hidden = encoder.model.config.hidden_size
    text, pair = INPUTS[0], INPUTS[1]
    one = encoder.encode(text, show_progress_bar=False)  # a single string is one text
    assert one.shape == (1, hidden)
    assert torch.allclose(one, encoder.encode([text], show_progress_bar=False), atol=SAME_ATOL, rtol=0)
    empty = encoder.encode([], show_progress_bar=False)
    assert isinstance(empty, torch.Tensor) and empty.shape == (0, hidden) and empty.dtype == torch.float32
    empty_np = encoder.encode([], convert_to_numpy=True, show_progress_bar=False)
    assert isinstance(empty_np, np.ndarray) and empty_np.shape == (0, hidden) and empty_np.dtype == np.float32
    mixed = encoder.encode([text, tuple(pair), pair + [7]], show_progress_bar=False)
    separate = encoder.encode([text, pair, pair], show_progress_bar=False)
    assert torch.allclose(mixed, separate, atol=SAME_ATOL, rtol=0)
    medi = encoder.encode(pair + [0], show_progress_bar=False)  # llm2vec's single [instruction, text, int]
    assert torch.allclose(medi, separate[1:2], atol=SAME_ATOL, rtol=0)
    generated = encoder.encode((t for t in [text, text]), show_progress_bar=False)
    assert generated.shape == (2, hidden)
    as_numpy = encoder.encode([text, pair], convert_to_numpy=True, show_progress_bar=False)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32
    assert isinstance(encoder.encode([text], convert_to_numpy=True, convert_to_tensor=True,
                                     show_progress_bar=False), torch.Tensor)
    rows = np.array([pair, ["", text]])  # a 2-D array of [instruction, text] rows (llm2vec takes them)
    assert torch.equal(encoder.encode(rows, show_progress_bar=False),
                       encoder.encode([pair, ["", text]], show_progress_bar=False))
    normalized = encoder.encode([text, pair], normalize_embeddings=True, show_progress_bar=False)
    assert torch.allclose(normalized.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(normalized, torch.nn.functional.normalize(separate[:2], dim=1), atol=1e-5)


def test_text_without_tokens_embeds_to_zeros(encoders):
    """Qwen2 adds no BOS: an empty text has no token; it embeds to zeros, normalised or not (no NaN)."""
    encoder = encoders("qwen2")
    configure(encoder, reference("qwen2")["runs"][0])
    name = encoder.model.config._name_or_path
    try:
        encoder.model.config._name_or_path = "tiny-random/qwen2"  # no chat template around the text
        assert encoder.plan([("", "")]).input_ids == [[]]
        emb = encoder.encode(["", "x", ""], normalize_embeddings=True, show_progress_bar=False)
    finally:
        encoder.model.config._name_or_path = name
    assert torch.equal(emb[0], torch.zeros_like(emb[0])) and torch.equal(emb[2], emb[0])
    assert torch.isfinite(emb).all() and abs(float(emb[1].norm()) - 1) < 1e-5


@pytest.mark.parametrize("bad,index", [
    (["ok", 3], 1), (["ok", None], 1), ([b"bytes"], 0), (["ok", "fine", {"text": "x"}], 2),
    ([["instruction", 5]], 0), ([["only one"]], 0), (["a", ["instruction", None]], 1)])
def test_bad_items_raise_type_error_naming_the_index(encoders, bad, index):
    encoder = encoders("llama")
    with pytest.raises(TypeError, match=rf"sentences\[{index}\]"):
        encoder.encode(bad, show_progress_bar=False)


class _Table:
    """What a pandas DataFrame looks like to encode: columns, and iteration over the column names."""
    columns = ["instruction", "text"]

    def __iter__(self):
        return iter(self.columns)


def test_bad_arguments(encoders):
    encoder = encoders("llama")
    for bad, name in ((None, "None"), (5, "int"), (b"text", "bytes"), ({"a": "b"}, "dict"), (_Table(), "_Table")):
        with pytest.raises(TypeError, match=f"got {name}$"):  # a table would have embedded its column names
            encoder.encode(bad, show_progress_bar=False)
    with pytest.raises(ValueError, match="batch_size"):
        encoder.encode(["a"], batch_size=0, show_progress_bar=False)
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        encoder.encode(["a"], max_tokens_per_batch=0, show_progress_bar=False)
    with pytest.raises(ValueError, match=r"truncate_dim must be <= 128 \(the model's hidden size\), got 129"):
        encoder.encode(["a"], truncate_dim=129, show_progress_bar=False)
    assert encoder.encode(["a"], batch_size=np.int64(4), truncate_dim=np.int64(8), show_progress_bar=False).shape == \
        (1, 8)
    for bad in (["fine", "half an emoji \ud83d"], [["fine", "x"], ["instruction \udc00", "text"]]):
        with pytest.raises(ValueError, match=r"sentences\[1\](\[0\])? is not valid Unicode text: '\\ud[8c]"):
            encoder.encode(bad, show_progress_bar=False)
    for name, bad, message in (("doc_max_length", -1, "an int >= 0"), ("max_length", 0, "a positive int"),
                               ("doc_max_length", 2.5, "an int >= 0")):
        setting = getattr(encoder, name)
        try:
            setattr(encoder, name, bad)  # llm2vec users set these after construction too
            with pytest.raises(ValueError, match=f"{name} must be {message}, got {bad}"):
                encoder.encode(["a b"], show_progress_bar=False)
        finally:
            setattr(encoder, name, setting)
    mode = encoder.pooling_mode
    try:
        encoder.pooling_mode = "cls"
        with pytest.raises(ValueError, match="cls is not implemented"):
            encoder.encode(["a"], show_progress_bar=False)
    finally:
        encoder.pooling_mode = mode


def test_progress_bar_shows_texts_and_tokens_per_second(encoders, capsys):
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    encoder.encode(INPUTS, show_progress_bar=True)
    err = capsys.readouterr().err
    assert "16/16" in err and "text/s" in err and "tok/s" in err
    encoder.encode(INPUTS[:2], show_progress_bar=False)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------------- tokenisation

class CountingTokenizer:
    """Wraps a tokenizer and records every string it tokenises."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.seen = []

    def __call__(self, text, *args, **kwargs):
        self.seen.extend([text] if isinstance(text, str) else list(text))
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_each_text_is_tokenised_once(encoders):
    from llm2vec_fast.encoder.tokenization import SpecialTokens, plan_inputs
    from llm2vec_fast.encoder.text import prepare_for_tokenization
    encoder = encoders("llama")
    specials = SpecialTokens.detect(encoder.tokenizer)
    texts = [f"text number {i} about tides and embeddings" for i in range(20)]
    counting = CountingTokenizer(encoder.tokenizer)
    plain = lambda s: prepare_for_tokenization(s, "tiny", "llama", "mean")  # noqa: E731
    plan = plan_inputs(as_items(texts), counting, plain, 64, 400, specials=specials)
    assert sorted(counting.seen) == sorted(texts)
    assert plan.input_ids == encoder.plan(as_items(texts), direct=True).input_ids
    # with instructions: the text and the joined string, once each
    counting.seen.clear()
    plan_inputs([("Instruct:", t) for t in texts], counting, plain, 64, 400, specials=specials)
    assert len(counting.seen) == 2 * len(texts) and len(set(counting.seen)) == len(counting.seen)


class RecordingTokenizer(CountingTokenizer):
    """Also records the strings of each call."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.calls = []

    def __call__(self, text, *args, **kwargs):
        self.calls.append([text] if isinstance(text, str) else list(text))
        return super().__call__(text, *args, **kwargs)


@pytest.mark.parametrize("side", ["right", "left"])
def test_long_documents_keep_max_length_ids(encoders, monkeypatch, side):
    """Long documents: a tokenizer call takes at most FILL_CHARS characters (one call for a chunk of 16384
    documents held GBs of encodings), the cache keeps at most max_length ids per string and forgets a text's
    versions before word truncation; the plan stays the tokenizer's own (either truncation side)."""
    from llm2vec_fast.encoder import tokenization
    from llm2vec_fast.encoder.text import prepare_for_tokenization
    encoder = encoders("llama")
    monkeypatch.setattr(tokenization, "FILL_CHARS", 2000)
    monkeypatch.setattr(encoder.tokenizer, "truncation_side", side)
    docs = [f"{i} " + (mk.LONG_1 + " ") * 3 for i in range(6)]  # ~1200 characters, ~300 tokens each
    items = [("Instruct:", d) for d in docs] + as_items(docs + ["short text"])
    tokenizer = encoder.tokenizer
    recording = RecordingTokenizer(tokenizer)
    specials = tokenization.SpecialTokens.detect(tokenizer)
    plain = lambda s: prepare_for_tokenization(s, "tiny", "llama", "mean")  # noqa: E731
    saved = (encoder.max_length, encoder.doc_max_length, encoder.pooling_mode)
    try:
        for doc_max_length in (24, 1000):  # cut by words / cut at max_length only
            encoder.max_length, encoder.doc_max_length, encoder.pooling_mode = 64, doc_max_length, "mean"
            encoder.tokenizer = recording
            recording.calls.clear()
            plan = encoder.plan(items)
            encoder.tokenizer = tokenizer
            assert recording.calls and all(len(c) == 1 or sum(map(len, c)) <= 2000 for c in recording.calls)
            cache = tokenization.TokenCache(tokenizer, 64)
            assert tokenization.plan_inputs(items, tokenizer, plain, 64, doc_max_length, cache=cache,
                                            specials=specials).input_ids == plan.input_ids
            longest = max(len(ids) for ids in cache._ids.values())
            if doc_max_length == 24:
                assert longest <= 64 and not set(docs) & set(cache._ids)  # the whole documents are forgotten
            else:
                assert longest == 64  # the documents' ids, cut where the tokenizer cuts them
            direct = encoder.plan(items, direct=True)
            assert plan.input_ids == direct.input_ids and plan.embed_counts == direct.embed_counts
    finally:
        encoder.tokenizer = tokenizer
        encoder.max_length, encoder.doc_max_length, encoder.pooling_mode = saved


@pytest.mark.parametrize("case", ["llama", "llama3_instruct", "gemma", "qwen2"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_length", [3, 12, 512])
def test_special_token_shortcut_equals_the_tokenizer(encoders, case, side, max_length):
    """Plain ids + detected special tokens, truncated, == tokenizer(..., add_special_tokens=True)."""
    encoder = encoders(case)
    saved = (encoder.tokenizer.truncation_side, encoder.max_length, encoder.doc_max_length, encoder.pooling_mode)
    try:
        encoder.tokenizer.truncation_side = side
        encoder.max_length, encoder.doc_max_length, encoder.pooling_mode = max_length, 1000, "eos_token"
        items = as_items(INPUTS) + [("", mk.LONG_1 + " " + mk.LONG_2)]
        assert encoder._specials() is not None
        fast, direct = encoder.plan(items), encoder.plan(items, direct=True)
        assert fast.input_ids == direct.input_ids and fast.embed_counts == direct.embed_counts
    finally:
        encoder.tokenizer.truncation_side, encoder.max_length, encoder.doc_max_length, encoder.pooling_mode = saved


def test_templates_and_eos_texts():
    from llm2vec_fast.encoder.text import join_instruction, prepare_for_tokenization, split_separator
    joined = join_instruction("  Instruct: ", "a text ")
    assert joined == "Instruct: !@#$%^&*()a text "
    assert prepare_for_tokenization(joined, "x", "mistral", "mean") == joined
    assert prepare_for_tokenization(joined, "x", "mistral", "eos_token") == "Instruct: !@#$%^&*()a text </s>"
    assert prepare_for_tokenization(joined, "x", "gemma", "eos_token").endswith("a text<eos>")
    assert prepare_for_tokenization(joined, "x", "qwen2", "eos_token").endswith("a text<|endoftext|>")
    for family in ("gemma2", "gemma3_text", "qwen3", "phi3"):  # llm2vec 0.2.3 appends nothing for these
        assert prepare_for_tokenization(joined, "x", family, "eos_token") == joined
    assert prepare_for_tokenization(joined, "meta-llama/Meta-Llama-3-8B-Instruct", "llama", "eos_token") == (
        "<|start_header_id|>user<|end_header_id|>\n\nInstruct: !@#$%^&*()a text<|eot_id|>")
    assert prepare_for_tokenization(joined, "meta-llama/Llama-2-7b-chat-hf", "llama", "eos_token") == (
        "[INST] Instruct: !@#$%^&*()a text [/INST] </s>")
    assert prepare_for_tokenization(joined, "Qwen/Qwen2-7B-Instruct", "qwen2", "mean") == (
        "<|im_start|>user\nInstruct: !@#$%^&*()a text<|im_end|>")
    assert split_separator("a !@#$%^&*()b !@#$%^&*() c") == ("a b  c", "b ")
    assert split_separator("no separator") == ("no separator", "")


def test_word_truncation_loop():
    from llm2vec_fast.encoder.text import truncate_by_words
    count = lambda texts: [len(t.replace(" ", "")) for t in texts]  # noqa: E731  one token per character
    texts, lengths = truncate_by_words(["aa bb cc dd ee", "short", "  x  "], count, 512, 6)
    # 10 > 6: int(5 * 6 / 10) = 3 words -> "aa bb cc" (6); untouched texts keep their spacing
    assert texts == ["aa bb cc", "short", "  x  "] and lengths == [6, 5, 1]
    texts, lengths = truncate_by_words(["abcdefghij"], count, 8, 7)  # capped at max_length 8 > 7: cut to 0 words
    assert texts == [""] and lengths == [0]


# ------------------------------------------------------------------------------------ round trips

def test_config_round_trip(checkpoints, tmp_path):
    from llm2vec_fast import LLM2Vec
    encoder = LLM2Vec.from_pretrained(checkpoints("mistral"), pooling_mode="weighted_mean", max_length=48,
                                      doc_max_length=20, skip_instruction=False)
    assert (encoder.pooling_mode, encoder.max_length, encoder.doc_max_length, encoder.skip_instruction) == (
        "weighted_mean", 48, 20, False)
    expected = encoder.encode(INPUTS, show_progress_bar=False)
    out = tmp_path / "saved"
    encoder.save(str(out))
    with open(out / "llm2vec_config.json") as f:
        assert json.load(f) == {"pooling_mode": "weighted_mean", "max_length": 48, "doc_max_length": 20,
                                "skip_instruction": False}
    with open(out / "config.json") as f:  # the template key survives transformers 5's save
        assert json.load(f)["_name_or_path"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert os.path.isfile(out / "model.safetensors")
    reloaded = LLM2Vec.from_pretrained(str(out))
    assert (reloaded.pooling_mode, reloaded.max_length, reloaded.doc_max_length, reloaded.skip_instruction) == (
        "weighted_mean", 48, 20, False)
    assert reloaded._name_or_path() == "mistralai/Mistral-7B-Instruct-v0.2"
    assert torch.allclose(reloaded.encode(INPUTS, show_progress_bar=False), expected, atol=SAME_ATOL, rtol=0)
    overridden = LLM2Vec.from_pretrained(str(out), pooling_mode="mean", skip_instruction=None)
    assert overridden.pooling_mode == "mean" and overridden.skip_instruction is False
    encoder.save(str(tmp_path / "no_config"), save_config=False)
    assert not os.path.exists(tmp_path / "no_config" / "llm2vec_config.json")
    assert LLM2Vec.from_pretrained(str(tmp_path / "no_config")).pooling_mode == "mean"  # llm2vec's defaults


def test_adapter_round_trip(adapters, tmp_path):
    """An unmerged second adapter: save merged (a full checkpoint) and unmerged (adapter files only)."""
    from peft import PeftModel

    from llm2vec_fast import LLM2Vec
    _, mntp, simcse = adapters
    encoder = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=simcse)
    assert isinstance(encoder.model, PeftModel)
    expected = encoder.encode(INPUTS, show_progress_bar=False)
    encoder.save(str(tmp_path / "unmerged"))
    assert os.path.isfile(tmp_path / "unmerged" / "adapter_model.safetensors")
    assert not os.path.exists(tmp_path / "unmerged" / "model.safetensors")
    encoder.save(str(tmp_path / "merged"), merge_before_save=True)
    assert not isinstance(encoder.model, PeftModel)
    assert os.path.isfile(tmp_path / "merged" / "model.safetensors")
    reloaded = LLM2Vec.from_pretrained(str(tmp_path / "merged"))
    assert reloaded.pooling_mode == mk.SIMCSE_LLM2VEC_CONFIG["pooling_mode"]
    assert torch.allclose(reloaded.encode(INPUTS, show_progress_bar=False), expected, atol=SAME_ATOL, rtol=0)


def test_pickled_weights_are_refused(checkpoints, adapters, tmp_path):
    from llm2vec_fast import LLM2Vec
    folder = tmp_path / "pickled"
    shutil.copytree(checkpoints("llama"), folder)
    from safetensors.torch import load_file
    torch.save(load_file(str(folder / "model.safetensors")), str(folder / "pytorch_model.bin"))
    os.remove(folder / "model.safetensors")
    with pytest.raises(Exception):
        LLM2Vec.from_pretrained(str(folder))
    with pytest.raises(ValueError, match="use_safetensors"):
        LLM2Vec.from_pretrained(checkpoints("llama"), use_safetensors=False)
    _, _, simcse = adapters
    adapter = tmp_path / "pickled_adapter"
    shutil.copytree(simcse, adapter)
    torch.save(load_file(str(adapter / "adapter_model.safetensors")), str(adapter / "adapter_model.bin"))
    os.remove(adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        LLM2Vec.from_pretrained(checkpoints("llama"), peft_model_name_or_path=str(adapter))


def test_a_causal_encoder_saved_loads_back_causal(checkpoints, tmp_path):
    """save records enable_bidirectional=False (only then: llm2vec 0.2.3's constructor would refuse the key), so
    the folder loads back causal with the same embeddings; an explicit argument still wins; a bad record is named."""
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.models import is_bidirectional
    causal = LLM2Vec.from_pretrained(checkpoints("llama_causal"), enable_bidirectional=False)
    expected = causal.encode(INPUTS[:6], show_progress_bar=False)
    causal.save(str(tmp_path / "causal"))
    with open(tmp_path / "causal" / "llm2vec_config.json") as f:
        assert json.load(f)["enable_bidirectional"] is False
    again = LLM2Vec.from_pretrained(str(tmp_path / "causal"))
    assert not is_bidirectional(again.model) and "enable_bidirectional" not in vars(again)
    assert torch.allclose(again.encode(INPUTS[:6], show_progress_bar=False), expected, atol=SAME_ATOL, rtol=0)
    assert is_bidirectional(LLM2Vec.from_pretrained(str(tmp_path / "causal"), enable_bidirectional=True).model)
    LLM2Vec.from_pretrained(checkpoints("llama_causal")).save(str(tmp_path / "bidirectional"))
    with open(tmp_path / "bidirectional" / "llm2vec_config.json") as f:
        assert "enable_bidirectional" not in json.load(f)
    with open(tmp_path / "causal" / "llm2vec_config.json", "w") as f:
        json.dump({"enable_bidirectional": "no"}, f)
    with pytest.raises(ValueError, match="'enable_bidirectional' must be true or false, got 'no'"):
        LLM2Vec.from_pretrained(str(tmp_path / "causal"))


@pytest.mark.parametrize("first", ["adapter", "weights"])
def test_saving_over_the_other_layout_removes_its_files(adapters, tmp_path, first):
    """An unmerged save then a merged one into the same folder (or the reverse): the earlier layout's files go,
    with a warning, so that the folder loads back as what was saved last (not an adapter merged twice, or old
    weights under a new adapter)."""
    from llm2vec_fast import LLM2Vec
    _, mntp, simcse = adapters
    encoder = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=simcse)
    expected = encoder.encode(INPUTS[:6], show_progress_bar=False)
    folder = str(tmp_path / "saved")
    saves = {"adapter": lambda: encoder.save(folder), "weights": lambda: encoder.save(folder, merged_copy=True)}
    second = "weights" if first == "adapter" else "adapter"
    saves[first]()
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("the user's own file")
    with pytest.warns(UserWarning, match="removed .* left by an earlier save"):
        saves[second]()
    names = set(os.listdir(folder))
    assert ("model.safetensors" in names) == (second == "weights")
    assert ("adapter_model.safetensors" in names) == (second == "adapter") == ("adapter_config.json" in names)
    assert "notes.txt" in names
    got = LLM2Vec.from_pretrained(folder).encode(INPUTS[:6], show_progress_bar=False) if second == "weights" else \
        LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=folder).encode(INPUTS[:6], show_progress_bar=False)
    assert torch.allclose(got, expected, atol=SAME_ATOL, rtol=0)


def test_none_for_dtype_or_attention_means_the_default(checkpoints, tmp_path):
    """llm2vec's run scripts pass torch_dtype=None and attn_implementation=None when unset: float32 (transformers
    4.44's default, not the checkpoint's bfloat16) and the packed attention, as when they are not given."""
    from llm2vec_fast import LLM2Vec
    folder = tmp_path / "bf16"
    shutil.copytree(checkpoints("llama"), folder)
    with open(folder / "config.json") as f:
        config = json.load(f)
    config["dtype"] = config["torch_dtype"] = "bfloat16"
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    for kwargs in ({"torch_dtype": None}, {"dtype": None}, {"torch_dtype": None, "attn_implementation": None}):
        encoder = LLM2Vec.from_pretrained(str(folder), **kwargs)
        assert next(encoder.model.parameters()).dtype == torch.float32, kwargs
        assert encoder._packable(), kwargs
    assert next(LLM2Vec.from_pretrained(str(folder), dtype="auto").model.parameters()).dtype == torch.bfloat16


def test_a_base_with_its_own_adapter_keeps_its_folder_as_name(adapters, tmp_path):
    """Full weights and an adapter in one folder load through a temporary view; the model still names the
    folder (peft records it as a new adapter's base), not the view."""
    from peft import LoraConfig, get_peft_model

    from llm2vec_fast import LLM2Vec
    base, mntp, _ = adapters
    both = str(tmp_path / "both")
    shutil.copytree(base, both)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(os.path.join(mntp, name), both)
    model = LLM2Vec.from_pretrained(both).model
    assert model.name_or_path == both
    assert get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).peft_config[
        "default"].base_model_name_or_path == both


def test_an_uncached_hub_adapter_offline_says_so(checkpoints, monkeypatch):
    from llm2vec_fast import LLM2Vec
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="no local folder, and the hub cache holds no adapter_config.json"):
        LLM2Vec.from_pretrained(checkpoints("llama"), peft_model_name_or_path="nobody-here/no-such-adapter-4f2a")


def test_causal_encoder_runs_packed(checkpoints, monkeypatch):
    """enable_bidirectional=False on a supported family: the packed causal path (the parity tests compare it with
    llm2vec), equal to the same model padded with sdpa, and the packed forward is what runs."""
    import llm2vec_fast.encoder.llm2vec as module
    from llm2vec_fast import LLM2Vec
    folder = checkpoints("llama_causal")
    packed = LLM2Vec.from_pretrained(folder, enable_bidirectional=False)
    padded = LLM2Vec.from_pretrained(folder, enable_bidirectional=False, attn_implementation="sdpa")
    assert packed._packable() and not padded._packable()
    calls = []
    original = module.forward_packed

    def spy(*args, **kwargs):
        calls.append(kwargs.get("causal"))
        return original(*args, **kwargs)
    monkeypatch.setattr(module, "forward_packed", spy)
    a = packed.encode(INPUTS, show_progress_bar=False)
    assert calls and set(calls) == {True}
    b = padded.encode(INPUTS, show_progress_bar=False)
    assert torch.allclose(a, b, atol=SAME_ATOL, rtol=0)
    bi = LLM2Vec.from_pretrained(folder).encode(INPUTS, show_progress_bar=False)
    assert float((bi - a).abs().max()) > 1e-3


def test_unsupported_family_needs_enable_bidirectional_false(tmp_path):
    from transformers import GPT2Config

    from llm2vec_fast import LLM2Vec
    with pytest.raises(ValueError, match="not supported yet with bidirectional models"):
        LLM2Vec._get_model_class(GPT2Config(), enable_bidirectional=True)


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3_text", "phi3"])
def test_families_beyond_llm2vec(tmp_path, family, checkpoints):
    """Qwen3, Gemma2, Gemma3 and Phi-3 (which llm2vec 0.2.3 cannot make bidirectional): packed == padded."""
    from transformers import Gemma2Config, Gemma3TextConfig, Phi3Config, Qwen3Config

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.models import BI_MODELS
    common = dict(vocab_size=704, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=64, bos_token_id=1, eos_token_id=2,
                  pad_token_id=2)
    if family == "qwen3":
        config = Qwen3Config(**common)
    elif family == "gemma2":
        config = Gemma2Config(query_pre_attn_scalar=64, attn_logit_softcapping=2.0, sliding_window=4096, **common)
    elif family == "phi3":  # every layer slides, here over 5 tokens
        config = Phi3Config(sliding_window=5, **{k: v for k, v in common.items() if k != "head_dim"})
    else:  # a window shorter than some inputs, on layer 0
        config = Gemma3TextConfig(query_pre_attn_scalar=64, sliding_window=5,
                                  layer_types=["sliding_attention", "full_attention"], **common)
    torch.manual_seed(0)
    folder = str(tmp_path / family)
    BI_MODELS[family](config).save_pretrained(folder)
    for name in CASE_FILES[1:]:  # the Llama-2 style tokenizer
        shutil.copy(os.path.join(FIXTURES, "llama", name), folder)
    packed = LLM2Vec.from_pretrained(folder, pooling_mode="eos_token")
    padded = LLM2Vec.from_pretrained(folder, pooling_mode="eos_token", attn_implementation="eager")
    assert packed.prepare_for_tokenization("!@#$%^&*()x") == "!@#$%^&*()x"  # no EOS text, as llm2vec
    a = packed.encode(INPUTS, show_progress_bar=False)
    b = padded.encode(INPUTS, show_progress_bar=False)
    assert torch.allclose(a, b, atol=SAME_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------ offline

OFFLINE_SCRIPT = textwrap.dedent("""
    import socket, sys

    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    import llm2vec_fast
    assert "transformers" not in sys.modules  # the package import stays light
    encoder = llm2vec_fast.LLM2Vec.from_pretrained(sys.argv[1], peft_model_name_or_path=sys.argv[2])
    emb = encoder.encode(["offline", ["an instruction", "a text"]], show_progress_bar=False)
    assert emb.shape == (2, 128), emb.shape
    print("ok")
""")


def test_loading_never_touches_the_network(adapters):
    _, mntp, simcse = adapters
    path = os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=path)
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, mntp, simcse], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_loading_in_process_opens_no_socket(checkpoints, monkeypatch):
    from llm2vec_fast import LLM2Vec

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    encoder = LLM2Vec.from_pretrained(checkpoints("gemma"))
    assert encoder.encode("offline", show_progress_bar=False).shape == (1, 128)


# -------------------------------------------------------------------- files -> resumable shards

def write_jsonl(path, items) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            row = {"text": item} if isinstance(item, str) else {"instruction": item[0], "text": item[1]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def test_encode_file_writes_shards_in_input_order(encoders, tmp_path):
    from llm2vec_fast.encoder.files import encode_file, iter_embeddings, load_embeddings
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    items = INPUTS + INPUTS[::-1]
    source = str(tmp_path / "input.jsonl")
    write_jsonl(source, items)
    out = str(tmp_path / "out")
    index = encode_file(encoder, source, out, shard_size=10, log=lambda message: None)
    assert [s["rows"] for s in index["shards"]] == [10, 10, 10, 2] and index["rows"] == 32 and index["complete"]
    expected = encoder.encode(items, show_progress_bar=False)
    assert np.allclose(load_embeddings(out), expected.numpy(), atol=SAME_ATOL, rtol=0)
    streamed = list(iter_embeddings(out))
    assert [start for start, _ in streamed] == [0, 10, 20, 30]
    assert all(isinstance(array, np.memmap) for _, array in streamed)
    assert np.array_equal(np.concatenate([array for _, array in streamed]), load_embeddings(out, mmap=True))
    stamps = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out) if name.endswith(".npy")}
    messages = []
    encode_file(encoder, source, out, shard_size=10, log=messages.append)  # finished: nothing recomputed
    assert messages == ["done: 32 rows in 4 shards (0 encoded now, 4 from before)"]
    assert stamps == {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out) if n.endswith(".npy")}
    with pytest.raises(ValueError, match="other settings"):
        encode_file(encoder, source, out, shard_size=8, log=lambda message: None)
    texts = [t for t in INPUTS if isinstance(t, str) and "\n" not in t]
    with open(tmp_path / "input.txt", "w", encoding="utf-8") as f:
        f.write("\n".join(texts) + "\n")
    encode_file(encoder, str(tmp_path / "input.txt"), str(tmp_path / "txt"), shard_size=5, output_dtype="float16",
                log=lambda message: None)
    half = load_embeddings(str(tmp_path / "txt"))
    assert half.dtype == np.float16 and half.shape == (len(texts), 128)
    assert np.allclose(half.astype(np.float32), encoder.encode(texts, show_progress_bar=False).numpy(), atol=1e-2)


def test_encode_file_instruction_for_rows_without_one(encoders, tmp_path):
    from llm2vec_fast.encoder.files import encode_file, load_embeddings
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    query = "Given a web search query, retrieve relevant passages that answer the query:"
    items = ["what is the tide", ["Own instruction:", "moon and ocean"], "a sailor's guitar"]
    source = str(tmp_path / "queries.jsonl")
    write_jsonl(source, items)
    out = str(tmp_path / "out")
    encode_file(encoder, source, out, instruction=query, log=lambda message: None)
    expected = encoder.encode([[query, items[0]], items[1], [query, items[2]]], show_progress_bar=False)
    assert np.allclose(load_embeddings(out), expected.numpy(), atol=SAME_ATOL, rtol=0)
    plain = encoder.encode(items, show_progress_bar=False)
    assert not np.allclose(load_embeddings(out)[0], plain[0].numpy(), atol=1e-3)  # the instruction mattered
    with pytest.raises(ValueError, match="other settings"):  # resuming with another instruction is refused
        encode_file(encoder, source, out, instruction="Other:", log=lambda message: None)
    with pytest.raises(TypeError, match="instruction must be a str"):
        encode_file(encoder, source, str(tmp_path / "out2"), instruction=None, log=lambda message: None)


def test_encode_cli_causal(checkpoints, tmp_path, capsys):
    """``llm2vec-fast encode --causal``: llm2vec's enable_bidirectional=False, recorded in the index, so that a
    resume without it (a bidirectional model) is refused."""
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.encoder import files
    items = INPUTS[:6]
    source = str(tmp_path / "input.jsonl")
    write_jsonl(source, items)
    out = str(tmp_path / "out")
    args = ["--model", checkpoints("llama_causal"), "--input", source, "--output", out, "--dtype", "float32",
            "--device", "cpu", "--pooling-mode", "last_token"]
    assert files.main(args + ["--causal"]) == 0
    with open(os.path.join(out, files.INDEX)) as f:
        assert json.load(f)["settings"]["bidirectional"] is False
    encoder = LLM2Vec.from_pretrained(checkpoints("llama_causal"), enable_bidirectional=False,
                                      pooling_mode="last_token")
    assert np.allclose(files.load_embeddings(out), encoder.encode(items, show_progress_bar=False).numpy(),
                       atol=SAME_ATOL, rtol=0)
    capsys.readouterr()
    assert files.main(args) == 1  # the message alone, no traceback, naming what differs
    last_line = capsys.readouterr().err.splitlines()[-1]  # after the weights' loading bar
    assert re.fullmatch(r"llm2vec-fast encode: error: .* holds a run with another input or other settings; .*"
                        r"\(bidirectional: False there, True now\)", last_line)
    respelled = [checkpoints("llama_causal") + "/" if a == checkpoints("llama_causal") else a for a in args]
    assert files.main(respelled + ["--causal"]) == 0  # the same folder spelled another way resumes the run
    assert capsys.readouterr().out.strip().endswith("(0 encoded now, 1 from before)")


def test_encode_cli_full_disk_is_one_line_and_resumes(checkpoints, tmp_path, capsys, monkeypatch):
    """A write that fails (a full disk) ends the run with status 1 and the OS's message alone; the shards written
    before it stay recorded, and the run resumes from there to the same rows."""
    from llm2vec_fast.encoder import files
    source, out = str(tmp_path / "input.jsonl"), str(tmp_path / "out")
    write_jsonl(source, INPUTS[:5])
    args = ["--model", checkpoints("llama_causal"), "--input", source, "--output", out, "--dtype", "float32",
            "--device", "cpu", "--shard-size", "2"]
    real_save, saves = np.save, []

    def full_disk_on_the_second_shard(f, array, *rest, **kwargs):
        saves.append(len(array))
        if len(saves) == 2:
            raise OSError(28, "No space left on device", f.name)
        return real_save(f, array, *rest, **kwargs)

    monkeypatch.setattr(np, "save", full_disk_on_the_second_shard)
    capsys.readouterr()
    assert files.main(args) == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith("llm2vec-fast encode: error: [Errno 28] No space left")
    with open(os.path.join(out, files.INDEX)) as f:
        index = json.load(f)
    assert [shard["start"] for shard in index["shards"]] == [0] and not index["complete"]
    monkeypatch.setattr(np, "save", real_save)
    assert files.main(args) == 0
    assert capsys.readouterr().out.strip().endswith("(2 encoded now, 1 from before)")
    assert files.load_embeddings(out).shape[0] == 5


def test_encode_file_truncate_dim(encoders, tmp_path):
    """truncate_dim keeps the first dimensions, normalised after the cut; recorded, so a resume with another
    value is refused; out of range is refused before anything is written."""
    from llm2vec_fast.encoder import files
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    items = INPUTS[:6]
    source = str(tmp_path / "input.jsonl")
    write_jsonl(source, items)
    out = str(tmp_path / "out")
    files.encode_file(encoder, source, out, truncate_dim=48, normalize_embeddings=True, log=lambda message: None)
    got = files.load_embeddings(out)
    full = encoder.encode(items, show_progress_bar=False)[:, :48]
    want = torch.nn.functional.normalize(full, dim=1).numpy()
    assert got.shape == (6, 48) and np.allclose(got, want, atol=SAME_ATOL, rtol=0)
    with pytest.raises(ValueError, match="other settings"):
        files.encode_file(encoder, source, out, truncate_dim=32, normalize_embeddings=True, log=lambda message: None)
    for bad in (0, 129, 2.5):
        with pytest.raises(ValueError, match=r"truncate_dim must be an int in \[1, 128\]"):
            files.encode_file(encoder, source, str(tmp_path / "bad"), truncate_dim=bad, log=lambda message: None)
    assert not os.path.exists(tmp_path / "bad")


def test_encode_file_bad_records(encoders, tmp_path):
    from llm2vec_fast.encoder.files import encode_file
    encoder = encoders("llama")
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "fine"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text' must be a string"):
        encode_file(encoder, str(source), str(tmp_path / "out"), shard_size=1, log=lambda message: None)
    source.write_text('{"text": "fine"}\n{"txt": "typo"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no field 'text' \(fields: \['txt'\]\)"):
        encode_file(encoder, str(source), str(tmp_path / "out3"), shard_size=1, log=lambda message: None)
    source.write_text('{"text": "fine"}\n\n{"text": "broken \\ud83d"}\n', encoding="utf-8")  # valid JSON
    with pytest.raises(ValueError, match=r"bad.jsonl:3: field 'text' is not valid Unicode text"):
        encode_file(encoder, str(source), str(tmp_path / "out4"), shard_size=1, log=lambda message: None)
    (tmp_path / "x.csv").write_text("a\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown input format"):
        encode_file(encoder, str(tmp_path / "x.csv"), str(tmp_path / "out2"), log=lambda message: None)
    assert not os.path.exists(tmp_path / "out2")


def _encode_until(encoder, monkeypatch, shards: int, *args, **kwargs) -> None:
    """encode_file stopped (as if killed) when it starts encoding shard number ``shards``."""
    from llm2vec_fast.encoder.files import encode_file

    class Killed(Exception):
        pass
    calls = []
    original = type(encoder).encode

    def encode(self, *a, **k):
        calls.append(1)
        if len(calls) > shards:
            raise Killed
        return original(self, *a, **k)
    with monkeypatch.context() as patch:
        patch.setattr(type(encoder), "encode", encode)
        with pytest.raises(Killed):
            encode_file(encoder, *args, log=lambda message: None, **kwargs)


def test_encode_file_refuses_a_resume_whose_recorded_rows_changed(encoders, tmp_path, monkeypatch):
    """An input edited past its first MiB (same size) between a run and its resume: input_identity cannot see
    it (simulated here by keeping the recorded identity); the shards' digests refuse instead of mixing rows
    of the old input into the new run's output. Rows not encoded yet may change: they are encoded as read."""
    from llm2vec_fast.encoder import files
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    texts = [f"row {i} of the corpus" for i in range(6)]
    source, out = tmp_path / "input.txt", str(tmp_path / "out")
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    _encode_until(encoder, monkeypatch, 2, str(source), out, shard_size=2)  # shards 0 and 1 are recorded
    identity = files.input_identity(str(source))
    monkeypatch.setattr(files, "input_identity", lambda path: dict(identity, path=os.path.abspath(path)))
    texts[5] = "row 5 of the CORPUS"  # not encoded yet: fine
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    files.encode_file(encoder, str(source), out, shard_size=2, log=lambda message: None)
    assert np.allclose(files.load_embeddings(out), encoder.encode(texts, show_progress_bar=False).numpy(),
                       atol=SAME_ATOL, rtol=0)
    texts[3] = "row 3 of the CORPUS"  # in shard 1, encoded from the old text
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"input.txt: rows 2..3 differ from those .*shard-000001.npy holds \(the "
                                         r"input changed since that run\); use a new output folder"):
        files.encode_file(encoder, str(source), out, shard_size=2, log=lambda message: None)


def test_a_finished_run_being_repaired_is_not_complete_until_it_ends(encoders, tmp_path, monkeypatch):
    """A finished run whose shards 0 and 2 were damaged, run again and stopped after shard 0: index.json must
    not claim a complete run (load_embeddings returned 3 of the 9 rows missing, silently); an index that
    claims one anyway with a gap is refused."""
    from llm2vec_fast.encoder import files
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    source, out = tmp_path / "input.txt", str(tmp_path / "out")
    source.write_text("".join(f"text {i}\n" for i in range(9)), encoding="utf-8")
    files.encode_file(encoder, str(source), out, shard_size=3, log=lambda message: None)
    expected = files.load_embeddings(out)
    for name in ("shard-000000.npy", "shard-000002.npy"):
        path = os.path.join(out, name)
        with open(path, "r+b") as f:
            f.truncate(100)
    _encode_until(encoder, monkeypatch, 1, str(source), out, shard_size=3)
    with pytest.raises(ValueError, match="the run is not complete"):
        files.load_embeddings(out)
    files.encode_file(encoder, str(source), out, shard_size=3, log=lambda message: None)
    assert np.allclose(files.load_embeddings(out), expected, atol=SAME_ATOL, rtol=0)
    with open(os.path.join(out, files.INDEX)) as f:
        index = json.load(f)
    del index["shards"][1]
    with open(os.path.join(out, files.INDEX), "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match=r"out: rows 3..5 have no shard in index.json"):
        files.load_embeddings(out)


def test_encode_file_leaves_other_files_in_the_output_folder(encoders, tmp_path):
    """The clean-up at the end removes the run's own leftovers only: it deleted every *.tmp and progress-rank*
    file of the folder, the user's included."""
    from llm2vec_fast.encoder import files
    encoder = encoders("llama")
    source, out = tmp_path / "input.txt", tmp_path / "out"
    source.write_text("a\nb\n", encoding="utf-8")
    out.mkdir()
    theirs = ["notes.tmp", "progress-rank-notes.json", "README"]
    ours = ["shard-000007.npy.tmp", "progress-rank1.json", "progress-rank1.json.tmp", "index.json.tmp"]
    for name in theirs + ours:
        (out / name).write_text("{}", encoding="utf-8")
    files.encode_file(encoder, str(source), str(out), shard_size=1, log=lambda message: None)
    assert sorted(os.listdir(out)) == sorted(theirs + ["index.json", "shard-000000.npy", "shard-000001.npy"])


def test_encode_file_refuses_an_unrelated_index_or_parquet_file(encoders, tmp_path):
    """An index.json that is not a run's and a .parquet that is not Parquet: ValueErrors naming the file (an
    AttributeError or KeyError, and pyarrow's message without the path, before)."""
    from llm2vec_fast.encoder import files
    encoder = encoders("llama")
    source = tmp_path / "input.txt"
    source.write_text("a\n", encoding="utf-8")
    for number, content in enumerate(("[1, 2]", "", '{"format": "other"}')):
        out = tmp_path / f"out{number}"
        out.mkdir()
        (out / "index.json").write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=f"out{number}.index.json is not an llm2vec_fast shard index"):
            files.encode_file(encoder, str(source), str(out), log=lambda message: None)
    pytest.importorskip("pyarrow")
    (tmp_path / "rows.parquet").write_text("text\na\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"rows.parquet: not a Parquet file \("):
        list(files.read_records(str(tmp_path / "rows.parquet")))


NO_FOLDER = r"must be a checkpoint folder or a hub id \(org/name\), got "


def test_encode_cli_refuses_bad_options_before_loading_or_writing(checkpoints, tmp_path, capsys, monkeypatch):
    """Each refusal is one line and exit status 2 (as argparse's), before the model loads (its loader is never
    called) and before the output folder is made."""
    from llm2vec_fast.encoder import files
    monkeypatch.setattr(files, "load_encoder", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    good = tmp_path / "in.txt"
    good.write_text("a\n", encoding="utf-8")
    (tmp_path / "in.csv").write_text("a\n", encoding="utf-8")
    (tmp_path / "a_file").write_text("", encoding="utf-8")
    base = dict(model=checkpoints("llama"), input=str(good), output=str(tmp_path / "out"))
    cases = [(dict(input=str(tmp_path / "missing.txt")), "--input must be a file, got '.*missing.txt': no such file"),
             (dict(input=str(tmp_path)), "--input must be a file, got .*: a folder"),
             (dict(input=str(tmp_path / "in.csv")), r".*in.csv: unknown input format \(expected .txt, .jsonl or "
                                                    r".parquet\)"),
             (dict(output=str(tmp_path / "a_file")), "--output must be a folder, got .*a_file': a file"),
             (dict(output=str(tmp_path / "a_file" / "out")),
              "--output must be a folder, got .*out': .*a_file is a file"),
             (dict(model=str(tmp_path / "no_such_model")), f"--model {NO_FOLDER}'.*no_such_model': no such folder"),
             (dict(model="./relative/missing"), f"--model {NO_FOLDER}'./relative/missing': no such folder"),
             (dict(extra=["--peft", "/no/adapter"]), f"--peft {NO_FOLDER}'/no/adapter': no such folder"),
             (dict(extra=["--batch-size", "0"]), "--batch-size must be a positive int, got 0"),
             (dict(extra=["--shard-size", "0"]), "--shard-size must be a positive int, got 0"),
             (dict(extra=["--max-tokens-per-batch", "-1"]), "--max-tokens-per-batch must be a positive int, got -1"),
             (dict(extra=["--doc-max-length", "-1"]), "--doc-max-length must be an int >= 0, got -1"),
             (dict(extra=["--max-length", "0"]), "--max-length must be an int >= 1, got 0")]
    for change, message in cases:
        args = dict(base, **change)
        argv = ["--model", args["model"], "--input", args["input"], "--output", args["output"]] + args.get("extra", [])
        assert files.main(argv) == 2, change
        err = capsys.readouterr().err
        assert re.fullmatch(f"llm2vec-fast encode: error: {message}\n", err), (change, err)
        assert not os.path.exists(tmp_path / "out"), change


def test_text_and_jsonl_lines_end_at_newlines_only_and_lose_a_byte_order_mark(tmp_path):
    """Lines end at "\n" (or "\r\n"): a stray "\r" inside a line stays there (universal newlines made it two
    rows, shifting every later row); a UTF-8 byte-order mark (Windows editors) is no part of row 0's text."""
    from llm2vec_fast.encoder.files import read_records
    text = tmp_path / "rows.txt"
    text.write_bytes(b"\xef\xbb\xbfhello world\r\nstray \r inside\nlast line without newline")
    assert list(read_records(str(text))) == [("", "hello world"), ("", "stray \r inside"),
                                             ("", "last line without newline")]
    lines = tmp_path / "rows.jsonl"
    lines.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"instruction": "i", "text": "b"}\n')
    assert list(read_records(str(lines))) == [("", "a"), ("i", "b")]


KILLABLE_SCRIPT = textwrap.dedent("""
    import sys, time
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.encoder import files

    original = LLM2Vec.encode

    def slow(self, *args, **kwargs):  # room to kill the run between shards
        time.sleep(0.5)
        return original(self, *args, **kwargs)

    LLM2Vec.encode = slow
    sys.exit(files.main(sys.argv[1:]))
""")


def test_encode_file_resumes_after_being_killed(checkpoints, tmp_path):
    """Kill the CLI midway (SIGKILL), start it again: finished shards are kept as they were, the rest is
    encoded, every row is there once, in order."""
    import signal
    import time

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.encoder import files
    items = (INPUTS * 3)[:40]
    source = str(tmp_path / "input.jsonl")
    write_jsonl(source, items)
    out = str(tmp_path / "out")
    args = ["--model", checkpoints("llama"), "--input", source, "--output", out, "--shard-size", "4",
            "--dtype", "float32", "--max-length", "64", "--doc-max-length", "24", "--device", "cpu"]
    path = os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    process = subprocess.Popen([sys.executable, "-c", KILLABLE_SCRIPT] + args, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1"))
    index_path = os.path.join(out, files.INDEX)
    deadline = time.monotonic() + 240
    recorded = []
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if os.path.exists(index_path):
                with open(index_path) as f:
                    recorded = json.load(f)["shards"]
                if len(recorded) >= 2:
                    break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read().decode()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    with open(index_path) as f:
        index = json.load(f)
    assert not index["complete"] and 2 <= len(index["shards"]) < 10
    before = {s["file"]: os.stat(os.path.join(out, s["file"])) for s in index["shards"]}
    assert files.main(args) == 0
    with open(index_path) as f:
        index = json.load(f)
    assert index["complete"] and index["rows"] == len(items)
    assert [s["start"] for s in index["shards"]] == list(range(0, 40, 4))
    for name, stat in before.items():  # not recomputed
        now = os.stat(os.path.join(out, name))
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    encoder = LLM2Vec.from_pretrained(checkpoints("llama"), max_length=64, doc_max_length=24)
    expected = encoder.encode(items, show_progress_bar=False).numpy()
    assert np.allclose(files.load_embeddings(out), expected, atol=SAME_ATOL, rtol=0)


# ------------------------------------------------------------------------------ sentence-transformers

def test_sentence_transformers_adapter(encoders):
    """What the adapter supports (see llm2vec_fast/encoder/st_adapter.py): a real SentenceTransformer whose
    encode is LLM2Vec.encode, prompts as llm2vec instructions."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from llm2vec_fast.encoder.st_adapter import to_sentence_transformer
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    instruction = "Given a web search query, retrieve relevant passages that answer the query:"
    model = to_sentence_transformer(encoder, prompts={"query": instruction, "document": ""})
    assert isinstance(model, sentence_transformers.SentenceTransformer)
    texts = [t for t in INPUTS if isinstance(t, str)][:5]
    expected = encoder.encode(texts, show_progress_bar=False)
    got = model.encode(texts)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and np.allclose(got, expected.numpy(), atol=1e-6)
    assert np.allclose(model.encode_document(texts), expected.numpy(), atol=1e-6)
    query = model.encode_query(["how do tides work"], convert_to_tensor=True)
    assert torch.allclose(query, encoder.encode([[instruction, "how do tides work"]], show_progress_bar=False),
                          atol=1e-6)
    assert model.encode(texts[0], convert_to_tensor=True).shape == (128,)
    normalized = model.encode(texts, normalize_embeddings=True, truncate_dim=64, convert_to_tensor=True)
    assert normalized.shape == (5, 64) and torch.allclose(normalized.norm(dim=1), torch.ones(5), atol=1e-5)
    scores = model.similarity(got, got)
    assert scores.shape == (5, 5) and torch.allclose(scores.diagonal(), torch.ones(5), atol=1e-5)
    features = model[0].tokenize(texts[:2])
    with torch.no_grad():
        out = model[0](features)["sentence_embedding"]
    assert torch.allclose(out, expected[:2], atol=SAME_ATOL)
    # Token embeddings (a list of tensors, as sentence-transformers gives), prompts applied; None: dicts.
    tokens = model.encode(texts, output_value="token_embeddings", prompt_name="query")
    want = encoder.encode_tokens([[instruction, t] for t in texts])
    assert isinstance(tokens, list) and len(tokens) == 5
    assert all(torch.equal(a, b) for a, b in zip(tokens, want))
    assert torch.equal(model.encode(texts[0], output_value="token_embeddings"), encoder.encode_tokens(texts[:1])[0])
    dicts = model.encode(texts, output_value=None)
    assert torch.allclose(torch.stack([d["sentence_embedding"] for d in dicts]), expected, atol=SAME_ATOL)
    dicts = model.encode(texts, output_value=None, truncate_dim=40)  # cut as sentence-transformers cuts it
    assert torch.allclose(torch.stack([d["sentence_embedding"] for d in dicts]), expected[:, :40], atol=SAME_ATOL)
    assert all(d["token_embeddings"].shape[1] == 128 for d in dicts)
    with pytest.raises(ValueError, match="output_value must be .*got 'hidden'"):
        model.encode(texts, output_value="hidden")
    with pytest.raises(ValueError, match="runs in this process only"):
        model.encode(texts, output_value="token_embeddings", device=["cpu", "cpu"])
    # Quantised precisions: sentence-transformers' own quantiser on our float32 embeddings.
    for precision, dtype, width in (("int8", np.int8, 128), ("uint8", np.uint8, 128), ("binary", np.int8, 16),
                                    ("ubinary", np.uint8, 16)):
        quantised = model.encode(texts, precision=precision)
        want = sentence_transformers.quantize_embeddings(expected.numpy(), precision=precision)
        assert quantised.dtype == dtype and quantised.shape == (5, width), precision
        assert np.array_equal(quantised, want), precision
        assert len(np.unique(quantised)) > 2, precision  # not a constant array
    with pytest.raises(ValueError, match=r"precision must be one of .*got 'int4'"):
        model.encode(texts, precision="int4")
    with pytest.raises(ValueError, match="truncate_dim must be a positive int, got 0"):
        model.encode(texts, truncate_dim=0)
    # A model-wide truncate_dim (Matryoshka-style), overridden per call.
    short = to_sentence_transformer(encoder, truncate_dim=32)
    assert np.allclose(short.encode(texts), expected.numpy()[:, :32], atol=1e-6)
    assert short.encode(texts, truncate_dim=48).shape == (5, 48)


def test_sentence_transformers_save_and_load(checkpoints, adapters, tmp_path):
    """model.save writes sentence-transformers' folder with LLM2Vec.save's files at its root; it loads back as
    the adapter (load_sentence_transformer: prompts, similarity, truncate_dim kept), as a plain
    SentenceTransformer (trust_remote_code=True: its own batching over the module's preprocess/forward) and
    as an LLM2Vec, each giving the same embeddings; an adapter checkpoint (peft, unmerged) too."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.encoder.st_adapter import LLM2VecModule, load_sentence_transformer, to_sentence_transformer
    instruction = "Given a web search query, retrieve relevant passages that answer the query:"
    texts = [t for t in INPUTS if isinstance(t, str)][:6]
    encoder = LLM2Vec.from_pretrained(checkpoints("mistral"), pooling_mode="weighted_mean", max_length=48,
                                      doc_max_length=20)
    model = to_sentence_transformer(encoder, prompts={"query": instruction, "document": ""},
                                    similarity_fn_name="dot", truncate_dim=96)
    queries = model.encode_query(texts, convert_to_tensor=True)
    documents = model.encode_document(texts, convert_to_tensor=True)
    assert queries.shape == (6, 96) and not torch.allclose(queries, documents, atol=1e-3)  # the prompt counts
    out = str(tmp_path / "st")
    st_version = tuple(int(x) for x in sentence_transformers.__version__.split(".")[:2])
    if st_version < (5, 4):
        with pytest.raises(ImportError, match="needs sentence-transformers>=5.4"):
            model.save(out)
        return
    model.save(out)
    assert sorted(f for f in os.listdir(out) if f.endswith((".bin", ".pt", ".pkl"))) == []  # safetensors only
    with open(os.path.join(out, "modules.json")) as f:
        assert [m["type"] for m in json.load(f)] == ["llm2vec_fast.encoder.st_adapter.LLM2VecModule"]

    again = load_sentence_transformer(out)
    assert again.prompts["query"] == instruction and again.similarity_fn_name == "dot" and again.truncate_dim == 96
    assert again[0].encoder.pooling_mode == "weighted_mean" and again[0].encoder.max_length == 48
    assert torch.allclose(again.encode_query(texts, convert_to_tensor=True), queries, atol=SAME_ATOL)
    assert torch.allclose(again.encode_document(texts, convert_to_tensor=True), documents, atol=SAME_ATOL)
    assert load_sentence_transformer(out, truncate_dim=32).encode(texts).shape == (6, 32)
    tuned = load_sentence_transformer(out, dtype=torch.bfloat16, max_length=33)[0].encoder  # from_pretrained's kwargs
    assert next(tuned.parameters()).dtype == torch.bfloat16 and tuned.max_length == 33
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got int"):
        load_sentence_transformer(3)

    if st_version >= (6, 0):  # 5 imports local module classes unasked
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            sentence_transformers.SentenceTransformer(out)
    plain = sentence_transformers.SentenceTransformer(out, trust_remote_code=True)
    assert type(plain) is sentence_transformers.SentenceTransformer and plain.truncate_dim == 96
    got = plain.encode(texts, prompt_name="query", batch_size=4, convert_to_tensor=True)  # the prompt: instruction
    assert torch.allclose(got, queries, atol=SAME_ATOL)
    # sentence-transformers < 5.4 glue the prompt to each text and mark the features with its length: refused.
    glued = plain[0].tokenize([instruction + t for t in texts[:2]])
    with pytest.raises(ValueError, match="prepended the prompt"):
        plain[0]({**glued, "prompt_length": 9})
    assert torch.allclose(plain.encode(texts, batch_size=3, convert_to_tensor=True), documents, atol=SAME_ATOL)

    reloaded = LLM2Vec.from_pretrained(out)
    assert torch.allclose(reloaded.encode([[instruction, t] for t in texts], show_progress_bar=False)[:, :96],
                          queries, atol=SAME_ATOL)
    with pytest.raises(ValueError, match="safe_serialization must be True"):
        model.save(str(tmp_path / "pickle"), safe_serialization=False)

    # An encoder holding an unmerged adapter (llm2vec's MNTP + supervised layout) is saved merged, as
    # merge_and_unload would give it, bit for bit; the encoder keeps its adapter.
    from peft import PeftModel
    from safetensors.torch import load_file
    _, mntp, simcse = adapters
    peft_encoder = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=simcse)
    expected = peft_encoder.encode(texts, show_progress_bar=False)
    to_sentence_transformer(peft_encoder).save(str(tmp_path / "peft"))
    assert isinstance(peft_encoder.model, PeftModel) and not any(
        getattr(m, "merged", False) for m in peft_encoder.model.modules())
    assert not os.path.exists(tmp_path / "peft" / "adapter_config.json")
    saved = load_file(str(tmp_path / "peft" / "model.safetensors"))
    want = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=simcse, merge_peft=True).model.state_dict()
    assert sorted(saved) == sorted(want) and all(torch.equal(saved[k], want[k]) for k in want)
    assert torch.allclose(load_sentence_transformer(str(tmp_path / "peft")).encode(texts, convert_to_tensor=True),
                          expected, atol=SAME_ATOL)
    assert torch.allclose(peft_encoder.encode(texts, show_progress_bar=False), expected, atol=0)
    module = LLM2VecModule.load(str(tmp_path), subfolder="peft", model_kwargs={"max_length": 24})
    assert module.encoder.max_length == 24
    # An adapter that is not plain LoRA is refused by name, before anything is written.
    from peft import LoraConfig, get_peft_model
    dora = LLM2Vec.from_pretrained(checkpoints("llama"))
    dora.model = get_peft_model(dora.model, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match=r"plain LoRA on linear layers; layers\.0\.self_attn\.q_proj has adapter "
                                         r"'default' with DoRA"):
        to_sentence_transformer(dora).save(str(tmp_path / "dora"))
    assert not os.path.exists(tmp_path / "dora" / "model.safetensors")


def test_sentence_transformers_training(checkpoints, adapters, tmp_path):
    """sentence-transformers' losses and trainer train the adapter through the module's forward (packed,
    differentiable), prompts as llm2vec instructions: MultipleNegativesRankingLoss's gradient equals
    contrastive_loss's on LLM2Vec.forward, and a SentenceTransformerTrainer run updates the weights."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    if tuple(int(x) for x in sentence_transformers.__version__.split(".")[:2]) < (5, 4):
        pytest.skip("prompts reach the module (as instructions) from sentence-transformers 5.4")
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    import llm2vec_fast as lf
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.encoder.st_adapter import to_sentence_transformer
    encoder = LLM2Vec.from_pretrained(checkpoints("mistral"), max_length=48)
    model = to_sentence_transformer(encoder, prompts={"query": "Retrieve the passage"})
    queries = ["how do tides work", "what is a lognormal law", "why is the sky blue", "who wrote Hamlet"]
    passages = ["The moon pulls the sea.", "Its logarithm is normal.", "Rayleigh scattering of light.",
                "A play by Shakespeare."]
    params = [p for p in encoder.parameters() if p.requires_grad]

    def gradient(loss):
        encoder.zero_grad()
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in params]), loss.detach()

    features = [model.preprocess(queries, prompt="Retrieve the passage"), model.preprocess(passages)]
    theirs, their_loss = gradient(MultipleNegativesRankingLoss(model)(features, None))
    q = encoder.forward(encoder.tokenize([encoder.prepare_for_tokenization(encoder._convert_to_str(
        "Retrieve the passage", t)) for t in queries]))
    d = encoder.forward(encoder.tokenize([encoder.prepare_for_tokenization(encoder._convert_to_str("", t))
                                          for t in passages]))
    ours, our_loss = gradient(lf.contrastive_loss(q, d, scale=20.0))
    assert torch.allclose(their_loss, our_loss, atol=1e-5) and our_loss > 0.01
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=1e-4) and ours.abs().max() > 1e-3

    data = Dataset.from_dict({"anchor": queries * 2, "positive": passages * 2})
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                                num_train_epochs=1, learning_rate=1e-3, report_to=[],
                                                save_strategy="no", use_cpu=True,
                                                prompts={"anchor": "Retrieve the passage"})
    before = model.encode_query(queries, convert_to_tensor=True)
    result = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                        loss=MultipleNegativesRankingLoss(model)).train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
    assert not torch.allclose(model.encode_query(queries, convert_to_tensor=True), before, atol=1e-3)

    # A peft encoder (llm2vec's MNTP base + an unmerged adapter): the trainer moves the adapter only.
    _, mntp, simcse = adapters
    peft_encoder = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=simcse, max_length=48)
    for name, param in peft_encoder.model.named_parameters():
        param.requires_grad_("lora_" in name)  # as a LoRA training sets it (from_pretrained loads for inference)
    start = {name: p.detach().clone() for name, p in peft_encoder.model.named_parameters()}
    peft_model = to_sentence_transformer(peft_encoder)
    SentenceTransformerTrainer(model=peft_model, args=args, train_dataset=data,
                               loss=MultipleNegativesRankingLoss(peft_model)).train()
    moved = {name for name, p in peft_encoder.model.named_parameters() if not torch.equal(p, start[name])}
    assert moved and all("lora_" in name for name in moved)


def test_export_cli(adapters, tmp_path, capsys):
    """llm2vec-fast export: MNTP base + a second adapter written as one merged folder that loads alone, in
    llm2vec's layout or sentence-transformers'; bad options refused before anything loads or is written."""
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.cli import main
    _, mntp, simcse = adapters
    texts = [t for t in INPUTS if isinstance(t, str)][:5]
    source = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=simcse, pooling_mode="weighted_mean")
    instruction = "Retrieve passages that answer the question"
    base_args = ["export", "--model", mntp, "--peft", simcse, "--dtype", "float32", "--pooling-mode", "weighted_mean"]

    out = str(tmp_path / "plain")
    assert main(base_args + ["--output", out]) == 0
    assert "exported" in capsys.readouterr().out
    assert "model.safetensors" in os.listdir(out) and "adapter_config.json" not in os.listdir(out)
    exported = LLM2Vec.from_pretrained(out)
    assert exported.pooling_mode == "weighted_mean" and exported.max_length == source.max_length
    assert torch.allclose(exported.encode(texts, show_progress_bar=False),
                          source.encode(texts, show_progress_bar=False), atol=SAME_ATOL)

    sentence_transformers = pytest.importorskip("sentence_transformers")
    if tuple(int(x) for x in sentence_transformers.__version__.split(".")[:2]) >= (5, 4):
        st_out = str(tmp_path / "st")
        assert main(base_args + ["--output", st_out, "--format", "sentence-transformers", "--prompt",
                                 f"query={instruction}", "--prompt", "document=", "--similarity-fn", "dot"]) == 0
        from llm2vec_fast.encoder.st_adapter import load_sentence_transformer
        model = load_sentence_transformer(st_out)
        assert model.prompts == {"query": instruction, "document": ""} and model.similarity_fn_name == "dot"
        assert torch.allclose(model.encode_query(texts, convert_to_tensor=True),
                              source.encode([[instruction, t] for t in texts], show_progress_bar=False),
                              atol=SAME_ATOL)

    # Refusals: exit status 2, the reason on stderr, nothing written or overwritten.
    with open(os.path.join(str(tmp_path), "keep.txt"), "w") as f:
        f.write("user data")
    refusals = [
        (["--output", str(tmp_path)], "--output must be a new or empty folder"),
        (["--output", str(tmp_path / "a"), "--prompt", "query"], "--prompt must be NAME=TEXT, got 'query'"),
        (["--output", str(tmp_path / "b"), "--prompt", "q=x", "--prompt", "q=y"], "got 'q' twice"),
        (["--output", str(tmp_path / "c"), "--prompt", "q=x"], "--prompt need --format sentence-transformers"),
        (["--output", str(tmp_path / "d"), "--format", "sentence-transformers", "--prompt", "q=x",
          "--default-prompt-name", "query"], "--default-prompt-name must be one of the --prompt names"),
        (["--output", str(tmp_path / "e"), "--format", "sentence-transformers", "--truncate-dim", "0"],
         "--truncate-dim must be a positive int, got 0"),
    ]
    os.symlink(str(tmp_path / "nowhere"), str(tmp_path / "dangling"))
    refusals.append((["--output", str(tmp_path / "dangling")], "a link to nothing"))
    for extra, message in refusals:
        assert main(base_args + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert set(os.listdir(tmp_path)) <= {"keep.txt", "plain", "st", "dangling"}  # no folder of a refused run
    with open(os.path.join(str(tmp_path), "keep.txt")) as f:
        assert f.read() == "user data"


def test_export_merges_any_adapter_and_a_failure_leaves_nothing(adapters, tmp_path, capsys, monkeypatch):
    """A DoRA adapter (which the encoder's merged_copy refuses) exports merged by peft, with its embeddings; an
    export that fails after loading exits 1 with the message and removes what it wrote (a new folder, or the
    entries of the empty one it got)."""
    from peft import LoraConfig, get_peft_model

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.cli import main
    from llm2vec_fast.encoder import st_adapter
    from llm2vec_fast.models import LlamaBiModel
    base, _, _ = adapters
    dora = str(tmp_path / "dora")
    torch.manual_seed(3)
    peft_model = get_peft_model(LlamaBiModel.from_pretrained(base), LoraConfig(r=4, use_dora=True,
                                                                              target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(dora)
    texts = [t for t in INPUTS if isinstance(t, str)][:4]
    expected = LLM2Vec.from_pretrained(base, peft_model_name_or_path=dora).encode(texts, show_progress_bar=False)
    args = ["export", "--model", base, "--peft", dora, "--dtype", "float32"]
    assert main(args + ["--output", str(tmp_path / "merged")]) == 0
    assert "adapter_config.json" not in os.listdir(tmp_path / "merged")
    got = LLM2Vec.from_pretrained(str(tmp_path / "merged")).encode(texts, show_progress_bar=False)
    assert torch.allclose(got, expected, atol=SAME_ATOL, rtol=0)
    capsys.readouterr()

    def failing_save(self, output_path, *args, **kwargs):
        with open(os.path.join(output_path, "config_sentence_transformers.json"), "w") as f:
            f.write("{}")
        raise ValueError("the save failed halfway")
    monkeypatch.setattr(st_adapter.LLM2VecModule, "save", failing_save)
    empty = tmp_path / "empty"
    empty.mkdir()
    for output in (str(tmp_path / "new" / "nested"), str(empty)):
        assert main(args + ["--output", output, "--format", "sentence-transformers"]) == 1
        assert "llm2vec-fast export: error: the save failed halfway" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "new" / "nested") and os.listdir(empty) == []


# ---------------------------------------------------------- the encode loop: chunks, progress, host batches

class RecordingBar:
    """Stands in for tqdm: records the updates and the postfix text."""

    def __init__(self):
        self.updates, self.postfix = [], None

    def update(self, n):
        self.updates.append(n)

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text

    def __enter__(self):  # as encode() uses tqdm
        return self

    def __exit__(self, *exc):
        return False


ENCODE_ITEMS = INPUTS + ["", ["Retrieve the passage", "what is packing?"], "x", INPUTS[0]]


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_accumulation_gives_the_same_embeddings(encoders, monkeypatch, chunk):
    """Embeddings gathered per PLAN_CHUNK (index_copy_ by input index) are those of one chunk, in input order,
    rows without tokens zeros, with and without normalisation."""
    from llm2vec_fast.encoder import llm2vec as module
    encoder = encoders("llama")
    for run in (reference("llama")["runs"][0], reference("llama")["runs"][2], reference("llama")["runs"][4]):
        configure(encoder, run)
        for normalize in (False, True):
            expected = encoder.encode(ENCODE_ITEMS, show_progress_bar=False, normalize_embeddings=normalize)
            monkeypatch.setattr(module, "PLAN_CHUNK", chunk)
            got = encoder.encode(ENCODE_ITEMS, show_progress_bar=False, normalize_embeddings=normalize)
            monkeypatch.undo()
            assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == expected.shape
            assert torch.allclose(got, expected, atol=SAME_ATOL, rtol=0), (run_id(run), normalize)
            zeros = expected.abs().sum(dim=1) == 0
            assert torch.equal(got[zeros], expected[zeros])
            assert torch.equal(got[len(INPUTS) + 3], got[0])  # a repeated input: the same row


def test_progress_bar_counts_every_text_once(encoders, monkeypatch):
    from llm2vec_fast.encoder import llm2vec as module
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    monkeypatch.setattr(module, "PLAN_CHUNK", 4)
    bar = RecordingBar()
    items = [("", x) if isinstance(x, str) else (x[0], x[1]) for x in ENCODE_ITEMS]
    encoder._encode_items(items, "cpu", bar, batch_size=2, normalize_embeddings=False, max_tokens_per_batch=16)
    assert sum(bar.updates) == len(items) and bar.postfix.endswith("tok/s")


def test_repeated_inputs_run_once(encoders, monkeypatch):
    """An input given several times (the same text, or the same [instruction, text]) goes through the model once;
    its rows are the same bits, equal to encoding it among distinct inputs; the progress bar still counts every
    input."""
    from llm2vec_fast.encoder import llm2vec as module
    encoder = encoders("llama")
    configure(encoder, reference("llama")["runs"][0])
    distinct = [INPUTS[0], ["Retrieve the passage", "what is packing?"], INPUTS[2]]
    items = [distinct[0], distinct[1], distinct[0], distinct[2], distinct[1], distinct[0]]
    ran = []
    original = module.LLM2Vec._run_batch

    def counting(self, prepared, normalize):
        emb = original(self, prepared, normalize)
        ran.append(emb.shape[0])
        return emb
    monkeypatch.setattr(module.LLM2Vec, "_run_batch", counting)
    bar = RecordingBar()
    monkeypatch.setattr("tqdm.auto.tqdm", lambda *a, **kw: bar)
    got = encoder.encode(items, show_progress_bar=False)
    assert sum(ran) == 3 and sum(bar.updates) == 6
    assert torch.equal(got[0], got[2]) and torch.equal(got[0], got[5]) and torch.equal(got[1], got[4])
    ran.clear()
    want = encoder.encode(distinct, show_progress_bar=False)
    assert torch.equal(got[[0, 1, 3]], want)


def test_a_prepared_batch_runs_without_reading_values(encoders):
    """One encode batch (prepared on the host) runs its forward and pooling without reading a value back
    (what would be a host sync on a GPU), in every pooling mode; and gives _embed_batch's result."""
    from test_models import ValueReads
    encoder = encoders("llama")
    for run in reference("llama")["runs"][:10:2] + reference("llama")["runs"][1:2]:
        configure(encoder, run)
        plan = encoder.plan(as_items(INPUTS))
        rows = [i for i, ids in enumerate(plan.input_ids) if ids][:6]
        ids, counts = [plan.input_ids[i] for i in rows], [plan.embed_counts[i] for i in rows]
        with torch.no_grad():
            prepared = encoder._prepare_batch(ids, counts)
            with ValueReads() as reads:
                emb = encoder._run_batch(prepared, True)
            assert not reads.seen, (run_id(run), dict(reads.seen))
            assert torch.equal(emb, encoder._embed_batch(ids, counts, True))


def test_in_flight_batches_complete_in_order():
    """The bookkeeping of batches enqueued on a device (events with query/synchronize): completed ones are
    counted without waiting, the oldest are waited for until at most ``keep`` remain."""
    from llm2vec_fast.encoder.llm2vec import _InFlight, _Progress

    class Event:
        def __init__(self, done):
            self.done, self.waited = done, False

        def query(self):
            return self.done

        def synchronize(self):
            self.waited, self.done = True, True

    bar = RecordingBar()
    progress = _Progress(bar)
    events = [Event(True), Event(False), Event(True), Event(False)]
    in_flight = [_InFlight(e, texts=i + 1, tokens=10, keep=None) for i, e in enumerate(events)]
    progress.settle(in_flight, keep=3)  # the first has completed: counted, no wait
    assert bar.updates == [1] and not events[0].waited and len(in_flight) == 3
    progress.settle(in_flight, keep=1)  # waits for the second; the third has completed
    assert bar.updates == [1, 2, 3] and events[1].waited and [e.event for e in in_flight] == [events[3]]
    progress.settle(in_flight, keep=0)
    assert bar.updates == [1, 2, 3, 4] and not in_flight and progress.tokens == 40
