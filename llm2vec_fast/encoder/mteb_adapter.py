"""MTEB 2.x adapter: evaluate an ``LLM2Vec`` with ``mteb.evaluate``.

    import mteb
    from llm2vec_fast.encoder.mteb_adapter import to_mteb
    model = to_mteb(LLM2Vec.from_pretrained(path), instructions={"SciFact": "Given a scientific claim, ..."})
    results = mteb.evaluate(model, mteb.get_tasks(tasks=["SciFact", "STS12"]), cache=mteb.ResultCache("results"))

``to_mteb`` returns an object implementing mteb 2.x's ``EncoderProtocol`` (``encode`` on a DataLoader of
batches, ``similarity``, ``similarity_pairwise``, ``mteb_model_meta``). mteb is imported only when
the adapter is used (mteb>=2,<3 must be installed: ``pip install llm2vec-fast[mteb]``).

Instructions, as llm2vec's own MTEB evaluation does them (``experiments/mteb_eval_custom.py``):
every text is encoded as an ``[instruction, text]`` pair, so with ``skip_instruction`` the instruction
is seen by the model but not pooled. ``instructions`` takes the keys mteb's ``model_prompts`` take (checked
by ``to_mteb``; any other key raises ValueError): a task name (mteb's, or a task class defined before
``to_mteb`` is called), a task type (e.g. ``"STS"``), a prompt type (``"query"``, ``"document"``), or
``"{task name or type}-{prompt type}"``. Each value is used verbatim; the most specific key wins, in mteb's
order. Queries (``prompt_type="query"``) get the first of:

1. ``instructions["{name}-query"]``, ``[name]``, ``["{type}-query"]``, ``[type]``, ``["query"]``;
2. ``query_instruction``, verbatim, when given;
3. mteb's prompt for the task, formatted by :func:`llm2vec_instruction` (trailing "." dropped, ":"
   added, as llm2vec does with its default instructions): ``TaskMetadata.prompt`` (its "query" entry
   when it is a dict), else the prompt of the task's abstract class (e.g. STS: "Retrieve semantically
   similar text."), else ``""``. ``TaskMetadata.description`` is not used: it describes the data set,
   not what to embed for (mteb 2 keeps llm2vec's/E5's instruction texts in ``prompt``).

The texts of symmetric tasks (STS, classification, clustering, ...: ``prompt_type=None``) get the same with
``[name]`` and ``[type]`` only in 1 (keys with a prompt type are for asymmetric tasks, as in mteb). Documents
(``prompt_type="document"``, e.g. the corpus of a retrieval task) get ``instructions["{name}-document"]``,
``["{type}-document"]``, ``["document"]``, else ``document_instruction`` (default ``""``, as llm2vec): a bare
task name or type is the query side's instruction only (llm2vec gives documents no task instruction).

``mteb_model_meta`` is built locally (no hub access): name ``llm2vec-fast/<last part of the
checkpoint's name>`` (``name=`` to override); revision ``local-<12 hex digits>``, a fingerprint of a
strided sample of the weights (so two checkpoints with the same name, e.g. two adapters over one base,
do not share mteb's result cache; ``revision=`` to override); ``experiment_kwargs`` hold what else changes the
embeddings (mteb keys its result cache on these too, so two encoders of one checkpoint never share
results): the pooling settings (``pooling_mode``, ``skip_instruction``, ``max_length``, ``doc_max_length``),
whether the model is bidirectional, its dtype, ``normalize_embeddings``, a digest of an unmerged peft
adapter's configuration (its weights are in the revision) and, when given, a digest of the instruction
settings; they are read again at each access, so changing the encoder's settings changes the metadata.
embed_dim, max_tokens (``max_length``), n_parameters and memory come from the model; cosine similarity;
``use_instructions=True``.

Not supported: non-text inputs (images, audio), ``precision`` other than float32, multi-vector or
cross-encoder use, loading through ``mteb.get_model`` / the mteb CLI (build the encoder, then wrap it).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch

FINGERPRINT_SAMPLES = 256  # values read from each parameter for the revision fingerprint


def llm2vec_instruction(instruction: str) -> str:
    """llm2vec's formatting of a default instruction: a trailing "." replaced by ":" (as llm2vec and mteb do)."""
    if len(instruction) > 0 and instruction[-1] != ":":
        instruction = instruction.strip(".") + ":"
    return instruction


