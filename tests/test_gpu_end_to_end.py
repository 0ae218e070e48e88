"""End to end on a CUDA GPU (every test is marked ``gpu``): the encoder with each attention backend, and each
training recipe in bf16 through the GPU kernels (Triton attention with dropout, the loss, liger's fused
LM-head loss when installed). The CPU suite proves the semantics; these prove the same paths run on the GPU."""
import os

import pytest
import torch

from test_encoder import INPUTS, checkpoints  # noqa: F401  (a session fixture)
from test_training_contrastive import files, simcse_config, supervised_config  # noqa: F401  (files: a fixture)
from test_training_mntp import mntp_config

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def checkpoint(checkpoints):  # noqa: F811  (checkpoints: test_encoder's session fixture)
    return checkpoints("llama")


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_encode_on_the_gpu_matches_the_cpu(checkpoint, backend):
    """bf16 on the GPU against float32 on the CPU: every row's cosine above 0.995 (bf16 rounding over a few
    layers), with the attention of each backend (cuda falls back to Triton where its kernel does not apply)."""
    from llm2vec_fast import LLM2Vec, dispatch
    from llm2vec_fast.models import set_attention_backend
    if backend not in dispatch.available_backends("flash_attention", torch.device("cuda")):
        pytest.skip(f"{backend} cannot run here")
    texts = [t for t in INPUTS if isinstance(t, str)] + [["Retrieve the passage", "what is packing"]]
    expected = LLM2Vec.from_pretrained(checkpoint).encode(texts, show_progress_bar=False, device="cpu")
    encoder = LLM2Vec.from_pretrained(checkpoint, dtype=torch.bfloat16)
    set_attention_backend(encoder.model, backend)
    got = encoder.encode(texts, show_progress_bar=False, device="cuda")
    assert got.device.type == "cpu" and got.dtype == torch.float32 and torch.isfinite(got).all()
    nonzero = expected.norm(dim=1) > 0
    assert (_cosines(got[nonzero], expected[nonzero]) > 0.995).all()
    with encoder.start_multi_process_pool(["cuda:0"]) as pool:  # one GPU: one worker, loaded once
        pooled = encoder.encode(texts, pool=pool, show_progress_bar=False)
    assert (_cosines(pooled[nonzero], got[nonzero]) > 0.999).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_the_fused_norms_mlps_and_rope_run_in_gpu_encoding(checkpoint, monkeypatch, dtype):
    """On the GPU the lean layers' fused rms_norm, gated_activation and rotary_embedding pass their first-use
    probes (a failed probe would warn and fall back to transformers' forward, silently slower) and run in every
    layer."""
    import warnings

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.models import lean
    from llm2vec_fast.ops import gated, normalization, rotary

    monkeypatch.setattr(lean, "_PROBES", {})
    monkeypatch.setattr(lean, "_ATTENTION_PLANS", __import__("weakref").WeakKeyDictionary())
    calls = {"rms_norm": 0, "gated_activation": 0, "rotary_embedding": 0}
    for module, name in ((normalization, "rms_norm"), (gated, "gated_activation"), (rotary, "rotary_embedding")):
        real = getattr(module, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, counting)
    encoder = LLM2Vec.from_pretrained(checkpoint, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = encoder.encode([t for t in INPUTS if isinstance(t, str)], show_progress_bar=False, device="cuda")
    fallbacks = [str(w.message) for w in caught if str(w.message).startswith("llm2vec_fast: the ")]
    assert not fallbacks, fallbacks
    assert {key[0] for key in lean._PROBES} == {"rms_norm", "gated_activation"} and all(lean._PROBES.values())
    layers = encoder.model.config.num_hidden_layers
    assert calls["rms_norm"] >= 2 * layers + 1 and calls["gated_activation"] >= layers, calls
    assert calls["rotary_embedding"] >= 2 * layers, calls  # per attention module: its probe, then its calls
    assert len(lean._ATTENTION_PLANS) == layers and all(
        all(plan is not None for plan in plans.values()) for plans in lean._ATTENTION_PLANS.values())
    assert torch.isfinite(got).all()


def _gemma3_with_a_short_window(folder: str) -> str:
    """A tiny Gemma3 whose sliding layer's window (5) is shorter than most inputs, with the llama tokenizer."""
    import shutil

    from transformers import Gemma3TextConfig

    from llm2vec_fast.models import Gemma3BiModel
    from test_encoder import CASE_FILES, FIXTURES
    config = Gemma3TextConfig(vocab_size=704, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=64,
                              sliding_window=5, layer_types=["sliding_attention", "full_attention"], bos_token_id=1,
                              eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    Gemma3BiModel(config).save_pretrained(folder)
    for name in CASE_FILES[1:]:
        shutil.copy(os.path.join(FIXTURES, "llama", name), folder)
    return folder


@pytest.mark.parametrize("case", ["llama_causal", "gemma3_window"])
def test_causal_and_windowed_encoders_on_the_gpu(checkpoints, tmp_path, case):  # noqa: F811
    """The packed causal path (enable_bidirectional=False) and a sliding window in the Triton kernels, bf16 on the
    GPU, against float32 on the CPU."""
    from llm2vec_fast import LLM2Vec
    if case == "llama_causal":
        folder, options = checkpoints("llama_causal"), dict(enable_bidirectional=False, pooling_mode="last_token")
    else:
        folder, options = _gemma3_with_a_short_window(str(tmp_path / "gemma3")), {}
    texts = [t for t in INPUTS if isinstance(t, str)]
    expected = LLM2Vec.from_pretrained(folder, **options).encode(texts, show_progress_bar=False, device="cpu")
    encoder = LLM2Vec.from_pretrained(folder, dtype=torch.bfloat16, **options)
    assert encoder._packable()
    got = encoder.encode(texts, show_progress_bar=False, device="cuda")
    nonzero = expected.norm(dim=1) > 0
    assert torch.isfinite(got).all() and (_cosines(got[nonzero], expected[nonzero]) > 0.995).all()


def test_mntp_trains_on_the_gpu_in_bf16(tmp_path):
    from llm2vec_fast.training.loop import Trainer
    from llm2vec_fast.training.mntp import MNTPRecipe
    config = mntp_config(str(tmp_path), torch_dtype="bfloat16", max_steps=10, learning_rate=2e-2, device="cuda")
    recipe = MNTPRecipe(config)
    assert next(recipe.model.parameters()).device.type == "cuda"
    losses = Trainer(recipe).train()
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3]), losses
    assert os.path.isfile(os.path.join(config.output_dir, "checkpoint-10", "adapter_config.json"))


