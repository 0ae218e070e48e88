"""llm2vec 0.2.3's text handling, as pure string functions (no torch, no tokenizer).

An input is a text or an ``[instruction, text]`` pair. llm2vec turns it into one string:
``"{instruction.strip()} !@#$%^&*(){text}"`` (``"!@#$%^&*(){text}"`` without an instruction), after
cutting the text to ``doc_max_length`` tokens by whole words (:func:`truncate_by_words`). It then
wraps that string in a chat template chosen by the checkpoint's name (``config._name_or_path``), and
for ``eos_token`` pooling appends its family's EOS text (:func:`prepare_for_tokenization`). The model
reads the string with the separator removed; the text part is what follows the first separator,
and its token count, tokenised alone, sets how many trailing tokens are pooled when
``skip_instruction`` is on (:func:`split_separator`).
"""
from __future__ import annotations

import collections.abc
import hashlib
from typing import Callable, List, Optional, Sequence, Tuple

SEPARATOR = "!@#$%^&*()"

# Chat templates, keyed by the exact checkpoint name: (prefix, suffix) around the stripped string.
_TEMPLATES = {
    "meta-llama/Meta-Llama-3-8B-Instruct": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    "mistralai/Mistral-7B-Instruct-v0.2": ("[INST] ", " [/INST]"),
    "meta-llama/Llama-2-7b-chat-hf": ("[INST] ", " [/INST]"),
    "google/gemma-2-9b-it": ("<bos><start_of_turn>user\n", "<end_of_turn>"),
    "Qwen/Qwen2-1.5B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
    "Qwen/Qwen2-7B-Instruct": ("<|im_start|>user\n", "<|im_end|>"),
}
# The Llama-3 Instruct template is final: llm2vec appends no EOS text after it.
_TEMPLATE_IS_FINAL = frozenset({"meta-llama/Meta-Llama-3-8B-Instruct"})
# EOS text for eos_token pooling: by exact name first, then by model family. llm2vec picks the family
# with isinstance on the Llama/Mistral/Gemma/Qwen2 configs of transformers 4.44, where Gemma2 and
# the other families are none of these: they get no EOS text.
_EOS_BY_NAME = {"meta-llama/Meta-Llama-3-8B": "<|end_of_text|>"}
_EOS_BY_FAMILY = {"llama": " </s>", "mistral": " </s>", "gemma": "<eos>", "qwen2": "<|endoftext|>"}

InputItem = Tuple[str, str]  # (instruction, text)


def eos_text(name_or_path: Optional[str], model_type: Optional[str]) -> str:
    """The text llm2vec appends for ``eos_token`` pooling ("" when it appends none)."""
    if name_or_path in _EOS_BY_NAME:
        return _EOS_BY_NAME[name_or_path]
    return _EOS_BY_FAMILY.get(model_type or "", "")


def prepare_for_tokenization(text: str, name_or_path: Optional[str], model_type: Optional[str],
                             pooling_mode: str) -> str:
    """llm2vec's ``prepare_for_tokenization``: the chat template of the named checkpoint, then the EOS
    text for ``eos_token`` pooling. Each step strips the whole string first, as llm2vec does."""
    template = _TEMPLATES.get(name_or_path or "")
    if template is not None:
        text = template[0] + text.strip() + template[1]
        if name_or_path in _TEMPLATE_IS_FINAL:
            return text
    if pooling_mode == "eos_token":
        eos = eos_text(name_or_path, model_type)
        if eos:
            text = text.strip() + eos
    return text


def join_instruction(instruction: str, text: str) -> str:
    """llm2vec's ``_convert_to_str`` after truncation: the instruction (if any), the separator, the text."""
    return f"{instruction.strip()} {SEPARATOR}{text}" if instruction else f"{SEPARATOR}{text}"


def split_separator(prepared: str) -> Tuple[str, str]:
    """(the string the model reads, the text part whose tokens are pooled under skip_instruction).

    The model reads every piece joined without separators; the text part is the piece after the first
    separator ("" when there is none), exactly as llm2vec's ``tokenize`` splits."""
    pieces = prepared.split(SEPARATOR)
    return "".join(pieces), (pieces[1] if len(pieces) > 1 else "")


