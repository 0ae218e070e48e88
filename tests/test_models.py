"""Tests of ``llm2vec_fast.models``: bidirectional Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3, Phi-3 and the
packed forward.

The oracle is the family's plain transformers ``XxxModel`` with ``attn_implementation="eager"`` given an
explicit bidirectional 4D mask (0 for real keys, the dtype's minimum for padded keys) and explicit
per-sequence position ids. Tiny random-weight configs of the real architectures (head_dim 64, 2 layers),
float32 on the CPU, the reference (torch) attention backend unless a test says otherwise.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, Phi3Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config)

import llm2vec_fast as lf
from llm2vec_fast.models import (BI_FOR_MNTP, BI_MODELS, ATTN_IMPLEMENTATION, PackedBatch, forward_packed,
                                 is_bidirectional, make_bidirectional, pack, pack_sequences, repad,
                                 set_attention_backend, unpad)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")
TOL = 1e-4
VOCAB = 100
# Real lengths in a batch of 4 (odd, unequal, one of length 1).
LENGTHS = (9, 5, 1, 7)
SEQLEN = 11


def tiny_config(family: str, **overrides):
    """A 2-layer random config of the family's real architecture: hidden 128, head_dim 64, GQA."""
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  initializer_range=0.1, pad_token_id=0, tie_word_embeddings=False)
    if family == "llama":
        config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=64, **common)
    elif family == "mistral":
        config = MistralConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=64, sliding_window=4096,
                               **common)
    elif family == "qwen2":  # Qwen2 derives head_dim = hidden / heads
        config = Qwen2Config(num_attention_heads=2, num_key_value_heads=1, **common)
    elif family == "qwen3":
        config = Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=64, **common)
    elif family == "gemma":
        config = GemmaConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=64, **common)
    elif family == "gemma2":  # a small softcap so that it shapes the probabilities of a random model
        config = Gemma2Config(num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                              attn_logit_softcapping=2.0, sliding_window=4096, **common)
    elif family == "gemma3_text":  # q/k norms, a local RoPE base on sliding layers; layer 0 slides, layer 1 is full
        config = Gemma3TextConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                                  sliding_window=4096, layer_types=["sliding_attention", "full_attention"], **common)
    elif family == "phi3":  # fused qkv and gate_up projections; head_dim = hidden / heads
        config = Phi3Config(num_attention_heads=2, num_key_value_heads=1, sliding_window=None, eos_token_id=2,
                            bos_token_id=1, **common)
    else:
        raise AssertionError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def base_classes(family: str):
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
             "gemma2": "Gemma2", "gemma3_text": "Gemma3", "phi3": "Phi3"}
    body = "Gemma3TextModel" if family == "gemma3_text" else f"{names[family]}Model"
    return getattr(transformers, body), getattr(transformers, f"{names[family]}ForCausalLM")


def bi_model(family: str, impl: str = ATTN_IMPLEMENTATION, state=None, config=None, backend: str = "torch"):
    torch.manual_seed(0)
    config = config or tiny_config(family)
    config._attn_implementation = impl
    model = BI_MODELS[family](config)
    if state is not None:
        model.load_state_dict(state)
    if impl == ATTN_IMPLEMENTATION:
        set_attention_backend(model, backend)
    return model.eval()


