"""Tests of ``llm2vec_fast.encoder.mteb_adapter``: an ``LLM2Vec`` evaluated by mteb 2.x's own
``mteb.evaluate`` on tiny in-memory tasks (a retrieval and an STS task defined here, nothing downloaded),
with the tiny random checkpoints of tests/fixtures/llm2vec. mteb's result cache and HF caches point
into tmp paths; the evaluation runs with the network refused at the socket level.
"""
from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch

from test_encoder import write_checkpoint

QUERY_INSTRUCTION = "Given a question, retrieve passages that answer it"
DOCS = {
    "d0": "The tide rises and falls twice a day because of the moon.",
    "d1": "Bread is baked from flour, water, salt and yeast.",
    "d2": "A violin has four strings tuned in fifths.",
    "d3": "Glaciers carve valleys as they slowly move downhill.",
    "d4": "The printing press spread books across Europe.",
    "d5": "Honey bees communicate with a waggle dance.",
    "d6": "Copper conducts electricity better than iron.",
    "d7": "Chess openings are studied for centuries.",
    "d8": "Volcanic islands form above hot spots in the mantle.",
    "d9": "Tea leaves are dried, rolled and oxidised.",
}
QUERIES = {"q0": "d0", "q1": "d3", "q2": "d6", "q3": "d9"}  # each query is the text of its relevant document
STS_PAIRS = [  # identical pairs score 5, unrelated pairs 0
    ("The cat sleeps on the warm windowsill.", "The cat sleeps on the warm windowsill.", 5.0),
    ("Rain is expected in the afternoon.", "Rain is expected in the afternoon.", 5.0),
    ("She plays the piano every evening.", "She plays the piano every evening.", 5.0),
    ("The train left the station late.", "Apples grow on trees in the orchard.", 0.0),
    ("A river flows into the sea.", "He repaired the bicycle tyre.", 0.0),
    ("The museum opens at nine.", "Owls hunt at night.", 0.0),
]

GRADED_PAIRS = [  # (sentence1, sentence2, similarity 0-5)
    ("The cat sleeps on the warm windowsill.", "A cat is sleeping by the window.", 4.5),
    ("Rain is expected in the afternoon.", "It will probably rain later today.", 4.0),
    ("She plays the piano every evening.", "He repaired the bicycle tyre.", 0.5),
    ("The train left the station late.", "Apples grow on trees in the orchard.", 0.0),
    ("A river flows into the sea.", "The river reaches the ocean.", 4.2),
    ("The museum opens at nine.", "Owls hunt at night.", 0.0),
    ("Stocks fell sharply today.", "The market dropped a lot today.", 4.4),
    ("He is reading a novel.", "The dog barks at strangers.", 0.2),
]


@pytest.fixture(scope="module")
def mteb_env(tmp_path_factory):
    """mteb imported with its caches in a tmp folder (its default result cache is made at import time)."""
    root = tmp_path_factory.mktemp("mteb_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTEB_CACHE", str(root / "mteb"))
        mp.setenv("HF_HOME", str(root / "hf"))
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf" / "datasets"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mteb = pytest.importorskip("mteb")
        yield mteb, root


