"""``llm2vec-fast`` command line.

    llm2vec-fast demo      encode a few example texts with a tiny built-in random-weight Llama-architecture
                           model (no download) and print their embeddings' cosine similarities
    llm2vec-fast encode    encode a .txt/.jsonl/.parquet file with an LLM2Vec checkpoint into resumable
                           .npy shards (see llm2vec_fast.encoder.files); under torchrun, split over ranks
    llm2vec-fast export    write a checkpoint and its adapters as one merged folder (llm2vec's files, or
                           sentence-transformers' with prompts; see llm2vec_fast.encoder.export)
    llm2vec-fast check     print the installation's versions and check every op and backend on this
                           device against float64 formulas (see llm2vec_fast.check)
    llm2vec-fast train     mntp | simcse | supervised --config CONFIG.json (see llm2vec_fast.training)

"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Sequence

import torch

EXAMPLE_TEXTS = (
    "The cat sat on the mat.",
    "A cat was sitting on a mat.",
    "Stock markets fell sharply on Monday.",
    "Equities dropped steeply at the start of the week.",
    "How do I bake sourdough bread?",
)

BOS, PAD, BYTE_OFFSET = 1, 0, 3  # byte-level ids: 0 pad, 1 bos, 2 eos, 3.. the 256 byte values


def byte_tokenize(texts: Sequence[str], max_length: int = 128) -> List[List[int]]:
    """A dependency-free tokenizer for the demo model: BOS followed by the text's UTF-8 bytes."""
    return [[BOS] + [b + BYTE_OFFSET for b in text.encode("utf-8")][: max_length - 1] for text in texts]


def tiny_llama(seed: int = 0):
    """A small random-weight model of the real Llama architecture (GQA 4:2, head dim 64)."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256 + BYTE_OFFSET, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=2)
    return LlamaModel(config).eval()


def embed(model, texts: Sequence[str], device: torch.device) -> torch.Tensor:
    """Right-padded batch through the model, then llm2vec_fast.pool (mean, L2-normalised)."""
    import llm2vec_fast as lf

    ids = byte_tokenize(texts)
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [PAD] * (width - len(x)) for x in ids], device=device)
    attention_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return lf.pool(hidden, attention_mask=attention_mask, mode="mean", normalize=True)


def demo(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = tiny_llama().to(device)
    start = time.perf_counter()
    embeddings = embed(model, EXAMPLE_TEXTS, device)
    elapsed = time.perf_counter() - start
    print(f"Encoded {len(EXAMPLE_TEXTS)} texts on {device} in {elapsed * 1e3:.1f} ms -> embeddings "
          f"{tuple(embeddings.shape)} {str(embeddings.dtype).replace('torch.', '')}\n")
    similarity = (embeddings @ embeddings.t()).cpu()
    print("cosine similarity (random weights: the numbers show the pipeline runs, not semantic quality)")
    print("     " + " ".join(f"{j:>6}" for j in range(len(EXAMPLE_TEXTS))))
    for i, text in enumerate(EXAMPLE_TEXTS):
        print(f"{i:>4} " + " ".join(f"{similarity[i, j]:6.3f}" for j in range(len(EXAMPLE_TEXTS))) + f"   {text}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llm2vec-fast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="encode example texts with a tiny built-in random model")
    demo_parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo_parser.set_defaults(run=demo)
    from .encoder import files  # numpy only at import; the model stack loads when the command runs

    encode_parser = commands.add_parser("encode", help="encode a text file into resumable embedding shards")
    files.add_arguments(encode_parser)
    encode_parser.set_defaults(run=files.run)
    from .encoder import export
    export_parser = commands.add_parser("export", help="write a checkpoint and its adapters as one merged folder")
    export.add_arguments(export_parser)
    export_parser.set_defaults(run=export.run)
    from . import check
    check_parser = commands.add_parser("check", help="versions, and every op and backend against float64 formulas")
    check.add_arguments(check_parser)
    check_parser.set_defaults(run=check.run)
    from .training.cli import add_train_parser  # light: torch/transformers load when the command runs
    add_train_parser(commands)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