def make_batch(seed: int = 0, lengths=LENGTHS, seqlen=SEQLEN, left: bool = False):
    """(input_ids, attention_mask) with the same sequences for either padding side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros((len(lengths), seqlen), dtype=torch.long)
    mask = torch.zeros((len(lengths), seqlen), dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens = torch.randint(1, VOCAB, (n,), generator=g)
        cols = slice(seqlen - n, seqlen) if left else slice(0, n)
        ids[row, cols] = tokens
        mask[row, cols] = 1
    return ids, mask


def explicit_4d_mask(mask, dtype=torch.float32, window=None):
    """(B, 1, S, S): 0 where the key is real (and within |i - j| < window), the dtype's minimum elsewhere."""
    keep = mask.bool()[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
    if window is not None:
        rows = torch.arange(mask.shape[1])
        keep = keep & ((rows[:, None] - rows[None, :]).abs() < window)
    out = torch.zeros(keep.shape, dtype=dtype)
    return out.masked_fill(~keep, torch.finfo(dtype).min)


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def reference_hidden(family, state, ids, mask, config=None, mask_4d=None):
    """The oracle: plain transformers XxxModel, eager attention, explicit 4D mask and positions."""
    base_cls, _ = base_classes(family)
    config = config or tiny_config(family)
    config._attn_implementation = "eager"
    ref = base_cls(config).eval()
    ref.load_state_dict(state)
    with torch.no_grad():
        mask_4d = explicit_4d_mask(mask) if mask_4d is None else mask_4d
        return ref(ids, attention_mask=mask_4d, position_ids=positions(mask)).last_hidden_state


def real(hidden, mask):
    """The real tokens of a padded (B, S, H) result, in packed order."""
    return unpad(hidden, pack(attention_mask=mask))


def rel_err(actual, expected):
    return float((actual - expected).abs().max() / expected.abs().max())


_STATE_CACHE = {}


def family_state(family):
    if family not in _STATE_CACHE:
        _STATE_CACHE[family] = bi_model(family).state_dict()
    return _STATE_CACHE[family]


# ------------------------------------------------------------------------------------- vs the oracle

@pytest.mark.parametrize("family", FAMILIES)
def test_matches_eager_reference_left_right_packed(family):
    state = family_state(family)
    ids_r, mask_r = make_batch(left=False)
    ids_l, mask_l = make_batch(left=True)
    expected = real(reference_hidden(family, state, ids_r, mask_r), mask_r)
    model = bi_model(family, state=state)
    with torch.no_grad():
        right = real(model(ids_r, attention_mask=mask_r).last_hidden_state, mask_r)
        left = real(model(ids_l, attention_mask=mask_l).last_hidden_state, mask_l)
        packed = model.forward_packed(ids_l, mask_l).hidden
    for name, got in (("right-padded", right), ("left-padded", left), ("packed", packed)):
        assert got.shape == expected.shape
        assert rel_err(got, expected) <= TOL, f"{family} {name}: relative error {rel_err(got, expected):.2e}"
    # The check can fail: the causal model (transformers' default) is far from the bidirectional oracle.
    base_cls, _ = base_classes(family)
    causal = base_cls(tiny_config(family)).eval()
    causal.load_state_dict(state)
    with torch.no_grad():
        causal_out = real(causal(ids_r, attention_mask=mask_r).last_hidden_state, mask_r)
    assert rel_err(causal_out, expected) > 100 * TOL


@pytest.mark.parametrize("impl", ["eager", "sdpa", ATTN_IMPLEMENTATION])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_attention_implementation_is_bidirectional(family, impl):
    if family == "gemma2" and impl == "sdpa":
        pytest.skip("sdpa has no logit softcap: transformers 5.24 rejects it for Gemma2 (5.17 silently drops it)")
    state = family_state(family)
    ids, mask = make_batch(seed=1, left=True)
    expected = real(reference_hidden(family, state, ids, mask), mask)
    model = bi_model(family, impl=impl, state=state)
    with torch.no_grad():
        got = real(model(ids, attention_mask=mask).last_hidden_state, mask)
        packed = model.forward_packed(ids, mask).hidden  # eager/sdpa: a block-diagonal mask
        # Without a mask (no padding): the first token must see a change to the last one.
        one = ids[:1, -LENGTHS[0]:]
        changed = one.clone()
        changed[0, -1] = (changed[0, -1] % (VOCAB - 1)) + 1
        first = model(one).last_hidden_state[0, 0]
        first_changed = model(changed).last_hidden_state[0, 0]
    assert rel_err(got, expected) <= TOL, f"{family}/{impl}: relative error {rel_err(got, expected):.2e}"
    assert rel_err(packed, expected) <= TOL, f"{family}/{impl} packed: relative error {rel_err(packed, expected):.2e}"
    assert (first - first_changed).abs().max() > 1e-3, f"{family}/{impl}: token 0 does not see the last token"


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_equals_padded_and_left_padding_equals_alone(family):
    model = bi_model(family, state=family_state(family))
    ids, mask = make_batch(seed=2, left=True)
    with torch.no_grad():
        out = model.forward_packed(ids, mask)
        padded = model(ids, attention_mask=mask).last_hidden_state
        alone = model(ids[:1, -LENGTHS[0]:]).last_hidden_state[0]
    assert out.hidden.shape == (sum(LENGTHS), 128)
    assert torch.equal(out.cu_seqlens, torch.tensor([0, 9, 14, 15, 22], dtype=torch.int32))
    assert out.max_seqlen == 9
    assert rel_err(out.hidden, real(padded, mask)) <= 1e-5
    repadded = out.padded()
    assert repadded.shape == padded.shape
    assert torch.equal(repadded[mask == 0], torch.zeros_like(repadded[mask == 0]))
    assert rel_err(repadded[mask == 1], padded[mask == 1]) <= 1e-5
    assert rel_err(out.hidden[:LENGTHS[0]], alone) <= 1e-5
    assert rel_err(padded[0, -LENGTHS[0]:], alone) <= 1e-5


@pytest.mark.parametrize("impl", ["eager", "sdpa", ATTN_IMPLEMENTATION])
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_a_packed_row_called_directly_attends_within_each_sequence(family, impl):
    """transformers' padding-free convention (one row, position_ids restarting per sequence, no mask): every
    attention implementation keeps attention within each sequence, equal to the eager oracle run on the padded
    batch (the sliding window of mistral and gemma2 shorter than the longest sequence)."""
    if family == "gemma2" and impl == "sdpa":
        pytest.skip("sdpa has no logit softcap (see test_sliding_window_is_symmetric)")
    window = None if family == "llama" else 4
    config = tiny_config(family, sliding_window=window) if window else tiny_config(family)
    state = family_state(family)
    ids, mask = make_batch(seed=3)
    oracle_mask = explicit_4d_mask(mask, window=window)
    if family == "gemma2":  # layer 0 slides, layer 1 is full
        oracle_mask = {"full_attention": explicit_4d_mask(mask), "sliding_attention": oracle_mask}
    expected = real(reference_hidden(family, state, ids, mask, config=config, mask_4d=oracle_mask), mask)
    batch = pack(ids, mask)
    model = bi_model(family, impl, state, config=tiny_config(family, sliding_window=window) if window else None)
    with torch.no_grad():
        got = model(batch.input_ids[None], position_ids=batch.position_ids[None]).last_hidden_state[0]
    assert rel_err(got, expected) < TOL


def test_padded_positions_read_any_nonzero_mask_value_as_a_token():
    """An integer mask with values other than 1 (read as real tokens by the attention masks) gives the positions
    and the output of the 0/1 mask, not positions that skip."""
    state = family_state("llama")
    ids, mask = make_batch(seed=4, left=True)
    model = bi_model("llama", "eager", state)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
        got = model(ids, attention_mask=mask * 2).last_hidden_state
    assert rel_err(real(got, mask), real(expected, mask)) < 1e-6


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("mistral", {"sliding_window": 4}),
                                              ("gemma2", {}), ("llama", {"attention_dropout": 0.1})])
