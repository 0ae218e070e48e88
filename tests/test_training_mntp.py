"""MNTP recipe: masking statistics and the label shift, the LM-head loss (chunked == full logits, the
llm2vec causal-LM loss), training that lowers the loss, checkpoints that ``LLM2Vec.from_pretrained``
loads, evaluation (loss, accuracy, perplexity on held-out text, on schedule), and a 2-process gloo step
and evaluation equal to one process on the union batch.

Models are tiny random-weight checkpoints of the real architectures with the Mistral fixture's
tokenizer (tests/fixtures/llm2vec/mistral, 679 tokens), all on the CPU in float32.
"""
import json
import math
import os
import shutil

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "tests", "fixtures", "llm2vec", "mistral")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CORPUS = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
          "all that glitters is not gold", "", "where there is smoke there is fire"]


def make_base(folder: str, family: str = "mistral", seed: int = 0, **overrides) -> str:
    """A tiny random ``XxxBiForMNTP`` checkpoint (hidden 64, 2 layers, 4 heads, 2 KV heads, head dim 64
    (the kernels' smallest), the fixture tokenizer's 704-row vocabulary), safetensors."""
    from transformers import AutoConfig

    from llm2vec_fast.models import BI_FOR_MNTP
    common = dict(vocab_size=704, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, bos_token_id=1, eos_token_id=2, max_position_embeddings=512,
                  initializer_range=0.1)  # logits of a useful size: the frozen LM head bounds them
    if family == "phi3":  # head_dim = hidden / heads there
        common.update(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, pad_token_id=2)
        common.pop("head_dim")
    if family in ("gemma2", "gemma3_text"):
        common.update(query_pre_attn_scalar=64, final_logit_softcapping=5.0, sliding_window=4096)
    common.update(overrides)
    config = AutoConfig.for_model(family, **common)
    torch.manual_seed(seed)
    BI_FOR_MNTP[family](config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(TOKENIZER, name), folder)
    return folder


def write_corpus(path: str, repeats: int = 12) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(repeats):
            for line in CORPUS:
                f.write(line + "\n")
    return path


def mntp_config(root: str, **overrides):
    from llm2vec_fast.training import MNTPConfig
    base = os.path.join(root, "base")
    if not os.path.isdir(base):
        make_base(base)
    data = os.path.join(root, "data.txt")
    if not os.path.isfile(data):
        write_corpus(data)
    values = dict(model_name_or_path=base, output_dir=os.path.join(root, "out"), dataset_file_path=data,
                  max_seq_length=32, per_device_train_batch_size=4, learning_rate=1e-2, max_steps=4,
                  torch_dtype="float32", lora_dropout=0.0, logging_steps=1, save_steps=100, disable_tqdm=True)
    values.update(overrides)
    return MNTPConfig.from_dict(values)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mntp"))