class LLM2VecMTEB:
    """An ``LLM2Vec`` as an mteb 2.x ``EncoderProtocol``; see the module docstring."""

    def __init__(self, encoder, *, instructions: Optional[Mapping[str, str]] = None,
                 query_instruction: Optional[str] = None, document_instruction: str = "",
                 batch_size: Optional[int] = None, max_tokens_per_batch: Optional[int] = None,
                 normalize_embeddings: bool = False, device: Optional[str] = None,
                 show_progress_bar: Optional[bool] = None, name: Optional[str] = None,
                 revision: Optional[str] = None):
        instructions = dict(instructions or {})
        for key, value in instructions.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"instructions must map task names/types to strings, got {key!r}: {value!r}")
        check_instruction_keys(instructions)
        for label, value in (("query_instruction", query_instruction), ("document_instruction", document_instruction)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{label} must be a string, got {value!r}")
        if name is not None and "/" not in name:
            raise ValueError(f"mteb needs a model name of the form 'organization/model', got {name!r}")
        self.encoder = encoder
        self.instructions = instructions
        self.query_instruction = query_instruction
        self.document_instruction = document_instruction or ""
        self.batch_size = batch_size
        self.max_tokens_per_batch = max_tokens_per_batch
        self.normalize_embeddings = normalize_embeddings
        self.device = device
        self.show_progress_bar = show_progress_bar
        self.name = name
        self.revision = revision
        self._meta = None
        self._meta_settings = None

    # ---------------------------------------------------------------------------------- instructions

    def get_instruction(self, task_metadata, prompt_type=None) -> str:
        """The instruction the texts of ``task_metadata``'s task get for ``prompt_type`` (query, document or
        None): the most specific matching key of ``instructions`` (see the module docstring)."""
        kind = getattr(prompt_type, "value", prompt_type)
        name, task_type = task_metadata.name, task_metadata.type
        if kind == "document":
            keys = [f"{name}-document", f"{task_type}-document", "document"]
        elif kind == "query":
            keys = [f"{name}-query", name, f"{task_type}-query", task_type, "query"]
        else:
            keys = [name, task_type]
        for key in keys:
            if key in self.instructions:
                return self.instructions[key]
        if kind == "document":
            return self.document_instruction
        if self.query_instruction is not None:
            return self.query_instruction
        return llm2vec_instruction(_task_prompt(task_metadata))

    # ------------------------------------------------------------------------------------ protocol

    def encode(self, inputs, *, task_metadata, hf_split: str = "", hf_subset: str = "", prompt_type=None,
               **kwargs: Any) -> np.ndarray:
        """(N, hidden) float32 embeddings of the texts of ``inputs`` (a DataLoader of batches with "text")."""
        precision = kwargs.get("precision")
        if precision not in (None, "float32"):
            raise ValueError(f"precision={precision!r} is not supported (only 'float32')")
        texts = []
        for batch in inputs:
            if "text" not in batch:
                raise ValueError(f"only text inputs are supported; the batch holds {sorted(batch)}")
            texts.extend(batch["text"])
        instruction = self.get_instruction(task_metadata, prompt_type)
        batch_size = self.batch_size if self.batch_size is not None else kwargs.get("batch_size", 32)
        show = self.show_progress_bar
        if show is None:
            show = bool(kwargs.get("show_progress_bar", True))
        embeddings = self.encoder.encode([[instruction, text] for text in texts], batch_size=batch_size,
                                         show_progress_bar=show, device=self.device,
                                         normalize_embeddings=self.normalize_embeddings,
                                         max_tokens_per_batch=self.max_tokens_per_batch)
        return embeddings.numpy().astype(np.float32, copy=False)

    def similarity(self, embeddings1, embeddings2):
        """Cosine similarities, (N1, N2)."""
        from mteb.similarity_functions import cos_sim
        return cos_sim(embeddings1, embeddings2)

    def similarity_pairwise(self, embeddings1, embeddings2):
        """Cosine similarities of corresponding rows, (N,)."""
        from mteb.similarity_functions import pairwise_cos_sim
        return pairwise_cos_sim(embeddings1, embeddings2)

    @property
    def mteb_model_meta(self):
        """An mteb ``ModelMeta`` built locally (see the module docstring)."""
        settings = self._experiment_kwargs()
        if self._meta is None or settings != self._meta_settings:
            self._meta, self._meta_settings = self._build_meta(settings), settings
        return self._meta

    # ------------------------------------------------------------------------------------- metadata

    def _experiment_kwargs(self) -> Dict[str, Any]:
        """Every setting besides the weights that changes the embeddings (see the module docstring)."""
        from ..models.bidirectional import is_bidirectional
        encoder = self.encoder
        try:
            bidirectional = bool(is_bidirectional(encoder.model))
        except TypeError:  # not a transformers model: what the attention does is unknown
            bidirectional = None
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in encoder.model.parameters()})
        experiment: Dict[str, Any] = {"pooling_mode": encoder.pooling_mode,
                                      "skip_instruction": bool(encoder.skip_instruction),
                                      "max_length": int(encoder.max_length),
                                      "doc_max_length": int(encoder.doc_max_length),
                                      "bidirectional": bidirectional,
                                      "dtype": ",".join(dtypes)}
        if self.normalize_embeddings:
            experiment["normalize_embeddings"] = True
        adapter = _adapter_settings(encoder.model)
        if adapter is not None:
            experiment["peft_adapter"] = _digest(adapter)
        if self.instructions or self.query_instruction is not None or self.document_instruction:
            experiment["instructions"] = _digest([sorted(self.instructions.items()), self.query_instruction,
                                                  self.document_instruction])
        return experiment

    def _build_meta(self, experiment: Dict[str, Any]):
        from mteb.models.model_meta import ModelMeta
        encoder = self.encoder
        parameters = list(encoder.model.parameters())
        n_parameters = sum(p.numel() for p in parameters)
        memory_mb = round(sum(p.numel() * p.element_size() for p in parameters) / 2 ** 20, 2)
        return ModelMeta(
            loader=None,
            name=self.name or default_name(encoder),
            revision=self.revision or f"local-{weights_fingerprint(encoder.model)}",
            release_date=None,
            languages=None,
            n_parameters=n_parameters,
            memory_usage_mb=memory_mb,
            max_tokens=int(encoder.max_length),
            embed_dim=int(encoder._hidden_size()),
            license=None,
            open_weights=None,
            public_training_code=None,
            public_training_data=None,
            framework=["LLM2Vec", "PyTorch"],
            similarity_fn_name="cosine",
            use_instructions=True,
            training_datasets=None,
            modalities=["text"],
            model_type=["dense"],
            experiment_kwargs=experiment,
        )