def test_forward_packed_names_a_bad_cu_seqlens(family, overrides):
    """cu_seqlens that disagree with the batch's tokens are named before any layer splits by them (the windowed,
    softcap and dropout paths of the torch backend split first)."""
    from dataclasses import replace
    model = bi_model(family, config=tiny_config(family, **overrides))
    model.train(bool(overrides.get("attention_dropout")))
    ids, mask = make_batch(seed=5)
    good = pack(ids, mask)
    total = good.num_tokens
    cases = [([0, 1, total - 2], "must end at the total token count"), ([1, 5, total], "must start at 0"),
             ([0, 9, 5, total], "must be non-decreasing"), ([0, 9, 14, total, total - 1], "must end at the total")]
    for values, message in cases:
        bad = replace(good, cu_seqlens=torch.tensor(values, dtype=torch.int32))
        with pytest.raises(ValueError, match=f"batch.cu_seqlens {message}"):
            forward_packed(model, batch=bad)


def test_rope_positions_restart_at_each_sequence():
    """Padded (left or right) and packed forwards feed RoPE each sequence's own positions 0..n-1."""
    model = bi_model("llama", state=family_state("llama"))
    seen = []

    def record(module, args, kwargs, out):
        seen.append((kwargs["position_ids"] if "position_ids" in kwargs else args[1]).clone())
    model.rotary_emb.register_forward_hook(record, with_kwargs=True)
    expected = torch.cat([torch.arange(n) for n in LENGTHS])
    with torch.no_grad():
        for left in (False, True):
            ids, mask = make_batch(seed=17, left=left)
            model(ids, attention_mask=mask)
            assert torch.equal(real(seen[-1][..., None], mask)[:, 0], expected)
            model.forward_packed(ids, mask)
            assert torch.equal(seen[-1], expected[None])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_batch_invariance_is_bitwise_on_the_packed_path(family):
    """A sequence alone, and among others of other lengths (another max_seqlen), gives the same bits.

    Attention is computed per sequence. The projections and MLPs are row-wise GEMMs: MKL computes a row
    the same way for every row count above a small, shape-dependent threshold (up to 10 rows for these
    shapes, 15 for 4096 x 4096) and takes another kernel below it, so every batch here has T >= 17.
    """
    model = bi_model(family, state=family_state(family))
    target = torch.randint(1, VOCAB, (17,), generator=torch.Generator().manual_seed(3)).tolist()
    g = torch.Generator().manual_seed(4)
    others = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3, 10, 6, 20, 1)]
    batches = [[target], [others[0], target, others[1]], [others[2], others[3], target, others[4]]]
    where = [0, 1, 2]
    results = []
    with torch.no_grad():
        for sequences, index in zip(batches, where):
            out = model.forward_packed(batch=pack_sequences(sequences))
            start, end = out.cu_seqlens[index:index + 2].tolist()
            results.append(out.hidden[start:end])
    assert results[0].shape == (17, 128)
    assert torch.equal(results[1], results[0])
    assert torch.equal(results[2], results[0])


def test_attention_is_batch_invariant_bitwise():
    """The attention function alone: any lengths, including a short sequence alone."""
    from llm2vec_fast.models.attention import llm2vec_fast_attention
    g = torch.Generator().manual_seed(16)
    module = torch.nn.Module()
    module.is_causal, module.llm2vec_fast_backend = False, "torch"
    lengths = [5, 12, 3]
    total = sum(lengths)
    q, k, v = (torch.randn(1, h, total, 64, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 17, 20], dtype=torch.int32)
    batched, _ = llm2vec_fast_attention(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=12)
    alone, _ = llm2vec_fast_attention(module, q[:, :, :5], k[:, :, :5], v[:, :, :5], None)
    assert torch.equal(batched[0, :5], alone[0])


# --------------------------------------------------------------------------------------- Gemma2 and windows

def test_gemma2_softcap_reaches_the_kernel():
    state = family_state("gemma2")
    ids, mask = make_batch(seed=5)
    capped = bi_model("gemma2", state=state)
    uncapped = bi_model("gemma2", state=state, config=tiny_config("gemma2", attn_logit_softcapping=None))
    with torch.no_grad():
        a = capped.forward_packed(ids, mask).hidden
        b = uncapped.forward_packed(ids, mask).hidden
    assert rel_err(a, b) > 100 * TOL  # the cap changes the result (and test 1 shows it matches eager's cap)