# ------------------------------------------------------------------------------------------ masking
def _batch(rows=64, length=512, seed=0):
    """Ids in [3, 700) with BOS (1) first and a few EOS (2) inside; 700 is kept free for the mask id."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 700, (rows, length), generator=g)
    ids[:, 0] = 1
    ids[torch.rand(rows, length, generator=g) < 0.05] = 2
    return ids


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_masking_statistics_and_label_shift():
    from llm2vec_fast.training.mntp import IGNORE_INDEX, mask_tokens
    ids = _batch()
    g = torch.Generator().manual_seed(1)
    out = mask_tokens(ids, special_ids=[0, 1, 2], mask_token_id=700, vocab_size=704, mlm_probability=0.2,
                      generator=g)
    special = ids <= 2
    assert not out.selected[special].any(), "special tokens were selected"
    assert torch.equal(out.input_ids[~out.selected], ids[~out.selected])
    eligible = int((~special).sum())
    chosen = int(out.selected.sum())
    assert _within(chosen, eligible, 0.2)
    new, old = out.input_ids[out.selected], ids[out.selected]
    masked, kept = int((new == 700).sum()), int((new == old).sum())
    randomised = chosen - masked - kept
    assert _within(masked, chosen, 0.8)
    assert _within(kept, chosen, 0.1 + 0.1 / 704)   # a random draw may hit the original token
    assert _within(randomised, chosen, 0.1 - 0.1 / 704)
    # labels[:, i - 1] = original token i where i was selected, -100 elsewhere (llm2vec's shifted CE)
    expected = torch.full_like(ids, IGNORE_INDEX)
    expected[:, :-1] = torch.where(out.selected[:, 1:], ids[:, 1:], IGNORE_INDEX)
    assert torch.equal(out.labels, expected)
    assert (out.labels[:, -1] == IGNORE_INDEX).all()


def test_all_mask_collator_masks_every_selected_token():
    from llm2vec_fast.training.mntp import mask_tokens
    ids = _batch(rows=16, length=256)
    out = mask_tokens(ids, special_ids=[0, 1, 2], mask_token_id=700, vocab_size=704, mlm_probability=0.3,
                      collator_type="all_mask", generator=torch.Generator().manual_seed(0))
    assert (out.input_ids[out.selected] == 700).all()
    assert torch.equal(out.input_ids[~out.selected], ids[~out.selected])
    assert _within(int(out.selected.sum()), int((ids > 2).sum()), 0.3)
    assert not out.selected[ids <= 2].any()


# ------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_cross_entropy_equals_full_logits(softcap):
    from llm2vec_fast.training.mntp import chunked_cross_entropy
    torch.manual_seed(0)
    hidden = torch.randn(37, 24, requires_grad=True)
    weight = torch.randn(101, 24, requires_grad=True)
    targets = torch.randint(101, (37,))
    loss = chunked_cross_entropy(hidden, weight, targets, softcap=softcap, chunk_rows=8)
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = h64 @ w64.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_chunked_cross_entropy_of_no_rows_is_zero_with_a_graph():
    from llm2vec_fast.training.mntp import chunked_cross_entropy
    weight = torch.randn(11, 4, requires_grad=True)
    loss = chunked_cross_entropy(torch.zeros(0, 4, requires_grad=True), weight, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss) == 0.0 and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text", "phi3"])
def test_mntp_loss_is_llm2vecs_causal_lm_loss(tmp_path, family):
    """Our loss (packed body, labelled rows only, chunked head) == llm2vec's: the causal-LM head's
    shifted CE over the full (B, L, V) logits, computed here in float64 (Gemma2/3: with their softcap)."""
    from llm2vec_fast.training.mntp import IGNORE_INDEX, MNTPRecipe
    if family != "mistral":
        make_base(str(tmp_path / "base"), family)
    recipe = MNTPRecipe(mntp_config(str(tmp_path), gradient_checkpointing=False))
    batch = next(recipe.batches(0))
    loss_sum, count = recipe.loss_parts(batch["input_ids"], batch["labels"])
    ours = loss_sum / count
    # the llm2vec way: unshifted labels (original token where selected), model's padded forward,
    # logits[:, :-1] against labels[:, 1:]
    unshifted = torch.full_like(batch["labels"], IGNORE_INDEX)
    unshifted[:, 1:] = batch["labels"][:, :-1]
    with torch.no_grad():
        hidden = recipe.model.model(input_ids=batch["input_ids"]).last_hidden_state.double()
        logits = hidden @ recipe.model.lm_head.weight.double().t()
        softcap = getattr(recipe.model.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                unshifted[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert count == int((batch["labels"] != IGNORE_INDEX).sum()) > 0
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ data
def test_documents_and_chunks(tmp_path):
    from llm2vec_fast.training.mntp import group_into_chunks, read_documents
    from llm2vec_fast.training.model_setup import load_tokenizer
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first line\n\n  \nsecond line\n")
    (folder / "sub" / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n\n" + json.dumps({"text": " "}) + "\n")
    (folder / "ignored.csv").write_text("x\n")
    docs = read_documents(str(folder))
    assert docs == ["first line", "second line", "third"]
    tokenizer = load_tokenizer(TOKENIZER)
    assert tokenizer.pad_token == tokenizer.eos_token
    flat = [t for doc in docs for t in tokenizer(doc)["input_ids"]]
    chunks = group_into_chunks(docs, tokenizer, 4)
    assert chunks.shape == (len(flat) // 4, 4)
    assert chunks.reshape(-1).tolist() == flat[:len(flat) // 4 * 4]
    with pytest.raises(ValueError, match="fewer than max_seq_length"):
        group_into_chunks(docs, tokenizer, 10_000)
    (folder / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_documents(str(folder))


def _run_mntp_reference(path: str, cache: str, tokenizer, length: int, percentage: int):
    """llm2vec's run_mntp.py data steps on a .txt train_file (its own code, on ``datasets``): the train[p%:] /
    train[:p%] split, tokenize_function, and group_texts mapped with batched=True."""
    from itertools import chain
    datasets = pytest.importorskip("datasets")
    with pytest.MonkeyPatch.context() as mp:  # never the hub (the "text" builder is packaged; a local file)
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            mp.setenv(name, "1")
            mp.setattr(datasets.config, name, True, raising=False)
        splits = {name: datasets.load_dataset("text", data_files={"train": path}, split=split, cache_dir=cache)
                  for name, split in (("train", f"train[{percentage}%:]"), ("validation", f"train[:{percentage}%]"))}

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = len(concatenated[list(examples.keys())[0]]) // length * length
        return {k: [t[i:i + length] for i in range(0, total, length)] for k, t in concatenated.items()}

    out = {}
    for name, raw in splits.items():
        tokenized = raw.map(lambda ex: tokenizer(ex["text"], return_special_tokens_mask=True), batched=True,
                            remove_columns=["text"])
        out[name] = torch.tensor(tokenized.map(group_texts, batched=True)["input_ids"])
    return out


def test_chunks_and_split_are_run_mntps(tmp_path):
    """The training and held-out chunks of a file are the ones llm2vec's run_mntp.py builds: group_texts drops
    the remainder of every 1000-document batch (the old code, one remainder at the end, shifted every chunk
    after the first 1000 documents), and train[:p%] rounds half to even (2050 documents at 5%: 102 held out,
    not 103)."""
    import random

    from llm2vec_fast.training.mntp import group_into_chunks, read_documents, split_validation
    from llm2vec_fast.training.model_setup import load_tokenizer
    rng = random.Random(0)
    words = CORPUS[0].split() + CORPUS[1].split()
    path = str(tmp_path / "corpus.txt")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(2050):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) + "\n")
    tokenizer = load_tokenizer(TOKENIZER)
    reference = _run_mntp_reference(path, str(tmp_path / "cache"), tokenizer, 64, 5)
    train, held = split_validation(read_documents(path), 5)
    assert len(held) == 102
    assert torch.equal(group_into_chunks(train, tokenizer, 64).long(), reference["train"])
    assert torch.equal(group_into_chunks(held, tokenizer, 64, what="validation").long(), reference["validation"])


def test_mask_token_types(tmp_path):
    """blank -> "_" (here unknown, as llm2vec's convert_tokens_to_ids gives), eos -> EOS, mask -> a new id
    len(tokenizer), the embeddings (and LM head) grown when the id is past their end."""
    from llm2vec_fast.training.mntp import MNTPRecipe
    recipe = MNTPRecipe(mntp_config(str(tmp_path), mask_token_type="blank"))
    assert recipe.mask_token_id == recipe.tokenizer.convert_tokens_to_ids("_")
    assert MNTPRecipe(mntp_config(str(tmp_path), mask_token_type="eos")).mask_token_id == 2
    small = make_base(str(tmp_path / "small"), vocab_size=len(recipe.tokenizer))
    grown = MNTPRecipe(mntp_config(str(tmp_path), model_name_or_path=small, mask_token_type="mask"))
    assert grown.mask_token_id == len(grown.tokenizer) == 679
    assert grown.model.get_input_embeddings().weight.shape[0] == 680
    assert grown.model.get_output_embeddings().weight.shape[0] == 680
    batch = next(grown.batches(0))
    assert (batch["input_ids"] == 679).any()
    loss_sum, count = grown.loss_parts(batch["input_ids"], batch["labels"])
    assert torch.isfinite(loss_sum) and count > 0


def test_a_checkpoint_with_an_added_mask_token_loads(tmp_path):
    """MNTP with an added <mask> on a base with no spare embedding row: peft saves the grown embedding matrix in
    the adapter; LLM2Vec.from_pretrained(checkpoint) grows the base's to it before loading (peft would fail on
    the size), and encodes as the trained model."""
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.training.loop import Trainer
    from llm2vec_fast.training.mntp import MNTPRecipe
    probe = MNTPRecipe(mntp_config(str(tmp_path / "probe"), mask_token_type="blank"))
    small = make_base(str(tmp_path / "small"), vocab_size=len(probe.tokenizer))
    config = mntp_config(str(tmp_path), model_name_or_path=small, mask_token_type="mask", max_steps=2,
                         save_steps=2)
    recipe = MNTPRecipe(config)
    Trainer(recipe).train()
    folder = os.path.join(config.output_dir, "checkpoint-2")
    loaded = LLM2Vec.from_pretrained(folder, dtype=torch.float32)
    assert loaded.model.get_input_embeddings().weight.shape[0] == len(probe.tokenizer) + 1
    recipe.model.eval()
    texts = ["the lazy dog", "a stitch in time"]
    with torch.no_grad():
        expected = LLM2Vec(recipe.model.model, recipe.tokenizer).encode(texts, show_progress_bar=False)
    torch.testing.assert_close(loaded.encode(texts, show_progress_bar=False), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ training
def test_mntp_trains_and_the_checkpoint_loads_with_llm2vec(tmp_path):
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.training.loop import Trainer
    from llm2vec_fast.training.mntp import MNTPRecipe
    config = mntp_config(str(tmp_path), max_steps=12, save_steps=6, learning_rate=2e-2)
    recipe = MNTPRecipe(config)
    losses = Trainer(recipe).train()
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < sum(losses[:3]) / 3 - 0.5, losses
    folder = os.path.join(config.output_dir, "checkpoint-12")
    with open(os.path.join(folder, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.abspath(config.model_name_or_path)
    texts = ["the lazy dog", "a stitch in time", "gold"]
    loaded = LLM2Vec.from_pretrained(folder, dtype=torch.float32)
    recipe.model.eval()
    trained = LLM2Vec(recipe.model.model, recipe.tokenizer)
    with torch.no_grad():
        expected = trained.encode(texts, show_progress_bar=False)
    got = loaded.encode(texts, show_progress_bar=False)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    base = LLM2Vec.from_pretrained(config.model_name_or_path, dtype=torch.float32)
    assert not torch.allclose(base.encode(texts, show_progress_bar=False), got, atol=1e-3), "adapter not applied"

    # the encoder recipes' start: MNTP merged (found in the base folder, or given as peft_model_name_or_path),
    # then a fresh LoRA whose B = 0 leaves the embeddings unchanged
    from llm2vec_fast.training import TrainConfig
    from llm2vec_fast.training.model_setup import load_encoder_model
    for base, adapter in ((folder, None), (config.model_name_or_path, folder)):
        setup = TrainConfig.from_dict(dict(model_name_or_path=base, peft_model_name_or_path=adapter,
                                           output_dir=str(tmp_path / "enc"), torch_dtype="float32"))
        encoder = load_encoder_model(setup)
        trainable = [n for n, p in encoder.model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        assert encoder.model.training
        encoder.model.eval()
        torch.testing.assert_close(encoder.encode(texts, show_progress_bar=False), got, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ evaluation
HELD_OUT = ["the moon pulls the tide over the ocean floor", "bread needs flour water salt and yeast",
            "the sailor plays a guitar on the stage tonight"] * 4


def _held_out_file(root: str) -> str:
    path = os.path.join(root, "held_out.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(HELD_OUT) + "\n")
    return path


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_evaluation_equals_the_full_logits_reference(tmp_path, family):
    """evaluate(): mean CE over every labelled held-out token, the argmax accuracy (llm2vec's compute_metrics)
    and exp(loss), against the padded body and full float64 logits (Gemma2: capped); the same masks every
    time, other than any training batch's."""
    from llm2vec_fast.training.mntp import IGNORE_INDEX, MNTPRecipe
    if family != "mistral":
        make_base(str(tmp_path / "base"), family)
    recipe = MNTPRecipe(mntp_config(str(tmp_path), validation_file=_held_out_file(str(tmp_path)), do_eval=True,
                                    per_device_eval_batch_size=3))
    assert recipe.eval_chunks.shape[0] >= 4  # more than one eval batch, the last one short
    recipe.model.eval()
    metrics = recipe.evaluate()
    masked = recipe.eval_batch()
    assert torch.equal(masked.input_ids, recipe.eval_batch().input_ids)
    assert not torch.equal(masked.selected[:4], recipe._masked(recipe.eval_chunks[:4], 0, 0).selected)
    with torch.no_grad():
        hidden = recipe.model.model(input_ids=masked.input_ids).last_hidden_state.double()
        logits = hidden @ recipe.model.lm_head.weight.double().t()
        if recipe.softcap:
            logits = torch.tanh(logits / recipe.softcap) * recipe.softcap
    labelled = masked.labels != IGNORE_INDEX
    targets = masked.labels[labelled]
    loss = torch.nn.functional.cross_entropy(logits[labelled], targets)
    accuracy = float((logits[labelled].argmax(-1) == targets).double().mean())
    assert metrics["eval_tokens"] == int(labelled.sum()) > 0
    assert metrics["eval_loss"] == pytest.approx(float(loss), rel=1e-5)
    assert metrics["eval_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_trainer_evaluates_on_schedule_and_training_is_unchanged(tmp_path):
    """eval_strategy="steps" every eval_steps plus do_eval after the last step, logged to log.jsonl; the losses
    are those of the same run without evaluation, bit for bit; the held-out loss falls as training goes on."""
    from llm2vec_fast.training.loop import LOG_FILE, Trainer
    from llm2vec_fast.training.mntp import MNTPRecipe
    root = str(tmp_path)
    data = os.path.join(root, "data.txt")
    write_corpus(data)
    common = dict(max_steps=7, learning_rate=2e-2, validation_file=data)
    plain = Trainer(MNTPRecipe(mntp_config(root, output_dir=os.path.join(root, "plain"), **common))).train()
    config = mntp_config(root, output_dir=os.path.join(root, "eval"), do_eval=True, eval_strategy="steps",
                         eval_steps=3, **common)
    losses = Trainer(MNTPRecipe(config)).train()
    assert losses == plain
    with open(os.path.join(config.output_dir, LOG_FILE)) as f:
        records = [json.loads(line) for line in f]
    evaluations = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [3, 6, 7]
    assert evaluations[-1]["eval_loss"] < evaluations[0]["eval_loss"] - 0.2, evaluations
    assert len([r for r in records if "loss" in r]) == 7  # the training records are all still there


def test_epoch_evaluation(tmp_path):
    from llm2vec_fast.training.loop import Trainer
    from llm2vec_fast.training.mntp import MNTPRecipe
    root = str(tmp_path)
    recipe = MNTPRecipe(mntp_config(root, eval_strategy="epoch", validation_file=_held_out_file(root), max_steps=-1,
                                    num_train_epochs=2, gradient_accumulation_steps=2))
    trainer = Trainer(recipe)
    per_epoch = trainer.batches_per_epoch // 2
    seen = []
    trainer.evaluate = lambda bar=None: seen.append(trainer.step)
    trainer.train()
    assert per_epoch >= 1 and seen == [per_epoch, 2 * per_epoch]


def test_validation_split_holds_out_the_first_documents(tmp_path):
    """Without validation_file, evaluation holds out the first validation_split_percentage % of the documents
    (llm2vec's train[:p%]); they do not train. Without evaluation every document trains."""
    from llm2vec_fast.training.mntp import MNTPRecipe, group_into_chunks, read_documents, split_validation
    root = str(tmp_path)
    data = os.path.join(root, "data.txt")
    with open(data, "w", encoding="utf-8") as f:
        f.write("\n".join(HELD_OUT + CORPUS * 6) + "\n")
    docs = read_documents(data)
    train, held = split_validation(docs, 25)
    assert held == docs[:round(len(docs) / 4)] and train == docs[len(held):]
    recipe = MNTPRecipe(mntp_config(root, dataset_file_path=data, do_eval=True, validation_split_percentage=25))
    assert torch.equal(recipe.eval_chunks, group_into_chunks(held, recipe.tokenizer, 32))
    assert torch.equal(recipe.chunks, group_into_chunks(train, recipe.tokenizer, 32))
    everything = MNTPRecipe(mntp_config(root, dataset_file_path=data))
    assert everything.eval_chunks is None
    assert torch.equal(everything.chunks, group_into_chunks(docs, recipe.tokenizer, 32))
    with pytest.raises(ValueError, match="no validation document"):
        split_validation(docs[:5], 5)
    with pytest.raises(ValueError, match="no validation chunk"):
        MNTPRecipe(mntp_config(root, dataset_file_path=data, do_eval=True, max_seq_length=512,
                               validation_split_percentage=10))


def test_bad_data_is_reported_before_the_model_loads(tmp_path, monkeypatch):
    """The data are read and chunked before the model loads (minutes for a 7B one): too little text, and bytes
    that are no UTF-8 (named by file and line, not a bare UnicodeDecodeError), fail at once."""
    from llm2vec_fast.training import model_setup
    from llm2vec_fast.training.mntp import MNTPRecipe
    root = str(tmp_path)
    config_of = {"short": "tiny text\n".encode(), "latin1": "fine line\ncaf\xe9 au lait\n".encode("latin-1")}
    configs = {}
    for name, raw in config_of.items():
        path = tmp_path / f"{name}.txt"
        path.write_bytes(raw)
        configs[name] = mntp_config(root, dataset_file_path=str(path))

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data were checked")
    monkeypatch.setattr(model_setup, "load_mntp_model", refuse)
    with pytest.raises(ValueError, match="chunk"):
        MNTPRecipe(configs["short"])
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text after line \d+ \(invalid continuation byte"):
        MNTPRecipe(configs["latin1"])


# ------------------------------------------------------------------------------------------ distributed
WORLD = 2


def _grads(recipe):
    return {n: p.grad.detach().clone() for n, p in recipe.model.named_parameters() if p.requires_grad}


def _distributed_step(rank: int, root: str) -> None:
    import torch.distributed as dist

    from llm2vec_fast.training.loop import Trainer
    from llm2vec_fast.training.mntp import MNTPRecipe
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rdzv", rank=rank, world_size=WORLD)
    try:
        recipe = MNTPRecipe(mntp_config(root, per_device_train_batch_size=2, validation_file=_held_out_file(root),
                                        per_device_eval_batch_size=2))
        trainer = Trainer(recipe)
        metrics = trainer.evaluate()
        loss = recipe.train_step(next(recipe.batches(0)), 1.0)
        trainer._sum_gradients()
        torch.save({"loss": loss, "grads": _grads(recipe), "metrics": metrics}, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_every_rank_gets_rows_of_every_batch_and_the_ranks_make_the_union_batch(tmp_path, monkeypatch):
    """Each rank's share of each global batch, for world sizes whose last partial batch a ceil split left some
    rank without a row (rank 2 of 3 crashed in its forward, then the others in all_reduce): every share has a
    row, and the shares in rank order are the global batch of one process (the same rows and masks)."""
    from llm2vec_fast.training.mntp import MNTPRecipe
    recipe = MNTPRecipe(mntp_config(str(tmp_path), per_device_train_batch_size=2))
    chunks = len(recipe.chunks)
    checked = 0
    for world in range(2, 9):
        rest = chunks % (2 * world)
        if rest < world or -(-rest // world) * (world - 1) < rest:
            continue  # no last batch kept, or a ceil split would have left no rank empty
        shares = []
        for rank in range(world):
            monkeypatch.setattr(recipe, "_world", lambda rank=rank, world=world: (rank, world))
            shares.append(list(recipe.batches(0)))
        monkeypatch.setattr(recipe, "_world", lambda: (0, 1))
        monkeypatch.setattr(recipe.config, "per_device_train_batch_size", 2 * world)
        whole = list(recipe.batches(0))
        monkeypatch.setattr(recipe.config, "per_device_train_batch_size", 2)
        assert len(whole) == len(shares[0]) and whole[-1]["input_ids"].shape[0] == rest
        for index, batch in enumerate(whole):
            parts = [share[index] for share in shares]
            assert all(part["input_ids"].shape[0] >= 1 for part in parts), (world, index)
            for key in ("input_ids", "labels"):
                assert torch.equal(torch.cat([part[key] for part in parts]), batch[key]), (world, index, key)
        checked += 1
    assert checked, f"no world size in 2..8 leaves a rank empty with {chunks} chunks"

def test_two_gloo_ranks_equal_one_process_on_the_union_batch(tmp_path):
    import torch.multiprocessing as mp

    from llm2vec_fast.training.mntp import MNTPRecipe
    root = str(tmp_path)
    single = MNTPRecipe(mntp_config(root, per_device_train_batch_size=2 * WORLD, validation_file=_held_out_file(root)))
    single.model.eval()
    metrics = single.evaluate()
    single.model.train()
    loss = single.train_step(next(single.batches(0)), 1.0)
    grads = _grads(single)
    mp.spawn(_distributed_step, args=(root,), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(os.path.join(root, f"rank{rank}.pt"))
        assert got["metrics"]["eval_tokens"] == metrics["eval_tokens"] > 0  # each held-out token counted once
        for key in ("eval_loss", "eval_accuracy", "eval_perplexity"):
            assert got["metrics"][key] == pytest.approx(metrics[key], rel=1e-5), key
        torch.testing.assert_close(got["loss"], loss, rtol=1e-5, atol=1e-6)
        assert got["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
