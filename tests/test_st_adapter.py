"""Tests of ``llm2vec_fast.encoder.st_adapter`` beyond tests/test_encoder.py's: the adapter behaves as a plain
``SentenceTransformer`` of its saved folder does (argument checks, return forms, ``max_seq_length``, token
embeddings), and a peft encoder trained by ``SentenceTransformerTrainer`` reloads its checkpoints (resume,
best model). Tiny random checkpoints of tests/fixtures/llm2vec, on the CPU.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from test_encoder import INPUTS, SAME_ATOL, checkpoints, encoders, reference  # noqa: F401  (fixtures)

TEXTS = [t for t in INPUTS if isinstance(t, str)][:5]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, checkpoints):  # noqa: F811
    """(adapter, the same folder loaded as a plain SentenceTransformer): the reference for what encode returns."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.encoder.st_adapter import to_sentence_transformer
    encoder = LLM2Vec.from_pretrained(checkpoints("llama"), enable_bidirectional=reference("llama")[
        "enable_bidirectional"], max_length=64)
    model = to_sentence_transformer(encoder, prompts={"query": "Retrieve the passage:"})
    folder = str(tmp_path_factory.mktemp("st_adapter") / "st")
    model.save(folder)
    return model, sentence_transformers.SentenceTransformer(folder, trust_remote_code=True)


def test_unknown_encode_keywords_raise(saved):
    """A misspelt option would otherwise give unnormalised / uncut / unprompted embeddings without a word;
    SentenceTransformer.encode raises ValueError naming it, so must the adapter. Its own keywords still pass."""
    model, plain = saved
    for typo in ({"normalize": True}, {"truncate": 64}, {"prompt_nme": "query"}):
        (name,) = typo
        with pytest.raises(ValueError, match=name):
            plain.encode(TEXTS[:2], **typo)
        with pytest.raises(ValueError, match=rf"does not use: \['{name}'\]"):
            model.encode(TEXTS[:2], **typo)
    with pytest.raises(ValueError, match="processing_kwargs is not supported.*max_seq_length"):
        model.encode(TEXTS[:2], processing_kwargs={"text": {"max_length": 8}})
    with pytest.raises(ValueError, match="processing_kwargs is not supported"):
        plain.encode(TEXTS[:2], processing_kwargs={"text": {"max_length": 8}})  # the module's preprocess
    expected = model.encode(TEXTS[:2], prompt_name="query")
    assert np.array_equal(model.encode(TEXTS[:2], prompt_name="query", task="query", processing_kwargs=None),
                          expected)
    assert np.array_equal(model.encode(sentences=TEXTS[:2], prompt_name="query"), expected)


@pytest.mark.parametrize("precision", ["float32", None, "ubinary"])
def test_return_forms_match_sentence_transformers(saved, precision):
    """Every combination of one string / a list with convert_to_numpy / convert_to_tensor (and precision None,
    which SentenceTransformer reads as float32) gives the plain SentenceTransformer's type, shape and dtype,
    and the same values."""
    model, plain = saved
    for inputs in (TEXTS[0], TEXTS[:3]):
        for flags in ({}, {"convert_to_numpy": False}, {"convert_to_tensor": True},
                      {"convert_to_numpy": False, "convert_to_tensor": True}, {"convert_to_numpy": True}):
            where = (inputs if isinstance(inputs, str) else "list", flags)
            got = model.encode(inputs, precision=precision, **flags)
            want = plain.encode(inputs, precision=precision, **flags)
            assert type(got) is type(want), where
            if isinstance(want, list):
                assert len(got) == len(want), where
                got, want = torch.stack(got), torch.stack(want)
            assert got.shape == want.shape and got.dtype == want.dtype, where
            got, want = torch.as_tensor(got).double(), torch.as_tensor(want).double()
            assert torch.allclose(got, want, atol=SAME_ATOL, rtol=0), where  # ubinary: the same bits


def test_max_seq_length_setter(saved):
    """model.max_seq_length = n (SentenceTransformer's setter) sets the encoder's max_length, so that the next
    encode truncates there, on the adapter and on a plain SentenceTransformer; a bad value raises."""
    model, plain = saved
    long_text = " ".join(TEXTS)
    for st in (model, plain):
        before = st.max_seq_length
        try:
            st.max_seq_length = 8
            assert st.max_seq_length == 8 and st[0].encoder.max_length == 8
            got = st.encode([long_text], convert_to_tensor=True)
            assert torch.allclose(got, st[0].encoder.encode([long_text], show_progress_bar=False), atol=SAME_ATOL)
            tokens = st.encode([long_text], output_value="token_embeddings")[0]
            assert tokens.shape[0] == 8
            for bad in (0, -1, 2.5, "64", True):
                with pytest.raises(ValueError, match=rf"max_seq_length must be a positive int, got {bad!r}"):
                    st.max_seq_length = bad
            assert st.max_seq_length == 8
        finally:
            st[0].encoder.max_length = before
        assert not torch.allclose(st.encode([long_text], convert_to_tensor=True), got, atol=1e-3)