@pytest.mark.parametrize("impl", ["eager", "sdpa", ATTN_IMPLEMENTATION])
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "mistral", "phi3"])
def test_sliding_window_is_symmetric(family, impl):
    """A window shorter than the sequences: query i sees key j iff |i - j| < window, on the sliding layers."""
    if family == "gemma2" and impl == "sdpa":
        pytest.skip("sdpa has no logit softcap (see above)")
    window = 3
    config = tiny_config(family, sliding_window=window)
    state = family_state(family)
    ids, mask = make_batch(seed=6, left=True)
    full_4d, window_4d = explicit_4d_mask(mask), explicit_4d_mask(mask, window=window)
    if family in ("gemma2", "gemma3_text"):  # layer 0 slides, layer 1 is full
        assert config.layer_types == ["sliding_attention", "full_attention"]
        oracle_mask = {"full_attention": full_4d, "sliding_attention": window_4d}
    else:  # every Mistral and Phi-3 layer slides
        oracle_mask = window_4d
    expected = real(reference_hidden(family, state, ids, mask, config=tiny_config(family, sliding_window=window),
                                     mask_4d=oracle_mask), mask)
    unwindowed = real(reference_hidden(family, state, ids, mask), mask)
    assert rel_err(unwindowed, expected) > 100 * TOL  # the window matters here
    model = bi_model(family, impl=impl, state=state, config=config)
    with torch.no_grad():
        got = real(model(ids, attention_mask=mask).last_hidden_state, mask)
        packed = model.forward_packed(ids, mask).hidden
    assert rel_err(got, expected) <= TOL, f"padded: {rel_err(got, expected):.2e}"
    assert rel_err(packed, expected) <= TOL, f"packed: {rel_err(packed, expected):.2e}"


@pytest.mark.parametrize("impl", ["eager", "sdpa", ATTN_IMPLEMENTATION])
def test_gemma3_matches_transformers_own_bidirectional_gemma3(impl, tmp_path):
    """An independent oracle: transformers' Gemma3 with ``use_bidirectional_attention`` (EmbeddingGemma's switch;
    its config keeps half the window, |i - j| < w // 2 + 1) against our class loaded from the same checkpoint, on
    a window shorter than the sequences. Our saved model reloads in plain transformers as a bidirectional model
    (``make_bidirectional`` sets the switch)."""
    config = tiny_config("gemma3_text", use_bidirectional_attention=True)
    config = Gemma3TextConfig.from_dict({**config.to_dict(), "sliding_window": 6})  # as a checkpoint would store it
    assert config.sliding_window == 4  # transformers halves it: keys with |i - j| < 4 are seen
    config._attn_implementation = "eager"
    torch.manual_seed(5)
    plain = transformers.Gemma3TextModel(config).eval()
    plain.save_pretrained(tmp_path / "embedding_gemma")
    ids, mask = make_batch(seed=18)  # right padding: transformers' default positions are right for real tokens
    with torch.no_grad():
        expected = real(plain(ids, attention_mask=mask).last_hidden_state, mask)
        plain_windowless = transformers.Gemma3TextModel(tiny_config("gemma3_text", use_bidirectional_attention=True))
        plain_windowless.load_state_dict(plain.state_dict())
        unwindowed = real(plain_windowless.eval()(ids, attention_mask=mask).last_hidden_state, mask)
    assert rel_err(unwindowed, expected) > 100 * TOL  # the window matters here
    model = BI_MODELS["gemma3_text"].from_pretrained(tmp_path / "embedding_gemma", attn_implementation=impl).eval()
    assert model.config.sliding_window == 4
    if impl == ATTN_IMPLEMENTATION:
        set_attention_backend(model, "torch")
    with torch.no_grad():
        padded = real(model(ids, attention_mask=mask).last_hidden_state, mask)
        packed = model.forward_packed(ids, mask).hidden
    assert rel_err(padded, expected) <= TOL, f"padded: {rel_err(padded, expected):.2e}"
    assert rel_err(packed, expected) <= TOL, f"packed: {rel_err(packed, expected):.2e}"
    # A causal Gemma3 made bidirectional by us, saved, then loaded by plain transformers: bidirectional there
    # too, with sdpa (which reads the attention modules' is_causal where it gets no mask). Only the window's
    # edge differs there (transformers reads is_causal=False as |i - j| <= w), so the window here is long.
    causal_config = tiny_config("gemma3_text")
    causal_config._attn_implementation = ATTN_IMPLEMENTATION
    ours = BI_MODELS["gemma3_text"](causal_config).eval()
    set_attention_backend(ours, "torch")
    ours.save_pretrained(tmp_path / "ours")
    reloaded = transformers.Gemma3TextModel.from_pretrained(tmp_path / "ours", attn_implementation="sdpa").eval()
    assert reloaded.config.use_bidirectional_attention and reloaded.config.sliding_window == 4096
    with torch.no_grad():
        mine = ours.forward_packed(ids, mask).hidden
        theirs = real(reloaded(ids, attention_mask=mask).last_hidden_state, mask)
        one = ids[:1, :LENGTHS[0]]  # no padding: sdpa gets no mask and reads is_causal
        alone = reloaded(one).last_hidden_state[0]
    assert rel_err(theirs, mine) <= TOL, f"reloaded: {rel_err(theirs, mine):.2e}"
    assert rel_err(alone, mine[:LENGTHS[0]]) <= TOL, f"reloaded, unpadded: {rel_err(alone, mine[:LENGTHS[0]]):.2e}"


# ----------------------------------------------------------------------------- loading and conversion

