"""The drop-in ``LLM2Vec`` encoder (llm2vec 0.2.3's API and embeddings) with the packed fast path.

    from llm2vec_fast import LLM2Vec
    encoder = LLM2Vec.from_pretrained(path, pooling_mode="mean", dtype=torch.bfloat16)
    emb = encoder.encode(["a text", ["an instruction", "a text"]])   # (2, hidden) float32, CPU

``text.py`` holds llm2vec's string rules, ``tokenization.py`` the tokenise-once plan, ``loading.py``
the checkpoint rules and ``llm2vec.py`` the class; ``files.py`` encodes .txt/.jsonl/.parquet files into
resumable shards (``python -m llm2vec_fast.encoder.files``), ``st_adapter.py`` wraps an encoder as a
sentence-transformers ``SentenceTransformer``.
"""
from .llm2vec import LLM2Vec, POOLING_MODES, token_batches
from .text import SEPARATOR, normalize_inputs, prepare_for_tokenization

__all__ = ["LLM2Vec", "POOLING_MODES", "SEPARATOR", "normalize_inputs", "prepare_for_tokenization", "token_batches"]