@pytest.fixture(scope="module")
def tasks(mteb_env):
    """Two in-memory tasks: retrieval (10 documents, 4 queries) and STS (6 pairs)."""
    from datasets import Dataset
    from mteb.abstasks import AbsTaskRetrieval, AbsTaskSTS
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
    from mteb.abstasks.task_metadata import TaskMetadata

    common = dict(reference="https://github.com/embeddings-benchmark/mteb", dataset={"path": "NA", "revision": "NA"},
                  category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"], date=("2024-01-01", "2024-01-01"),
                  dialect=["Written"], domains=[], task_subtypes=[], license="cc-by-4.0",
                  annotations_creators="derived", modalities=["text"], sample_creation="found", bibtex_citation="")

    class TinyRetrieval(AbsTaskRetrieval):
        metadata = TaskMetadata(type="Retrieval", name="L2VFastTinyRetrieval", main_score="ndcg_at_10",
                                description="Ten short documents; each query repeats its document.",
                                prompt={"query": QUERY_INSTRUCTION}, **common)

        def load_data(self, num_proc=None, **kwargs):
            split = RetrievalSplitData(
                queries=Dataset.from_list([{"id": q, "text": DOCS[d]} for q, d in QUERIES.items()]),
                corpus=Dataset.from_list([{"id": d, "text": t, "title": ""} for d, t in DOCS.items()]),
                relevant_docs={q: {d: 1} for q, d in QUERIES.items()},
                top_ranked=None)
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    class TinySTS(AbsTaskSTS):
        metadata = TaskMetadata(type="STS", name="L2VFastTinySTS", main_score="cosine_spearman",
                                description="Identical and unrelated sentence pairs.", **common)
        min_score = 0
        max_score = 5

        def load_data(self, num_proc=None, **kwargs):
            s1, s2, score = (list(x) for x in zip(*STS_PAIRS))
            self.dataset = {"test": Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": score})}
            self.data_loaded = True

    return TinyRetrieval, TinySTS


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return write_checkpoint("llama", str(tmp_path_factory.mktemp("mteb_ckpt") / "llama"))


@pytest.fixture(scope="module")
def encoder(llama_folder):
    from llm2vec_fast import LLM2Vec
    return LLM2Vec.from_pretrained(llama_folder, pooling_mode="mean", skip_instruction=True, max_length=64,
                                   doc_max_length=48)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def spy_on(model):
    """Records (task name, prompt type, texts, returned embeddings) of each encode call."""
    calls = []
    encode = model.encode

    def recording(inputs, *, task_metadata, prompt_type=None, **kwargs):
        out = encode(inputs, task_metadata=task_metadata, prompt_type=prompt_type, **kwargs)
        texts = [t for batch in inputs for t in batch["text"]]
        calls.append((task_metadata.name, getattr(prompt_type, "value", prompt_type), texts, out))
        return out
    model.encode = recording
    return calls


def evaluate(mteb, model, tasks, folder):
    return mteb.evaluate(model, [task() for task in tasks], cache=mteb.ResultCache(str(folder)), co2_tracker=False,
                         show_progress_bar=False, encode_kwargs={"batch_size": 4, "show_progress_bar": False},
                         overwrite_strategy="always")


def scores_of(result, name):
    (task_result,) = [r for r in result.task_results if r.task_name == name]
    (scores,) = task_result.scores["test"]
    return scores


def test_mteb_evaluate_runs_the_adapter(mteb_env, tasks, encoder, no_network, tmp_path):
    """mteb.evaluate on a retrieval and an STS task: finite scores, and every embedding mteb got is
    LLM2Vec.encode's on the [instruction, text] pairs llm2vec's MTEB evaluation uses."""
    mteb, home = mteb_env
    from mteb.models.models_protocols import EncoderProtocol

    from llm2vec_fast.encoder.mteb_adapter import to_mteb
    model = to_mteb(encoder)
    assert isinstance(model, EncoderProtocol)
    calls = spy_on(model)
    result = evaluate(mteb, model, tasks, tmp_path / "results")

    retrieval, sts = scores_of(result, "L2VFastTinyRetrieval"), scores_of(result, "L2VFastTinySTS")
    for scores in (retrieval, sts):
        # nauc_* (an AUC over per-query scores) is NaN by design when every query scores the same
        numbers = {k: v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and not k.startswith("nauc_")}
        assert len(numbers) >= 8 and all(math.isfinite(v) for v in numbers.values()), scores
    assert 0.0 <= retrieval["ndcg_at_10"] <= 1.0
    # identical pairs have cosine 1, unrelated ones less: whatever the order among the unrelated pairs,
    # Spearman against [5, 5, 5, 0, 0, 0] is then between 0.878 and 0.934
    assert 0.87 <= sts["cosine_spearman"] <= 0.94, sts

    # what the adapter returned: queries with the task's prompt (llm2vec-formatted), documents with "",
    # both sides of STS with the STS abstask prompt
    seen = {(name, kind) for name, kind, _, _ in calls}
    assert seen == {("L2VFastTinyRetrieval", "query"), ("L2VFastTinyRetrieval", "document"),
                    ("L2VFastTinySTS", None)}, seen
    instructions = {("L2VFastTinyRetrieval", "query"): QUERY_INSTRUCTION + ":",
                    ("L2VFastTinyRetrieval", "document"): "",
                    ("L2VFastTinySTS", None): "Retrieve semantically similar text:"}
    for name, kind, texts, out in calls:
        assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (len(texts), 128)
        expected = encoder.encode([[instructions[name, kind], t] for t in texts], batch_size=4,
                                  show_progress_bar=False)
        assert np.allclose(out, expected.numpy(), atol=1e-5, rtol=0), (name, kind)
    query_texts = [texts for name, kind, texts, _ in calls if kind == "query"][0]
    assert sorted(query_texts) == sorted(DOCS[d] for d in QUERIES.values())

    # results were cached where we said, under the local name and fingerprint revision
    meta = model.mteb_model_meta
    assert meta.name == "llm2vec-fast/llama-2" and meta.revision.startswith("local-")
    assert meta.embed_dim == 128 and meta.max_tokens == 64 and meta.similarity_fn_name.value == "cosine"
    saved = list((tmp_path / "results").rglob("L2VFastTinyRetrieval.json"))
    assert len(saved) == 1 and meta.revision in saved[0].parts
    assert not list((home / "mteb").rglob("*.json"))  # nothing in mteb's default cache


def test_retrieval_with_identical_inputs_is_perfect(mteb_env, tasks, encoder, no_network, tmp_path):
    """Per-task instruction "" makes each query the same [instruction, text] input as its document: the
    relevant document ranks first for every query, so nDCG@10, MRR@10 and recall@1 are 1."""
    mteb, _ = mteb_env
    from llm2vec_fast.encoder.mteb_adapter import to_mteb
    model = to_mteb(encoder, instructions={"L2VFastTinyRetrieval": ""}, batch_size=3)
    calls = spy_on(model)
    scores = scores_of(evaluate(mteb, model, tasks[:1], tmp_path), "L2VFastTinyRetrieval")
    assert scores["ndcg_at_10"] == pytest.approx(1.0, abs=1e-6)
    assert scores["mrr_at_10"] == pytest.approx(1.0, abs=1e-6)
    assert scores["recall_at_1"] == pytest.approx(1.0, abs=1e-6)
    assert scores["main_score"] == scores["ndcg_at_10"]
    ((_, _, queries, q_emb),) = [c for c in calls if c[1] == "query"]
    ((_, _, docs, d_emb),) = [c for c in calls if c[1] == "document"]
    sims = model.similarity(q_emb, d_emb)
    for row, text in enumerate(queries):
        assert float(sims[row, docs.index(text)]) == pytest.approx(1.0, abs=1e-5)


def test_instruction_resolution_and_metadata(mteb_env, tasks, encoder):
    """Which instruction each side gets, and the locally built ModelMeta."""
    from mteb.types import PromptType

    from llm2vec_fast.encoder.mteb_adapter import llm2vec_instruction, to_mteb
    retrieval, sts = (task.metadata for task in tasks)
    default = to_mteb(encoder)
    assert default.get_instruction(retrieval, PromptType.query) == QUERY_INSTRUCTION + ":"
    assert default.get_instruction(retrieval, PromptType.document) == ""
    assert default.get_instruction(sts, None) == "Retrieve semantically similar text:"
    custom = to_mteb(encoder, instructions={"L2VFastTinyRetrieval": "Find it", "STS": "Same meaning?"},
                     document_instruction="Passage", name="me/tiny", revision="v1")
    assert custom.get_instruction(retrieval, PromptType.query) == "Find it"  # verbatim, by task name
    assert custom.get_instruction(retrieval, PromptType.document) == "Passage"
    assert custom.get_instruction(sts, None) == "Same meaning?"  # by task type
    assert to_mteb(encoder, query_instruction="Q").get_instruction(sts, None) == "Q"
    assert llm2vec_instruction("Retrieve text.") == "Retrieve text:" and llm2vec_instruction("") == ""

    meta = custom.mteb_model_meta
    assert (meta.name, meta.revision, meta.embed_dim) == ("me/tiny", "v1", 128)
    assert meta.n_parameters == sum(p.numel() for p in encoder.model.parameters())
    assert meta.experiment_kwargs["pooling_mode"] == "mean" and "instructions" in meta.experiment_kwargs
    assert default.mteb_model_meta.revision == to_mteb(encoder).mteb_model_meta.revision  # deterministic
    assert default.mteb_model_meta.experiment_name != meta.experiment_name

    a, b = np.random.default_rng(0).standard_normal((2, 3, 128)).astype(np.float32)
    expected = torch.nn.functional.normalize(torch.from_numpy(a), dim=1) @ \
        torch.nn.functional.normalize(torch.from_numpy(b), dim=1).T
    assert torch.allclose(torch.as_tensor(default.similarity(a, b)), expected, atol=1e-5)
    assert torch.allclose(torch.as_tensor(default.similarity_pairwise(a, b)), expected.diagonal(), atol=1e-5)
    with pytest.raises(ValueError, match="organization"):
        to_mteb(encoder, name="no-slash")
    with pytest.raises(TypeError):
        to_mteb(encoder, instructions={"STS": 3})


def test_instruction_keys_follow_mteb(mteb_env, tasks, encoder):
    """instructions takes every key form mteb's model_prompts take (task name, task type, prompt type,
    "{name or type}-{prompt type}") and picks the most specific one as mteb's get_prompt_name does (documents:
    only keys naming the document side); a key of no such form raises ValueError when the adapter is made."""
    from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
    from mteb.types import PromptType

    from llm2vec_fast.encoder.mteb_adapter import to_mteb
    mteb, _ = mteb_env
    sci = mteb.get_task("SciFact").metadata
    retrieval, sts = (task.metadata for task in tasks)
    for metadata in (sci, retrieval):
        name, kind = metadata.name, metadata.type
        keys = [f"{name}-query", name, f"{kind}-query", kind, "query", f"{name}-document", f"{kind}-document",
                "document"]
        instructions = {key: f"instruction for {key}" for key in keys}
        while instructions:
            model = to_mteb(encoder, instructions=instructions, query_instruction="fallback q",
                            document_instruction="fallback d")
            for prompt_type in (PromptType.query, PromptType.document, None):
                visible = instructions
                if prompt_type == PromptType.document:  # a bare task name or type is the query side's
                    visible = {k: v for k, v in instructions.items() if k.endswith("document")}
                key = get_prompt_name(visible, metadata, prompt_type)
                fallback = "fallback d" if prompt_type == PromptType.document else "fallback q"
                want = visible[key] if key is not None else fallback
                assert model.get_instruction(metadata, prompt_type) == want, (sorted(instructions), prompt_type)
            del instructions[next(iter(instructions))]  # the most specific of each side goes first

    for bad in ("Scifact", "SciFact-queries", "STS-doc", "Retrieve", "query-document", "L2VFastTinySTS-passage"):
        with pytest.raises(ValueError, match=f"no task name, task type or prompt type: \\['{bad}'\\]"):
            to_mteb(encoder, instructions={"SciFact": "fine", bad: "x"})
    with pytest.raises(ValueError, match="did you mean 'SciFact'"):
        to_mteb(encoder, instructions={"Scifact": "x"})
    for good in ("SciFact", "SciFact-query", "Retrieval-document", "query", "document", "STS"):
        AbsEncoder.validate_task_to_prompt_name({good: "x"})  # mteb takes these too
        to_mteb(encoder, instructions={good: "x"})
    to_mteb(encoder, instructions={"L2VFastTinySTS": "x", "L2VFastTinyRetrieval-query": "y"})  # custom tasks


def test_metadata_tells_apart_what_changes_the_embeddings(mteb_env, tasks, encoder, llama_folder, no_network,
                                                          tmp_path):
    """Two wrappers of one checkpoint that embed differently (causal vs bidirectional, dtype, pooling, lengths,
    skip_instruction, normalisation, an unmerged adapter's configuration) get different ModelMeta, so mteb's
    result cache never hands one the other's scores; settings changed on the encoder show in the metadata."""
    mteb, _ = mteb_env
    from peft import LoraConfig, get_peft_model

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.encoder.mteb_adapter import to_mteb

    def load(**kwargs):
        return LLM2Vec.from_pretrained(llama_folder, **{"pooling_mode": "mean", "max_length": 64, **kwargs})

    class GradedSTS(tasks[1]):  # graded pairs: the two models rank them differently
        metadata = tasks[1].metadata.model_copy(update={"name": "L2VFastGradedSTS"})

        def load_data(self, num_proc=None, **kwargs):
            from datasets import Dataset
            s1, s2, score = (list(x) for x in zip(*GRADED_PAIRS))
            self.dataset = {"test": Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": score})}
            self.data_loaded = True

    causal, bidirectional = to_mteb(load(enable_bidirectional=False)), to_mteb(load())
    cache = mteb.ResultCache(str(tmp_path / "shared"))
    scores = {}
    for label, model in (("causal", causal), ("bidirectional", bidirectional)):
        for where in ("shared", None):
            result = mteb.evaluate(model, [GradedSTS()], cache=cache if where else None, co2_tracker=False,
                                   show_progress_bar=False, encode_kwargs={"show_progress_bar": False})
            scores[label, where] = scores_of(result, "L2VFastGradedSTS")["cosine_spearman"]
    assert scores["causal", None] != pytest.approx(scores["bidirectional", None], abs=1e-3)
    assert scores["bidirectional", "shared"] == pytest.approx(scores["bidirectional", None], abs=1e-6)
    assert scores["causal", "shared"] == pytest.approx(scores["causal", None], abs=1e-6)
    assert causal.mteb_model_meta != bidirectional.mteb_model_meta
    assert causal.mteb_model_meta.experiment_kwargs["bidirectional"] is False
    assert bidirectional.mteb_model_meta.experiment_kwargs["bidirectional"] is True

    base = to_mteb(load())
    lora = load()
    lora.model = get_peft_model(lora.model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    lora_alpha = load()
    lora_alpha.model = get_peft_model(lora_alpha.model, LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj"]))
    lora_alpha.model.load_state_dict(lora.model.state_dict())  # the same weights, another scaling
    variants = {"dtype": to_mteb(load(dtype=torch.bfloat16)), "pooling": to_mteb(load(pooling_mode="eos_token")),
                "max_length": to_mteb(load(max_length=32)), "doc_max_length": to_mteb(load(doc_max_length=16)),
                "skip_instruction": to_mteb(load(skip_instruction=False)),
                "normalize": to_mteb(load(), normalize_embeddings=True), "lora": to_mteb(lora),
                "lora_alpha": to_mteb(lora_alpha)}
    metas = {label: model.mteb_model_meta for label, model in variants.items()}
    metas["base"] = base.mteb_model_meta
    for label, meta in metas.items():
        assert sum(meta == other for other in metas.values()) == 1, label
    assert to_mteb(load()).mteb_model_meta == metas["base"]  # deterministic

    before = base.mteb_model_meta
    base.encoder.pooling_mode = "weighted_mean"
    assert base.mteb_model_meta != before and base.mteb_model_meta.experiment_kwargs["pooling_mode"] == \
        "weighted_mean"


def test_revision_fingerprint_follows_the_weights(encoder):
    from llm2vec_fast.encoder.mteb_adapter import weights_fingerprint
    before = weights_fingerprint(encoder.model)
    param = next(encoder.model.parameters())
    with torch.no_grad():
        old = param.view(-1)[0].clone()
        param.view(-1)[0] += 1.0
        try:
            assert weights_fingerprint(encoder.model) != before
        finally:
            param.view(-1)[0] = old
    assert weights_fingerprint(encoder.model) == before


def test_unsupported_inputs_raise(mteb_env, tasks, encoder):
    from llm2vec_fast.encoder.mteb_adapter import to_mteb
    model = to_mteb(encoder)
    with pytest.raises(ValueError, match="precision"):
        model.encode([{"text": ["a"]}], task_metadata=tasks[1].metadata, precision="int8")
    with pytest.raises(ValueError, match="text"):
        model.encode([{"image": [object()]}], task_metadata=tasks[1].metadata)


def test_module_does_not_import_mteb():
    import subprocess
    import sys
    code = "import sys, llm2vec_fast.encoder.mteb_adapter; assert 'mteb' not in sys.modules"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