@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trip(family, tmp_path):
    base_cls, lm_cls = base_classes(family)
    torch.manual_seed(1)
    base = base_cls(tiny_config(family)).eval()
    base.save_pretrained(tmp_path / "base")
    model, info = BI_MODELS[family].from_pretrained(tmp_path / "base", attn_implementation=ATTN_IMPLEMENTATION,
                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert set(model.state_dict()) == set(base.state_dict())
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION and model.config.is_causal is False
    # An instance built from a config takes the base model's state dict as is.
    BI_MODELS[family](tiny_config(family)).load_state_dict(base.state_dict(), strict=True)
    # The MNTP class loads a causal-LM checkpoint (head included), and its body matches the Bi model.
    lm = lm_cls(tiny_config(family)).eval()
    lm.model.load_state_dict(base.state_dict())
    lm.save_pretrained(tmp_path / "lm")
    mntp, info = BI_FOR_MNTP[family].from_pretrained(tmp_path / "lm", attn_implementation=ATTN_IMPLEMENTATION,
                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(mntp.lm_head.weight, lm.lm_head.weight)
    # The Auto classes pick the family's class from the checkpoint (and from a config).
    from llm2vec_fast.models import AutoBiForMNTP, AutoBiModel
    auto = AutoBiModel.from_pretrained(tmp_path / "base", attn_implementation=ATTN_IMPLEMENTATION)
    assert type(auto) is BI_MODELS[family] and is_bidirectional(auto)
    assert all(torch.equal(auto.state_dict()[key], value) for key, value in base.state_dict().items())
    assert type(AutoBiForMNTP.from_pretrained(tmp_path / "lm")) is BI_FOR_MNTP[family]
    assert type(AutoBiModel.from_config(tiny_config(family))) is BI_MODELS[family]
    set_attention_backend(model, "torch")
    set_attention_backend(mntp, "torch")
    ids, mask = make_batch(seed=7)
    with torch.no_grad():
        body = model(ids, attention_mask=mask).last_hidden_state
        mntp_out = mntp(ids, attention_mask=mask, output_hidden_states=True)
    assert rel_err(real(mntp_out.hidden_states[-1], mask), real(body, mask)) <= 1e-6
    assert mntp_out.logits.shape == (*ids.shape, VOCAB)


def test_auto_classes_read_the_config_in_the_subfolder(tmp_path):
    """``subfolder=`` (a checkpoint inside a repository, as sentence-transformers lays them out) applies to the
    config that picks the family too, not only to the weights: here the root holds another family's checkpoint."""
    from llm2vec_fast.models import AutoBiForMNTP, AutoBiModel
    torch.manual_seed(2)
    base_classes("llama")[0](tiny_config("llama")).save_pretrained(tmp_path)
    base_classes("qwen2")[1](tiny_config("qwen2")).save_pretrained(tmp_path / "model")
    model = AutoBiModel.from_pretrained(tmp_path, subfolder="model")
    assert type(model) is BI_MODELS["qwen2"] and is_bidirectional(model)
    assert type(AutoBiForMNTP.from_pretrained(tmp_path, subfolder="model")) is BI_FOR_MNTP["qwen2"]


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_make_bidirectional_converts_a_loaded_model(family):
    _, lm_cls = base_classes(family)
    config = tiny_config(family)
    config._attn_implementation = ATTN_IMPLEMENTATION
    torch.manual_seed(2)
    lm = lm_cls(config).eval()
    ids, mask = make_batch(seed=8, left=True)
    expected = real(reference_hidden(family, lm.model.state_dict(), ids, mask), mask)
    assert make_bidirectional(lm, backend="torch") is lm
    with torch.no_grad():
        got = real(lm(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1], mask)
        packed = forward_packed(lm, ids, mask).hidden
    assert rel_err(got, expected) <= TOL
    assert rel_err(packed, expected) <= TOL
    make_bidirectional(lm)  # idempotent
    assert len(lm.model._forward_pre_hooks) == 1


def test_unsupported_family_raises():
    from llm2vec_fast.models import AutoBiModel
    config = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=32)
    with pytest.raises(ValueError, match=r"model_type='gpt2'.* no bidirectional model; supported model types: llama"):
        AutoBiModel.from_config(config)
    with pytest.raises(TypeError, match=r"AutoBiModel.from_pretrained"):
        AutoBiModel()
    with pytest.raises(ValueError, match=r"not supported.*llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, phi3"):
        make_bidirectional(transformers.GPT2Model(config))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        make_bidirectional(torch.nn.Linear(2, 2))
    causal = base_classes("llama")[0](tiny_config("llama"))
    with pytest.raises(ValueError, match="make_bidirectional"):  # a model someone forgot to convert
        forward_packed(causal, *make_batch())
    with pytest.raises(ValueError, match="causal=True was given for a bidirectional model"):
        forward_packed(bi_model("llama"), *make_batch(), causal=True)
    with pytest.raises(TypeError, match="causal must be a bool"):
        forward_packed(causal, *make_batch(), causal=1)


@pytest.mark.parametrize("family,impl", [
    (family, impl) for family in ("llama", "qwen2", "gemma2", "gemma3_text", "mistral", "phi3")
    for impl in ("eager", "sdpa", ATTN_IMPLEMENTATION) if (family, impl) != ("gemma2", "sdpa")  # no softcap in sdpa
])
def test_causal_packed_forward_equals_each_sequence_alone(family, impl):
    """``causal=True`` (llm2vec's enable_bidirectional=False): each packed sequence equals the causal model on
    that sequence alone, with a sliding window shorter than the sequences where the family has one."""
    windowed = family in ("mistral", "gemma2", "gemma3_text", "phi3")
    config = tiny_config(family, sliding_window=3) if windowed else tiny_config(family)
    config._attn_implementation = impl
    torch.manual_seed(11)
    model = base_classes(family)[0](config).eval()
    if impl == ATTN_IMPLEMENTATION:
        set_attention_backend(model, "torch")
    ids, mask = make_batch(seed=19, left=True)
    with torch.no_grad():
        packed = forward_packed(model, ids, mask, causal=True).hidden
        alone = torch.cat([model(ids[row:row + 1, mask[row] == 1]).last_hidden_state[0] for row in range(len(ids))])
        made = bi_model(family, impl=impl, state=model.state_dict(), config=config)
        bidirectional = made.forward_packed(ids, mask).hidden
    assert rel_err(packed, alone) <= TOL, f"{family}/{impl}: {rel_err(packed, alone):.2e}"
    assert rel_err(bidirectional, alone) > 100 * TOL  # the check can fail: bidirectional is far from it


def test_llm2vec_fast_rejects_a_4d_mask():
    model = bi_model("llama", state=family_state("llama"))
    ids, mask = make_batch()
    with pytest.raises(ValueError, match="padding mask"):
        model(ids, attention_mask=explicit_4d_mask(mask))


# ------------------------------------------------------------------------------------------ training

def _checkpointing(model, enable: bool):
    if enable:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:  # transformers 5.17
            model.gradient_checkpointing_enable({"use_reentrant": False})


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    ids, mask = make_batch(seed=9)
    grads = []
    for checkpointing in (False, True):
        model = bi_model(family, state=family_state(family),
                         config=tiny_config(family, attention_dropout=0.2)).train()
        _checkpointing(model, checkpointing)
        torch.manual_seed(123)  # the same dropout masks, replayed by the checkpoint's recompute
        out = model.forward_packed(ids, mask)
        loss = lf.pool(out.hidden, cu_seqlens=out.cu_seqlens).square().sum()
        loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_attention_dropout_acts_in_training_only():
    model = bi_model("llama", state=family_state("llama"), config=tiny_config("llama", attention_dropout=0.3))
    ids, mask = make_batch(seed=10)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model.forward_packed(ids, mask).hidden, model.forward_packed(ids, mask).hidden)
        model.train()
        a, b = model.forward_packed(ids, mask).hidden, model.forward_packed(ids, mask).hidden
    assert (a - b).abs().max() > 1e-3


