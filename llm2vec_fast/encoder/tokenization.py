"""Tokenisation for the encoder: every distinct string tokenised once, llm2vec's token ids exactly.

For each input, llm2vec 0.2.3 tokenises three strings: the text alone (for the ``doc_max_length``
check), the final string with special tokens (what the model reads) and the text part alone (for
``embed_mask``). Here a :class:`TokenCache` tokenises each distinct string once, without special
tokens, in batched calls; the model's ids are those plus the tokenizer's special tokens, truncated to
``max_length`` as the tokenizer would (:class:`SpecialTokens`), and the ``embed_mask`` count is a
length. Without an instruction, template or EOS text the three strings are one, so each text is
tokenised once; otherwise only the strings that differ are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .text import InputItem, join_instruction, split_separator, truncate_by_words

_PROBES = ("a", "hello world", "The 2 quick foxes.")
FILL_CHARS = 1 << 20  # characters per tokenizer call of a TokenCache


def char_batches(strings: List[str]) -> Iterator[List[str]]:
    """Consecutive runs of ``strings`` of at most ``FILL_CHARS`` characters (or one string) each."""
    start = 0
    while start < len(strings):
        stop, chars = start + 1, len(strings[start])
        while stop < len(strings) and chars + len(strings[stop]) <= FILL_CHARS:
            chars += len(strings[stop])
            stop += 1
        yield strings[start:stop]
        start = stop


class TokenCache:
    """Token ids without special tokens of each distinct string, tokenised in batches.

    With ``max_length`` each string keeps at most that many ids, cut on the tokenizer's truncation side as
    its own truncation would cut them (nothing reads more: the model's ids are cut to ``max_length``, counts
    are capped at it). A batch holds at most ``FILL_CHARS`` characters (or one string): the tokenizer's
    intermediate encodings of long documents take tens of bytes per token, so that memory stays bounded."""

    def __init__(self, tokenizer, max_length: Optional[int] = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self._ids: Dict[str, List[int]] = {}
        self.calls = 0
        self.strings_tokenized = 0

    def fill(self, strings: Sequence[str]) -> None:
        missing = list(dict.fromkeys(s for s in strings if s not in self._ids))
        for batch in char_batches(missing):
            encoded = self.tokenizer(batch, add_special_tokens=False, truncation=False, padding=False,
                                     return_attention_mask=False, return_token_type_ids=False,
                                     verbose=False)["input_ids"]
            self.calls += 1
            self.strings_tokenized += len(batch)
            for string, ids in zip(batch, encoded):
                self._ids[string] = self._cut(ids)

    def _cut(self, ids) -> List[int]:
        keep = self.max_length
        if keep is None or len(ids) <= keep:
            return list(ids)
        if getattr(self.tokenizer, "truncation_side", "right") == "left":
            return list(ids[len(ids) - keep:])
        return list(ids[:keep])

    def ids(self, string: str) -> List[int]:
        if string not in self._ids:
            self.fill([string])
        return self._ids[string]

    def counts(self, strings: List[str]) -> List[int]:
        self.fill(strings)
        return [len(self._ids[s]) for s in strings]

    def forget(self, strings: Sequence[str]) -> None:
        """Drops the ids of strings no longer needed (a text's versions before word truncation)."""
        for string in strings:
            self._ids.pop(string, None)


@dataclass
class SpecialTokens:
    """What ``tokenizer(text, add_special_tokens=True, truncation=True, max_length=m)`` adds to the plain
    ids, for a fast (Rust) tokenizer: the content is cut to ``m - len(prefix) - len(suffix)`` on the
    tokenizer's truncation side, then wrapped in ``prefix`` and ``suffix``."""
    prefix: List[int]
    suffix: List[int]
    truncation_side: str = "right"

    @classmethod
    def detect(cls, tokenizer) -> Optional["SpecialTokens"]:
        """Probes the tokenizer; None when it is not a fast tokenizer or adds anything but a fixed
        prefix and suffix (then the caller tokenises the final strings directly)."""
        if not getattr(tokenizer, "is_fast", False):
            return None
        found = None
        for probe in _PROBES:
            plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
            full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
            if not plain:
                return None
            split = _find(full, plain)
            if split is None:
                return None
            affixes = (full[:split], full[split + len(plain):])
            if found is not None and affixes != found:
                return None
            found = affixes
        return cls(list(found[0]), list(found[1]), getattr(tokenizer, "truncation_side", "right"))

    @property
    def count(self) -> int:
        return len(self.prefix) + len(self.suffix)

    def apply(self, ids: List[int], max_length: int) -> List[int]:
        room = max_length - self.count
        if room < 0:
            raise ValueError(f"max_length={max_length} is shorter than the {self.count} special tokens the "
                             f"tokenizer adds")
        if len(ids) > room:
            ids = ids[:room] if self.truncation_side != "left" else (ids[len(ids) - room:] if room else [])
        return self.prefix + ids + self.suffix


def _find(haystack: List[int], needle: List[int]) -> Optional[int]:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start:start + len(needle)] == needle:
            return start
    return None