def test_lm_head_loss_on_the_gpu_equals_full_logits():
    """liger's fused linear cross-entropy when installed, else the chunked torch loss, against full logits."""
    from llm2vec_fast.training.mntp import lm_head_loss_sum
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(300, 256, generator=g).to("cuda", torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(1000, 256, generator=g) * 0.05).to("cuda", torch.bfloat16).requires_grad_(True)
    targets = torch.randint(0, 1000, (300,), generator=g).cuda()
    got = lm_head_loss_sum(hidden, weight, targets)
    got.backward()
    exact = torch.nn.functional.cross_entropy((hidden.double() @ weight.double().t()), targets, reduction="sum")
    assert abs(got.item() - exact.item()) <= 1e-2 * abs(exact.item())


@pytest.mark.parametrize("grad_cache", [None, 3])
def test_contrastive_recipes_train_on_the_gpu_in_bf16(files, tmp_path, grad_cache):  # noqa: F811
    from llm2vec_fast.training.contrastive import SimCSERecipe, SupervisedRecipe
    from llm2vec_fast.training.loop import Trainer
    for recipe in (SimCSERecipe(simcse_config(files, tmp_path / "simcse", torch_dtype="bfloat16", simcse_dropout=0.3,
                                              max_steps=6, device="cuda", grad_cache_chunk_size=grad_cache)),
                   SupervisedRecipe(supervised_config(files, tmp_path / "supervised", torch_dtype="bfloat16",
                                                      max_steps=6, device="cuda", grad_cache_chunk_size=grad_cache))):
        assert next(recipe.model.parameters()).device.type == "cuda"
        losses = Trainer(recipe).train()
        assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))), losses


def test_the_fused_lora_linear_trains_on_the_gpu(files, tmp_path, monkeypatch):  # noqa: F811
    """In a SimCSE step on the GPU every LoRA linear runs the fused ``lora_linear`` with gradients and its dropout
    (its first-use probe passing: no fallback warning), and the loss is finite."""
    import warnings

    from llm2vec_fast.models import lean
    from llm2vec_fast.ops import lora
    from llm2vec_fast.training.contrastive import SimCSERecipe
    from llm2vec_fast.training.loop import Trainer

    monkeypatch.setattr(lean, "_PROBES", {})
    calls = []
    real = lora.lora_linear

    def counting(*args, **kwargs):
        calls.append((torch.is_grad_enabled(), kwargs.get("dropout_p", args[6] if len(args) > 6 else 0.0)))
        return real(*args, **kwargs)
    monkeypatch.setattr(lora, "lora_linear", counting)
    recipe = SimCSERecipe(simcse_config(files, tmp_path / "simcse", torch_dtype="bfloat16", simcse_dropout=0.3,
                                        lora_dropout=0.1, max_steps=2, device="cuda"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = Trainer(recipe).train()
    fallbacks = [str(w.message) for w in caught if str(w.message).startswith("llm2vec_fast: the ")]
    assert not fallbacks, fallbacks
    loras = [m for m in recipe.model.modules() if lean.is_lora_linear(m)]
    trained = [p for grad, p in calls if grad]
    assert len(trained) >= 2 * len(loras) and all(p == 0.1 for p in trained)
    assert all(torch.isfinite(torch.tensor(losses))), losses
