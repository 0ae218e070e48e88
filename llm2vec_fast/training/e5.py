"""The query instructions of the E5 supervised mix, by the dataset names of llm2vec's echo-data files.

llm2vec's supervised recipe trains on the public E5 replication data (one ``<dataset>.jsonl`` per
dataset, rows with ``query``, ``positive`` and ``negative``) and gives each dataset a fixed
instruction; these are those instructions (from the E5-Mistral paper's table, with llm2vec's names).
:class:`~llm2vec_fast.training.contrastive.SupervisedConfig` starts from this table, so a folder of
echo-data files trains as llm2vec trains it; the config key ``instructions`` adds datasets or
overrides entries, and a row's own ``instruction`` field wins over both.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Dict, Mapping

_WIKIPEDIA_QA = "Given a question, retrieve Wikipedia passages that answer the question"
_CHINESE_WEB = "Given a Chinese search query, retrieve web passages that answer the question"
_WIKIPEDIA_PASSAGES = "Retrieve Wikipedia passages that answer the question"

E5_INSTRUCTIONS: Mapping[str, str] = MappingProxyType({
    "allnli_split1": "Given a premise, retrieve a hypothesis that is entailed by the premise",
    "allnli_split2": "Retrieve semantically similar text",
    "dureader": _CHINESE_WEB,
    "eli5_question_answer": "Provided a user question, retrieve the highest voted answers on Reddit ELI5 forum",
    "fever": "Given a claim, retrieve documents that support or refute the claim",
    "hotpot_qa": "Given a multi-hop question, retrieve documents that can help answer the question",
    "miracl": _WIKIPEDIA_QA,
    "mrtydi": _WIKIPEDIA_QA,
    "msmarco_passage": "Given a web search query, retrieve relevant passages that answer the query",
    "msmarco_document": "Given a web search query, retrieve relevant documents that answer the query",
    "nq": _WIKIPEDIA_QA,
    "quora_duplicates_split1": "Given a question, retrieve questions that are semantically equivalent to the given "
                               "question",
    "quora_duplicates_split2": "Find questions that have the same meaning as the input question",
    "squad": _WIKIPEDIA_PASSAGES,
    "t2ranking": _CHINESE_WEB,
    "trivia_qa": _WIKIPEDIA_PASSAGES,
})


def dataset_instructions(overrides: Mapping[str, str]) -> Dict[str, str]:
    """The E5 table with the config's ``instructions`` laid over it."""
    return {**E5_INSTRUCTIONS, **overrides}
