"""``llm2vec-fast export``: one self-contained folder from a checkpoint and its adapters.

    llm2vec-fast export --model MNTP_FOLDER --peft TRAINED_CHECKPOINT --output my-encoder
    llm2vec-fast export --model MNTP_FOLDER --peft TRAINED_CHECKPOINT --output my-encoder \\
        --format sentence-transformers --prompt "query=Given a web search query, retrieve relevant passages"

The encoder is loaded as ``llm2vec-fast encode`` loads it (``LLM2Vec.from_pretrained``: the base folder's
adapter merged, ``--peft`` on top) and written with every adapter merged into safetensors weights, in
``--dtype`` (bfloat16 by default), with the tokenizer and ``llm2vec_config.json`` (pooling mode, lengths,
skip_instruction, ``--pooling-mode`` etc. overriding the checkpoint's). The folder then loads alone:
``LLM2Vec.from_pretrained(folder)``; with ``--format sentence-transformers`` also
``load_sentence_transformer(folder)`` and ``SentenceTransformer(folder, trust_remote_code=True)``, with the
``--prompt`` NAME=TEXT pairs (llm2vec instructions), ``--default-prompt-name``, ``--similarity-fn`` and
``--truncate-dim`` recorded in ``config_sentence_transformers.json``.

An existing non-empty output folder is refused: nothing there is overwritten. An export that fails (an error
loading or writing) leaves the output folder as it found it (absent or empty), and exits with status 1 and the
message.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Dict, List, Optional, Sequence

from .files import add_model_arguments, check_model_arguments, load_encoder

FORMATS = ("llm2vec", "sentence-transformers")
SIMILARITY_FNS = ("cosine", "dot", "euclidean", "manhattan")


def parse_prompts(pairs: Sequence[str]) -> Dict[str, str]:
    """``NAME=TEXT`` strings as a dict (a name given twice is an error)."""
    prompts: Dict[str, str] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--prompt must be NAME=TEXT, got {pair!r}")
        if name.strip() in prompts:
            raise ValueError(f"--prompt names must be unique, got {name.strip()!r} twice")
        prompts[name.strip()] = text
    return prompts


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``export`` options (for ``llm2vec-fast export``)."""
    add_model_arguments(parser)
    parser.add_argument("--output", required=True, help="a new (or empty) folder for the exported model")
    parser.add_argument("--format", default="llm2vec", choices=FORMATS,
                        help="llm2vec: LLM2Vec.save's files; sentence-transformers: the same files plus "
                             "sentence-transformers' (modules.json, prompts, model card)")
    parser.add_argument("--prompt", action="append", default=[], metavar="NAME=TEXT",
                        help="a sentence-transformers prompt (an llm2vec instruction), repeatable")
    parser.add_argument("--default-prompt-name", default=None)
    parser.add_argument("--similarity-fn", default="cosine", choices=SIMILARITY_FNS)
    parser.add_argument("--truncate-dim", type=int, default=None,
                        help="sentence-transformers' truncate_dim (a Matryoshka-trained model)")
    return parser


def check_arguments(args: argparse.Namespace) -> Dict[str, str]:
    """Every refusal before the model loads: the output folder, the sentence-transformers options."""
    output = os.fspath(args.output)
    if os.path.islink(output) and not os.path.exists(output):
        raise ValueError(f"--output must be a new or empty folder, got {output!r}, a link to nothing")
    if os.path.isfile(output) or (os.path.isdir(output) and os.listdir(output)):
        raise ValueError(f"--output must be a new or empty folder (nothing is overwritten), got {output!r}, which "
                         f"holds files")
    for name, source in (("--model", args.model), ("--peft", args.peft)):
        if source is not None and os.path.isdir(source) and os.path.realpath(source) == os.path.realpath(output):
            raise ValueError(f"--output must differ from {name}, got {output!r} for both")
    check_model_arguments(args)
    prompts = parse_prompts(args.prompt)
    st_only = [flag for flag, given in (("--prompt", bool(prompts)),
                                        ("--default-prompt-name", args.default_prompt_name is not None),
                                        ("--similarity-fn", args.similarity_fn != "cosine"),
                                        ("--truncate-dim", args.truncate_dim is not None)) if given]
    if args.format != "sentence-transformers" and st_only:
        raise ValueError(f"{', '.join(st_only)} need --format sentence-transformers, got --format {args.format}")
    if args.default_prompt_name is not None and args.default_prompt_name not in prompts:
        raise ValueError(f"--default-prompt-name must be one of the --prompt names {sorted(prompts)}, got "
                         f"{args.default_prompt_name!r}")
    if args.truncate_dim is not None and args.truncate_dim < 1:
        raise ValueError(f"--truncate-dim must be a positive int, got {args.truncate_dim}")
    if args.format == "sentence-transformers":
        from .st_adapter import _check_saving_version
        _check_saving_version()
    return prompts


def run(args: argparse.Namespace) -> int:
    try:
        prompts = check_arguments(args)
    except (ValueError, ImportError) as error:  # as argparse reports a bad option: the message and exit status 2
        print(f"llm2vec-fast export: error: {error}", file=sys.stderr)
        return 2
    created = not os.path.exists(args.output)
    try:
        encoder = load_encoder(args)
        merge_adapters(encoder)
        if args.format == "sentence-transformers":
            from .st_adapter import to_sentence_transformer
            model = to_sentence_transformer(encoder, prompts=prompts, default_prompt_name=args.default_prompt_name,
                                            similarity_fn_name=args.similarity_fn, truncate_dim=args.truncate_dim,
                                            device="cpu")
            model.save(args.output)
        else:
            encoder.save(args.output)
    except BaseException as error:  # nothing half-written is left: the folder was new or empty
        remove_partial_output(args.output, created)
        if not isinstance(error, ValueError):
            raise
        print(f"llm2vec-fast export: error: {error}", file=sys.stderr)
        return 1
    files: List[str] = sorted(os.listdir(args.output))
    print(f"exported {args.model}" + (f" + {args.peft}" if args.peft else "") + f" to {args.output} "
          f"({args.format}, {args.dtype}): {', '.join(files)}")
    return 0


def merge_adapters(encoder) -> None:
    """Every adapter of the (throwaway) encoder merged into its weights by peft, whatever its kind (LoRA, DoRA,
    modules_to_save, ...), so that the folder holds one whole model."""
    from peft import PeftModel
    if isinstance(encoder.model, PeftModel):
        encoder.model = encoder.model.merge_and_unload()


def remove_partial_output(output: str, created: bool) -> None:
    """Removes what a failed export wrote: the folder it created, or the entries of the empty folder it got."""
    if created:
        shutil.rmtree(output, ignore_errors=True)
        return
    for name in os.listdir(output) if os.path.isdir(output) else []:
        path = os.path.join(output, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="llm2vec-fast export", description=__doc__.split("\n\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