def truncate_by_words(texts: Sequence[str], count_tokens: Callable[[List[str]], List[int]], max_length: int,
                      doc_max_length: int, discard: Optional[Callable[[List[str]], None]] = None
                      ) -> Tuple[List[str], List[int]]:
    """llm2vec's ``doc_max_length`` loop, for many texts at once.

    A text's length is its token count without special tokens, capped at ``max_length`` (llm2vec
    tokenises with truncation). While it exceeds ``doc_max_length``, the text is cut to
    ``int(words * doc_max_length / length)`` whitespace-separated words, re-joined with single spaces,
    and counted again. ``count_tokens`` counts a list of strings; ``discard``, if given, is called with the
    versions that are cut (a counter that keeps token ids can drop theirs: no other input ends on them, since
    an equal string has the same length). Returns the texts and their lengths.
    """
    texts = list(texts)
    lengths = [min(n, max_length) for n in count_tokens(texts)] if texts else []
    pending = [i for i, n in enumerate(lengths) if n > doc_max_length]
    while pending:
        if discard is not None:
            discard([texts[i] for i in pending])
        for i in pending:
            words = texts[i].split()
            ratio = doc_max_length / lengths[i]
            texts[i] = " ".join(words[:int(len(words) * ratio)])
        for i, n in zip(pending, count_tokens([texts[i] for i in pending])):
            lengths[i] = min(n, max_length)
        pending = [i for i in pending if lengths[i] > doc_max_length]
    return texts, lengths


def normalize_inputs(sentences) -> List[InputItem]:
    """The inputs of ``encode`` as (instruction, text) pairs.

    Accepted: one string (one text: llm2vec would iterate its characters); a sequence whose items are
    strings or ``[instruction, text, ...]`` pairs of strings (extra items, such as MEDI's integer, are
    ignored, as llm2vec does; strings and pairs may be mixed); llm2vec's single MEDI item
    ``[instruction, text, int]``; a numpy array's rows (a 2-D array of [instruction, text] strings). Any other
    item raises TypeError naming its index, and a string that is no valid Unicode (a lone surrogate, which no
    tokenizer takes) ValueError. A mapping or table (a dict, a pandas DataFrame: iterating it gives its column
    names) raises TypeError.
    """
    if isinstance(sentences, str):
        return [("", sentences)]
    if isinstance(sentences, bytes):
        raise TypeError("sentences must be a str or a sequence of str / [instruction, text] pairs, got bytes")
    if sentences is None:
        raise TypeError("sentences must be a str or a sequence of str / [instruction, text] pairs, got None")
    if isinstance(sentences, collections.abc.Mapping) or hasattr(sentences, "columns") or \
            not hasattr(sentences, "__iter__"):
        raise TypeError(f"sentences must be a str or a sequence of str / [instruction, text] pairs, got "
                        f"{type(sentences).__name__}")
    items = list(sentences)
    if len(items) == 3 and isinstance(items[0], str) and isinstance(items[1], str) and isinstance(items[2], int) \
            and not isinstance(items[2], bool):
        items = [items]  # one MEDI-style [instruction, text, int]
    out: List[InputItem] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            out.append(("", check_unicode(item, f"sentences[{index}]")))
            continue
        if type(item).__module__ == "numpy" and getattr(item, "ndim", None) == 1:
            item = item.tolist()  # a row of a 2-D array of strings (llm2vec indexes its items as it would a list)
        if isinstance(item, (list, tuple)) and len(item) >= 2 and isinstance(item[0], str) and isinstance(item[1], str):
            out.append((check_unicode(item[0], f"sentences[{index}][0]"),
                        check_unicode(item[1], f"sentences[{index}][1]")))
            continue
        raise TypeError(f"sentences[{index}] must be a str or an [instruction, text] pair of str, got "
                        f"{_describe(item)}")
    return out


def check_unicode(text: str, where: str) -> str:
    """text, if it encodes to UTF-8 (else ValueError naming ``where`` and the position: a lone surrogate)."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"{where} is not valid Unicode text: {text[error.start:error.end]!r} at character "
                             f"{error.start} is a lone surrogate") from None
    return str(text)


def items_digest(items: Sequence[InputItem]) -> bytes:
    """128-bit hash of (instruction, text) items: equal only for the same items in the same order (the lengths
    go in first, so that no two different lists of strings hash the same bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for instruction, text in items:
        parts = (instruction.encode("utf-8", "surrogatepass"), text.encode("utf-8", "surrogatepass"))
        digest.update(b"%d:%d:" % (len(parts[0]), len(parts[1])) + parts[0] + parts[1])
    return digest.digest()


def _describe(item) -> str:
    if isinstance(item, (list, tuple)):
        inner = ", ".join(type(x).__name__ for x in item[:3]) + (", ..." if len(item) > 3 else "")
        return f"a {type(item).__name__} of length {len(item)} ({inner})"
    return type(item).__name__