def to_mteb(encoder, *, instructions: Optional[Mapping[str, str]] = None, query_instruction: Optional[str] = None,
            document_instruction: str = "", batch_size: Optional[int] = None,
            max_tokens_per_batch: Optional[int] = None, normalize_embeddings: bool = False,
            device: Optional[str] = None, show_progress_bar: Optional[bool] = None, name: Optional[str] = None,
            revision: Optional[str] = None) -> LLM2VecMTEB:
    """``encoder`` (an ``LLM2Vec``) as an mteb 2.x encoder for ``mteb.evaluate``; see the module docstring.

    ``batch_size`` and ``show_progress_bar`` default to mteb's ``encode_kwargs``; ``max_tokens_per_batch``,
    ``normalize_embeddings`` and ``device`` go to ``LLM2Vec.encode``.
    """
    try:
        import mteb  # noqa: F401
    except ImportError:
        raise ImportError("to_mteb needs mteb 2 (pip install 'mteb>=2,<3')") from None
    return LLM2VecMTEB(encoder, instructions=instructions, query_instruction=query_instruction,
                       document_instruction=document_instruction, batch_size=batch_size,
                       max_tokens_per_batch=max_tokens_per_batch, normalize_embeddings=normalize_embeddings,
                       device=device, show_progress_bar=show_progress_bar, name=name, revision=revision)


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:12]