@dataclass
class Plan:
    """Per input: the model's token ids and the embed count (tokens of the text part alone, capped at
    max_length), plus the final strings (for inspection)."""
    input_ids: List[List[int]]
    embed_counts: List[int]
    prepared: List[str]


def plan_inputs(items: Sequence[InputItem], tokenizer, prepare, max_length: int, doc_max_length: int,
                cache: Optional[TokenCache] = None, specials: Optional[SpecialTokens] = None,
                direct: bool = False) -> Plan:
    """llm2vec's ``_convert_to_str`` + ``prepare_for_tokenization`` + ``tokenize`` for many inputs.

    ``prepare`` maps the joined string to the final one (templates, EOS text). ``direct=True`` (or no
    ``specials``) tokenises the final strings with special tokens directly instead of reusing the plain
    ids: the slow, always-exact way (and what tests compare against).
    """
    cache = cache or TokenCache(tokenizer, max_length)
    texts, _ = truncate_by_words([text for _, text in items], cache.counts, max_length, doc_max_length,
                                 discard=cache.forget)
    prepared = [prepare(join_instruction(instruction, text)) for (instruction, _), text in zip(items, texts)]
    split = [split_separator(p) for p in prepared]
    finals = [final for final, _ in split]
    parts = [part for _, part in split]
    cache.fill(parts + (finals if (specials is not None and not direct) else []))
    embed_counts = [min(len(cache.ids(part)), max_length) for part in parts]
    if specials is not None and not direct:
        input_ids = [specials.apply(cache.ids(final), max_length) for final in finals]
    else:
        input_ids = tokenize_with_specials(tokenizer, finals, max_length)
    return Plan(input_ids, embed_counts, prepared)


def tokenize_with_specials(tokenizer, strings: List[str], max_length: int) -> List[List[int]]:
    out: List[List[int]] = []
    for batch in char_batches(list(strings)):
        out.extend(list(ids) for ids in tokenizer(batch, add_special_tokens=True, truncation=True,
                                                 max_length=max_length, padding=False, return_attention_mask=False,
                                                 return_token_type_ids=False)["input_ids"])
    return out


def left_padded(input_ids: List[List[int]], embed_counts: List[int], pad_id: int) -> Tuple[list, list, list]:
    """llm2vec's padded features as nested lists: ids, attention_mask and embed_mask, left-padded to the
    longest; embed_mask marks the last ``n`` positions of each row (``n`` the embed count)."""
    width = max((len(ids) for ids in input_ids), default=0)
    ids_rows, mask_rows, embed_rows = [], [], []
    for ids, n in zip(input_ids, embed_counts):
        pad = width - len(ids)
        ids_rows.append([pad_id] * pad + list(ids))
        mask_rows.append([0] * pad + [1] * len(ids))
        n = min(n, width)
        embed_rows.append([0] * (width - n) + [1] * n)
    return ids_rows, mask_rows, embed_rows