def test_peft_lora_trains_one_step():
    peft = pytest.importorskip("peft")
    model = bi_model("mistral", state=family_state("mistral"), config=tiny_config("mistral", attention_dropout=0.1))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      lora_dropout=0.0, init_lora_weights=False))
    lora.train()
    adapters = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    ids, mask = make_batch(seed=11)
    # SimCSE: two dropout views of the same batch, contrastive loss between them.
    views = [forward_packed(lora, ids, mask) for _ in range(2)]
    q, d = (lf.pool(v.hidden, cu_seqlens=v.cu_seqlens) for v in views)
    loss = lf.contrastive_loss(q, d)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    params = dict(lora.named_parameters())
    assert all(not torch.equal(params[n].detach(), before) for n, before in adapters.items())
    assert all(torch.equal(params[n].detach(), before) for n, before in frozen.items())
    # The padded forward through peft is bidirectional too.
    lora.eval()
    with torch.no_grad():
        padded = lora(input_ids=ids, attention_mask=mask).last_hidden_state
        packed = forward_packed(lora, ids, mask).hidden
    assert rel_err(packed, real(padded, mask)) <= 1e-5


def test_forward_packed_under_inference_mode():
    model = bi_model("qwen2", state=family_state("qwen2"))
    ids, mask = make_batch(seed=18)
    with torch.no_grad():
        expected = model.forward_packed(ids, mask).hidden
    with torch.inference_mode():
        got = model.forward_packed(ids, mask).hidden
        padded = model(ids, attention_mask=mask).last_hidden_state
    assert torch.equal(got, expected)
    assert rel_err(real(padded, mask), expected) <= 1e-5


def test_bf16_and_autocast_are_close_to_fp32():
    state = family_state("qwen3")
    model = bi_model("qwen3", state=state)
    ids, mask = make_batch(seed=12)
    with torch.no_grad():
        fp32 = model.forward_packed(ids, mask).hidden
        bf16 = model.to(torch.bfloat16).forward_packed(ids, mask).hidden
    assert bf16.dtype == torch.bfloat16
    assert rel_err(bf16.float(), fp32) < 5e-2
    model = bi_model("qwen3", state=state)  # float32 weights under bf16 autocast (mixed-precision training)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.forward_packed(ids, mask).hidden
    assert rel_err(mixed.float(), fp32) < 5e-2


# ------------------------------------------------------------------------------------- packing helpers

def test_pack_unpad_repad():
    ids, mask = make_batch(seed=13, left=True)
    batch = pack(ids, mask)
    assert isinstance(batch, PackedBatch)
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 9, 14, 15, 22]
    assert batch.max_seqlen == 9 and (batch.batch_size, batch.seqlen) == ids.shape
    assert torch.equal(batch.input_ids, ids[mask.bool()])
    expected_positions = torch.cat([torch.arange(n) for n in LENGTHS])
    assert torch.equal(batch.position_ids, expected_positions)
    assert torch.equal(batch.sequence_ids, torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)]))
    x = torch.randn(*ids.shape, 3)
    packed = unpad(x, batch)
    assert torch.equal(packed, x[mask.bool()])
    back = repad(packed, batch, value=-1.0)
    assert torch.equal(back[mask.bool()], x[mask.bool()]) and bool((back[~mask.bool()] == -1).all())
    listed = pack_sequences([ids[i][mask[i].bool()].tolist() for i in range(len(LENGTHS))])
    assert torch.equal(listed.input_ids, batch.input_ids) and torch.equal(listed.cu_seqlens, batch.cu_seqlens)
    assert torch.equal(listed.position_ids, batch.position_ids)
    no_padding = pack(ids)
    assert no_padding.num_tokens == ids.numel() and no_padding.max_seqlen == SEQLEN
    with pytest.raises(ValueError, match="0 and 1"):
        pack(ids, mask * 2)
    with pytest.raises(ValueError, match="shape"):
        pack(ids, mask[:, :-1])