def test_plain_sentence_transformer_token_embeddings(saved):
    """A plain SentenceTransformer of the saved folder gives output_value="token_embeddings" (the module's
    forward returns them in the padded layout its encode slices with attention_mask): per text the tokens the
    adapter's own token_embeddings give; output_value=None carries them too."""
    model, plain = saved
    texts = TEXTS + [["Retrieve the passage:", TEXTS[0]]]
    want = model.encode(texts, output_value="token_embeddings")
    got = plain.encode(texts, output_value="token_embeddings", batch_size=3)
    assert isinstance(got, list) and len(got) == len(want)
    lengths = {t.shape[0] for t in want}
    assert len(lengths) > 1  # padding was involved
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.allclose(a, b, atol=SAME_ATOL)
    assert torch.allclose(plain.encode(TEXTS[1], output_value="token_embeddings"), want[1], atol=SAME_ATOL)
    dicts = plain.encode(TEXTS[:2], output_value=None)
    expected = model.encode(TEXTS[:2], convert_to_tensor=True)
    for row, item in enumerate(dicts):
        mask = item["attention_mask"].bool()
        assert torch.allclose(item["token_embeddings"][mask], want[row], atol=SAME_ATOL)
        assert torch.allclose(item["sentence_embedding"], expected[row], atol=SAME_ATOL)



def test_output_value_none_dicts_mask_as_sentence_transformers(saved):
    """SentenceTransformer's output_value=None dicts carry the attention_mask that code selects the real tokens
    with (item["token_embeddings"][item["attention_mask"].bool()]); the adapter's must too (no padding: all
    ones), so that the same code gives the same tokens on both."""
    model, plain = saved
    texts = TEXTS[:3] + [["Retrieve the passage:", TEXTS[0]]]
    for got, want in zip(model.encode(texts, output_value=None), plain.encode(texts, output_value=None)):
        mask, want_mask = got["attention_mask"].bool(), want["attention_mask"].bool()
        assert got["attention_mask"].dtype == want["attention_mask"].dtype and mask.all()
        assert torch.equal(got["input_ids"][mask], want["input_ids"][want_mask])
        assert torch.allclose(got["token_embeddings"][mask], want["token_embeddings"][want_mask], atol=SAME_ATOL)
    assert model.encode(TEXTS[0], output_value=None)["attention_mask"].shape == \
        model.encode(TEXTS[0], output_value=None)["input_ids"].shape


def test_tensor_outputs_on_the_encode_device(saved, monkeypatch):
    """SentenceTransformer.encode leaves convert_to_tensor's tensor (and convert_to_numpy=False's rows) on the
    device it encoded on, so that util.semantic_search and model.similarity run there; LLM2Vec.encode returns
    CPU rows, which the adapter must move. Quantised rows, as there, are CPU tensors. A CPU-only stand-in for
    a GPU: the encoder's encode runs on the CPU and the adapter is asked for the meta device."""
    model, _ = saved
    real_encode, devices = model.llm2vec.encode, []

    def encode(*args, device=None, **kwargs):
        devices.append(device)
        return real_encode(*args, device="cpu", **kwargs)

    monkeypatch.setattr(model.llm2vec, "encode", encode)
    assert model.encode(TEXTS[:2], convert_to_tensor=True, device="meta").device.type == "meta"
    assert model.encode(TEXTS[0], convert_to_tensor=True, device="meta").device.type == "meta"
    assert {row.device.type for row in model.encode(TEXTS[:2], convert_to_numpy=False, device="meta")} == {"meta"}
    assert isinstance(model.encode(TEXTS[:2], device="meta"), np.ndarray)
    quantised = model.encode(TEXTS[:2], convert_to_tensor=True, device="meta", precision="ubinary")
    assert quantised.device.type == "cpu" and quantised.dtype == torch.uint8
    assert devices == ["meta"] * 5

# ----------------------------------------------------------------------------- peft checkpoints in training