def _adapter_settings(model) -> Optional[Dict[str, Any]]:
    """What an unmerged peft adapter adds beyond its weights (rank, alpha, targets, which adapters are active,
    merged or disabled), or None for a model without one."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    layers = [m for m in model.modules() if hasattr(m, "merged_adapters")]
    return {"configs": {name: config.to_dict() if hasattr(config, "to_dict") else repr(config)
                        for name, config in sorted(configs.items())},
            "active": list(getattr(model, "active_adapters", None) or []),
            "merged": sorted({a for m in layers for a in m.merged_adapters}),
            "disabled": any(getattr(m, "disable_adapters", False) for m in layers)}


def _task_types():
    from typing import get_args

    from mteb.types import PromptType
    try:
        from mteb.abstasks.task_metadata import TaskType
    except ImportError:  # pragma: no cover - other mteb 2.x layouts
        from mteb.types import TaskType
    return set(get_args(TaskType)), {p.value for p in PromptType}


def _known_task_names() -> set:
    """mteb's registered task names and those of every task class defined so far (custom tasks)."""
    from mteb.abstasks.abstask import AbsTask
    try:  # a private registry (mteb 2.x); the subclass walk below finds the imported tasks without it
        from mteb.get_tasks import _TASKS_REGISTRY
        names = set(_TASKS_REGISTRY)
    except ImportError:  # pragma: no cover - other mteb 2.x layouts
        names = set()
    pending = list(AbsTask.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        name = getattr(getattr(cls, "metadata", None), "name", None)
        if isinstance(name, str):
            names.add(name)
    return names


def check_instruction_keys(instructions: Mapping[str, str]) -> None:
    """Raises ValueError for a key of ``instructions`` mteb's model prompts would not take (see the module
    docstring), so that a misspelt task name does not silently leave its task with the default instruction."""
    if not instructions:
        return
    task_types, prompt_types = _task_types()
    names = None
    bad = []
    for key in instructions:
        if key in prompt_types or key in task_types:
            continue
        base, _, suffix = key.rpartition("-")
        if suffix in prompt_types and base in task_types:
            continue
        if names is None:
            names = _known_task_names()
        if key in names or (suffix in prompt_types and base in names):
            continue
        bad.append(key)
    if bad:
        import difflib
        hints = {key: difflib.get_close_matches(key.rsplit("-", 1)[0] if key.endswith(("-query", "-document"))
                                                else key, sorted(names | task_types), n=1) for key in bad}
        hint = "; ".join(f"{key!r}: did you mean {match[0]!r}?" for key, match in hints.items() if match)
        raise ValueError(f"instructions has keys that are no task name, task type or prompt type: {bad}. Valid: "
                         f"a task name (mteb's, or a task class defined before to_mteb), a task type (mteb's "
                         f"TaskType, e.g. 'Retrieval', 'STS'), {sorted(prompt_types)}, or "
                         f"'{{task name or type}}-{{prompt type}}'"
                         + (f" ({hint})" if hint else ""))


def _task_prompt(task_metadata) -> str:
    """mteb's prompt for a task's queries: ``TaskMetadata.prompt``, else its abstract task class's prompt."""
    prompt = getattr(task_metadata, "prompt", None)
    if isinstance(prompt, dict):
        prompt = prompt.get("query")
    if prompt:
        return str(prompt)
    try:
        from mteb.abstasks.abstask import get_abstask_prompt
    except ImportError:  # older mteb 2.x
        return ""
    return get_abstask_prompt(task_metadata.name) or ""


def default_name(encoder) -> str:
    """``llm2vec-fast/<last part of the checkpoint's name>`` (mteb wants 'organization/model')."""
    raw = ""
    getter = getattr(encoder, "_name_or_path", None)
    if callable(getter):
        raw = getter()
    base = os.path.basename(str(raw).rstrip("/\\")) or "model"
    return f"llm2vec-fast/{base.replace(' ', '_')}"


def weights_fingerprint(model, samples: int = FINGERPRINT_SAMPLES) -> str:
    """12 hex digits of SHA-256 over each parameter's name, shape, dtype and a strided sample of its values
    (cheap on any device; any retraining or adapter merge changes it). ``"unknown"`` when the weights
    cannot be read (e.g. offloaded to the meta device)."""
    digest = hashlib.sha256()
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                flat = p.detach().reshape(-1)
                step = max(1, flat.numel() // samples)
                sample = flat[::step][:samples].float().cpu()
                digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode("utf-8"))
                digest.update(sample.numpy().tobytes())
    except (RuntimeError, NotImplementedError):
        return "unknown"
    return digest.hexdigest()[:12]


__all__ = ["LLM2VecMTEB", "to_mteb", "llm2vec_instruction", "default_name", "weights_fingerprint"]