def test_pool_straight_from_the_packed_output():
    model = bi_model("gemma", state=family_state("gemma"))
    ids, mask = make_batch(seed=14, left=True)
    with torch.no_grad():
        out = model.forward_packed(ids, mask)
        padded = model(ids, attention_mask=mask).last_hidden_state
    from_packed = lf.pool(out.hidden, cu_seqlens=out.cu_seqlens, mode="mean")
    from_padded = lf.pool(padded, attention_mask=mask, mode="mean")
    assert rel_err(from_packed, from_padded) <= 1e-5


@pytest.mark.parametrize("impl", ["eager", ATTN_IMPLEMENTATION])
def test_a_batch_without_tokens_gives_empty_hidden_states(impl):
    """Every sequence empty (allowed, as zero-length sequences are): (0, H) hidden states that pool to zero vectors
    and take part in a backward, not an error from transformers' reshape of zero tokens."""
    model = bi_model("mistral", impl=impl, state=family_state("mistral")).train()
    ids, mask = make_batch(seed=21, lengths=(0, 0), seqlen=3)
    out = model.forward_packed(ids, mask, output_hidden_states=True)
    assert out.hidden.shape == (0, model.config.hidden_size) and out.cu_seqlens.tolist() == [0, 0, 0]
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert out.padded().shape == (2, 3, model.config.hidden_size)
    pooled = lf.pool(out.hidden, cu_seqlens=out.cu_seqlens, mode="mean")
    assert torch.equal(pooled, torch.zeros(2, model.config.hidden_size))
    pooled.sum().backward()  # a training step on such a batch runs (its gradients are zero)
    with torch.no_grad():
        assert model.forward_packed(batch=pack_sequences([[]])).hidden.shape == (0, model.config.hidden_size)