QUERIES = ["how do tides work", "what is a lognormal law", "why is the sky blue", "who wrote Hamlet"]
PASSAGES = ["The moon pulls the sea.", "Its logarithm is normal.", "Rayleigh scattering of light.",
            "A play by Shakespeare."]


def _peft_model(checkpoints):  # noqa: F811
    from peft import LoraConfig, get_peft_model

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.encoder.st_adapter import to_sentence_transformer
    encoder = LLM2Vec.from_pretrained(checkpoints("mistral"), max_length=48)
    torch.manual_seed(0)
    encoder.model = get_peft_model(encoder.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    return to_sentence_transformer(encoder)


def _lora(model) -> dict:
    return {k: v.detach().clone() for k, v in model[0].encoder.model.state_dict().items() if ".lora_" in k}


def _saved_lora(model, checkpoint: str) -> dict:
    """A checkpoint's saved adapter under the live model's keys."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    live = model[0].encoder.model
    before = _lora(model)
    set_peft_model_state_dict(live, load_file(os.path.join(checkpoint, "peft_adapter", "adapter_model.safetensors")))
    saved = _lora(model)
    live.load_state_dict(before, strict=False)
    return saved


def _train(model, out, resume=None, **extra):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    data = Dataset.from_dict({"anchor": QUERIES * 2, "positive": PASSAGES * 2})
    args = SentenceTransformerTrainingArguments(output_dir=str(out), per_device_train_batch_size=4,
                                                num_train_epochs=1, learning_rate=1e-2, report_to=[], use_cpu=True,
                                                save_strategy="steps", save_steps=1, **extra)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                                         loss=MultipleNegativesRankingLoss(model))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_peft_checkpoints_resume_and_load_best(checkpoints, tmp_path):  # noqa: F811
    """Checkpoints of a LoRA encoder hold the adapter next to the merged weights: resume_from_checkpoint
    continues as the uninterrupted run (same final adapter) and load_best_model_at_end restores the best
    checkpoint's adapter, base weights untouched; a checkpoint without the adapter raises a clear ValueError."""
    pytest.importorskip("sentence_transformers")
    from llm2vec_fast.encoder.st_adapter import load_sentence_transformer
    model = _peft_model(checkpoints)
    base = {k: v.clone() for k, v in model[0].encoder.model.state_dict().items() if ".lora_" not in k}
    _train(model, tmp_path / "run")
    final = _lora(model)

    resumed = _peft_model(checkpoints)
    _train(resumed, tmp_path / "resumed", resume=str(tmp_path / "run" / "checkpoint-1"))
    for key, value in _lora(resumed).items():
        assert torch.allclose(value, final[key], atol=1e-6), key

    # the loss falls on the training data, so with greater_is_better the first checkpoint is the best one
    best = _peft_model(checkpoints)
    trainer = _train(best, tmp_path / "best", eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                     metric_for_best_model="eval_loss", greater_is_better=True)
    chosen, last = trainer.state.best_model_checkpoint, str(tmp_path / "best" / "checkpoint-2")
    assert os.path.basename(chosen) == "checkpoint-1"
    want, other = _saved_lora(best, chosen), _saved_lora(best, last)
    now = _lora(best)
    assert all(torch.equal(now[k], want[k]) for k in want)
    assert any(not torch.allclose(now[k], other[k], atol=1e-6) for k in want)
    state = best[0].encoder.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    embeddings = best.encode(QUERIES, convert_to_tensor=True)
    merged = load_sentence_transformer(chosen).encode(QUERIES, convert_to_tensor=True)
    assert torch.allclose(embeddings, merged, atol=1e-4)

    # A checkpoint holding the merged weights only cannot be split back: refused by name, weights unchanged.
    bare = str(tmp_path / "bare")
    shutil.copytree(chosen, bare)
    shutil.rmtree(os.path.join(bare, "peft_adapter"))
    with pytest.raises(ValueError, match="holds the adapter merged into the weights only"):
        best.load_state_dict(load_sentence_transformer(bare).state_dict())
    # ... and so is a checkpoint merged from another base model.
    other_base = _peft_model(checkpoints)
    with torch.no_grad():
        next(p for n, p in other_base[0].encoder.model.named_parameters() if "q_proj.base_layer" in n).add_(0.5)
    before = _lora(other_base)
    with pytest.raises(ValueError, match="not merged from this encoder's base model"):
        other_base.load_state_dict(load_sentence_transformer(chosen).state_dict())
    assert all(torch.equal(v, before[k]) for k, v in _lora(other_base).items())
    assert all(torch.equal(now[k], v) for k, v in _lora(best).items())