@pytest.mark.parametrize("family,overrides", [
    ("llama", dict(attention_bias=True, num_key_value_heads=1, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 4})),
    ("qwen3", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                    "original_max_position_embeddings": 4})),
    ("phi3", dict(partial_rotary_factor=0.5, max_position_embeddings=64, original_max_position_embeddings=4,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 4,
                                   "short_factor": [1.0 + i / 8 for i in range(16)],
                                   "long_factor": [2.0 + i / 4 for i in range(16)]})),
    ("gemma2", dict(final_logit_softcapping=3.0, query_pre_attn_scalar=32, tie_word_embeddings=True)),
])
def test_config_variants_match_the_oracle_in_training(family, overrides):
    """Config variants (RoPE scaling past the original length, partial rotary, biases, MQA, Gemma2's scalars):
    the packed forward's hidden states and gradients, with gradient checkpointing, equal the padded eager oracle's."""
    state = bi_model(family, config=tiny_config(family, **overrides)).state_dict()
    ids, mask = make_batch(seed=22)
    weights = torch.randn(int(mask.sum()), 128, generator=torch.Generator().manual_seed(0))
    results = []
    for packed in (True, False):
        config = tiny_config(family, **overrides)
        if packed:
            model = bi_model(family, state=state, config=config).train()
            _checkpointing(model, True)
            hidden = model.forward_packed(ids, mask).hidden
        else:
            config._attn_implementation = "eager"
            model = base_classes(family)[0](config).train()
            model.load_state_dict(state)
            hidden = real(model(ids, attention_mask=explicit_4d_mask(mask), position_ids=positions(mask))
                          .last_hidden_state, mask)
        (hidden * weights).sum().backward()
        results.append((hidden.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (got, got_grads), (expected, expected_grads) = results
    assert rel_err(got, expected) <= TOL
    assert got_grads.keys() == expected_grads.keys() and len(got_grads) > 10
    for name, grad in expected_grads.items():
        assert rel_err(got_grads[name], grad) <= 1e-4, name


# --------------------------------------------------------------------------------- the Triton backend

_TRITON_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_models import bi_model, family_state, make_batch, rel_err, tiny_config
    from llm2vec_fast.models import set_attention_backend
    result = {{}}
    model = bi_model("llama", state=family_state("llama"))
    ids, mask = make_batch(seed=15, left=True)
    with torch.no_grad():
        expected = model.forward_packed(ids, mask).hidden
        set_attention_backend(model, "triton")
        got = model.forward_packed(ids, mask).hidden
    result["llama"] = rel_err(got, expected)
    # A sliding layer whose window (3) is shorter than the sequences: the kernels take the window, the
    # torch backend runs the banded reference; forward and gradients agree.
    config = tiny_config("gemma3_text", sliding_window=3)
    for backend in ("torch", "triton"):
        model = bi_model("gemma3_text", state=family_state("gemma3_text"), config=config, backend=backend)
        hidden = model.forward_packed(ids, mask).hidden
        hidden.square().sum().backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        result[backend] = (hidden.detach(), grads)
    result["gemma3_window"] = rel_err(result["triton"][0], result["torch"][0])
    result["gemma3_window_grads"] = rel_err(result["triton"][1], result["torch"][1])
    print(json.dumps({{k: v for k, v in result.items() if isinstance(v, float)}}))
""")


def test_triton_backend_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = _TRITON_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"llama", "gemma3_window", "gemma3_window_grads"}
    assert all(value <= TOL for value in result.values()), result


# ------------------------------------------------------------------- batches prepared on the host

class ValueReads:
    """Counts the tensor operations that read values back to the host (on a CUDA tensor: a host sync):
    ``.tolist()``, ``.item()``, ``bool()``/``int()``/``float()`` of a tensor, ``nonzero``, boolean-mask
    indexing, ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``. On the CPU this
    proves that a code path reads nothing from its tensors (what would sync on a GPU) where
    ``torch.cuda.set_sync_debug_mode`` cannot run. Code inside custom ops (the kernels) is not seen."""

    METHODS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy",
               "masked_select", "unique", "unique_consecutive"}
    ATEN = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "unique_dim", "unique_consecutive")

    def __init__(self):
        from collections import Counter
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode
        self.seen = Counter()
        outer = self

        class Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", str(func))
                if name in ValueReads.METHODS:
                    outer.seen[name] += 1
                return func(*args, **(kwargs or {}))

        class Aten(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = str(func)
                if any(part in name for part in ValueReads.ATEN):
                    outer.seen[name] += 1
                elif "repeat_interleave" in name and kwargs.get("output_size") is None and (
                        len(args) < 3 or args[-1] is None):
                    outer.seen[name] += 1
                elif name.startswith("aten.index") and any(
                        isinstance(i, torch.Tensor) and i.dtype == torch.bool
                        for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())):
                    outer.seen[name + " (bool mask)"] += 1
                return func(*args, **kwargs)

        self._modes = (Functions(), Aten())

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False


def test_value_reads_sees_what_would_sync():
    x = torch.tensor([1, 0, 2])
    with ValueReads() as reads:
        x.tolist(), bool(x[0]), x[x > 0], torch.repeat_interleave(x, x), torch.repeat_interleave(x, x, output_size=3)
    assert reads.seen["tolist"] == 1 and reads.seen["__bool__"] == 1
    assert sum(n for name, n in reads.seen.items() if "repeat_interleave" in name) == 1
    assert any("bool mask" in name for name in reads.seen)


def test_pack_sequences_is_built_on_the_host():
    """pack_sequences equals pack() of the right-padded mask, field by field, from lists or tensors, and records
    cu_seqlens' values (the attention and pooling checks then never read them back)."""
    from llm2vec_fast.validation import _cached, cu_seqlens_values
    g = torch.Generator().manual_seed(7)
    for lengths in [(3, 1, 4), (0, 2), (5,), (), (2, 0, 0, 3)]:
        sequences = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]
        mask = torch.zeros((len(lengths), max(lengths, default=0)), dtype=torch.bool)
        for row, n in enumerate(lengths):
            mask[row, :n] = True
        expected = pack(attention_mask=mask)
        for given in (sequences, [torch.tensor(s, dtype=torch.long) for s in sequences]):
            got = pack_sequences(given)
            for name in ("position_ids", "cu_seqlens", "indices"):
                assert getattr(got, name).dtype == getattr(expected, name).dtype
                assert torch.equal(getattr(got, name), getattr(expected, name)), (lengths, name)
            assert (got.max_seqlen, got.batch_size, got.seqlen) == \
                (expected.max_seqlen, expected.batch_size, expected.seqlen)
            assert got.input_ids.tolist() == [t for s in sequences for t in s]
            if lengths:
                assert _cached(got.cu_seqlens) is not None
                assert cu_seqlens_values(got.cu_seqlens) == got.cu_seqlens.tolist()
                moved = got.to("cpu")
                assert moved.cu_seqlens is got.cu_seqlens
    with pytest.raises(ValueError, match="flat list of token ids"):
        pack_sequences([[1, 2], [[3, 4]]])


def test_registered_cu_seqlens_are_still_checked():
    """A record only spares reading values known to be right: other totals, in-place changes and invalid
    values are checked (and rejected) as before."""
    from llm2vec_fast.validation import _cached, check_cu_seqlens, register_cu_seqlens
    like = torch.zeros(5, 1)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert register_cu_seqlens(cu, [0, 2, 5])
    with ValueReads() as reads:
        assert check_cu_seqlens(cu, 5, like=like) == 3
    assert not reads.seen
    with pytest.raises(ValueError, match="must end at the total token count T=4"):
        check_cu_seqlens(cu, 4, like=like)
    cu[2] = 1  # in place: the version changes and the record no longer applies
    with pytest.raises(ValueError, match="non-decreasing"):
        check_cu_seqlens(cu, 1, like=like)
    for values in ([1, 2, 5], [0, 3, 2], [0]):
        bad = torch.tensor(values, dtype=torch.int32)
        assert not register_cu_seqlens(bad, values) and _cached(bad) is None
    assert not register_cu_seqlens(torch.tensor([0, 2], dtype=torch.int64), [0, 2])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_host_packed_forward_reads_nothing_back(family):
    """forward_packed + pool of a batch from pack_sequences reads no value from its tensors (on a GPU each
    read would be a host sync): lengths, max_seqlen and cu_seqlens' values come from the host. Mistral runs
    with a window shorter than the batch's longest sequence (the windowed attention path)."""
    config = tiny_config(family, sliding_window=4) if family == "mistral" else None
    model = bi_model(family, config=config)
    g = torch.Generator().manual_seed(5)
    sequences = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (6, 1, 3, 9)]
    with torch.no_grad():
        batch = pack_sequences(sequences)
        with ValueReads() as reads:
            out = forward_packed(model, batch=batch)
            for mode in ("mean", "weighted_mean", "last_token", "bos_token"):
                lf.pool(out.hidden, cu_seqlens=out.cu_seqlens, mode=mode, normalize=True)
    assert not reads.seen, dict(reads.seen)
