"""The ``fedrag-jax`` command. Each subcommand imports what it needs when it runs.

Every path argument goes through :mod:`fedrag_jax.paths` (local or gs://). Log lines
(``--log-level``; warnings such as resumes and fallbacks included) are separate from progress
(a bar on a terminal, a line every few seconds otherwise: :mod:`fedrag_jax.progress`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import FedRAGJaxError

LOG_LEVELS = ("debug", "info", "warning", "error")


def _detect_kind(src: Path) -> str:
    from .models import bert, llama
    from .models.hf import existing_checkpoint, read_hf_config

    src = existing_checkpoint(src)
    if src.is_file() and src.suffix == ".gguf":
        return "causal-lm"

    model_type = read_hf_config(src).get("model_type")
    if model_type in llama.SUPPORTED_MODEL_TYPES:
        return "causal-lm"
    if model_type in bert.SUPPORTED_MODEL_TYPES:
        return "encoder"
    from .errors import UnsupportedModelError

    raise UnsupportedModelError(
        f"{src}: model_type {model_type!r} is neither a supported causal LM "
        f"({', '.join(llama.SUPPORTED_MODEL_TYPES)}) nor encoder "
        f"({', '.join(bert.SUPPORTED_MODEL_TYPES)})"
    )


def cmd_convert(args: argparse.Namespace) -> int:
    """GGUF or HF folder in, HF folder (safetensors + config + tokenizer) out."""
    from .models.bert import Encoder
    from .models.hf import load_tokenizer
    from .models.llama import CausalLM
    from .outputs import check_output
    from .paths import local_copy

    check_output(args.dst, "hf-model")  # refuse a user's folder before the long load
    src = local_copy(args.src, "model")
    kind = args.kind if args.kind != "auto" else _detect_kind(src)
    start = time.perf_counter()
    cls = CausalLM if kind == "causal-lm" else Encoder
    model = cls.from_pretrained(src, dtype=args.dtype)
    tokenizer = load_tokenizer(src)
    model.save_pretrained(args.dst, tokenizer=tokenizer,
                          max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    print(f"wrote {kind} {type(model).__name__} ({args.dtype}) to {args.dst} "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


def _bundled_or(path: str | None, which: str) -> str:
    from . import assets

    if path in (None, "bundled"):
        return str(assets.retriever_path() if which == "retriever" else assets.generator_path())
    return path


def cmd_index_build(args: argparse.Namespace) -> int:
    """Encode a corpus with the retriever and persist a knowledge store (ScaNN or exact)."""
    from .indexing import build_index, load_corpus
    from .retriever import DualEncoder

    retriever_path = _bundled_or(args.retriever, "retriever")
    start = time.perf_counter()
    corpus = load_corpus(args.corpus, limit=args.limit)
    retriever = DualEncoder.from_pretrained(retriever_path, max_length=args.max_length)
    store = build_index(corpus, retriever, args.out, retriever_path=retriever_path,
                        generator_path=_bundled_or(args.generator, "generator"),
                        backend=args.backend)
    print(f"indexed {store.count} passages ({type(store).__name__}) into {args.out} "
          f"in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    """Answer a question with retrieve-then-generate over a built index."""
    from .paths import local_copy
    from .rag import RAGSystem
    from .types import RAGConfig

    index = local_copy(args.index, "index folder")  # local, or gs:// fetched once
    info_file = index / "index.json"
    if not info_file.is_file():
        from .errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(f"{index} is not an index folder (no index.json); build "
                                      "one with `fedrag-jax index build`")
    info = json.loads(info_file.read_text())
    system = RAGSystem.from_parts(retriever=args.retriever or info["retriever"],
                                  generator=args.generator or info["generator"],
                                  store=index / "store", config=RAGConfig(top_k=args.top_k),
                                  max_new_tokens=args.max_new_tokens, max_context_tokens=200,
                                  allow_foreign_store=args.allow_foreign_store)
    response = system.query(args.question)
    print(response.answer)
    print("\nsources:")
    for i, s in enumerate(response.source_nodes, 1):
        print(f"  [{i}] ({s.score:.3f}) {s.text[:100]}")
    return 0


def _start_distributed(config) -> None:
    """Join the other hosts first: nothing may touch the JAX devices before this call."""
    if config.distributed:  # every host runs this same command; JAX finds its peers
        import jax

        jax.distributed.initialize()


def setup_logging(level: str = "info") -> None:
    """fedrag_jax's log lines (federated rounds, resumes, fallbacks) on stderr at ``level``,
    whether or not progress bars are on. Third-party advisory banners stay quiet unless
    ``level`` is debug."""
    if level != "debug":
        # transformers' "PyTorch was not found" advice: the runtime never needs torch models
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logger = logging.getLogger("fedrag_jax")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                               "%H:%M:%S"))
        logger.addHandler(handler)
    # our handler prints them: a root handler some library installs (basicConfig) must not
    # print every line a second time
    logger.propagate = False
    logger.setLevel(getattr(logging, level.upper()))


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (as logging's last-resort handler
    does), not the stream that was current when the handler was made."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _secondary_hosts_quiet() -> None:
    """After jax.distributed: hosts other than the first log warnings and errors only."""
    import jax

    if jax.process_index() != 0:
        logger = logging.getLogger("fedrag_jax")
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))


def _run_training(config) -> int:
    """Train as ``config`` says (centralized or federated), save the tuned system, report."""
    _start_distributed(config)
    _secondary_hosts_quiet()
    from .finetune.manager import FinetuneManager
    from .outputs import check_output, out_path

    # the tuned system goes to output_dir/rag at the end: refuse a foreign folder now
    check_output(out_path(config.output_dir) / "rag", "rag-system")
    manager = FinetuneManager.from_config(config)
    results = manager.train()
    saved = manager.save_system()
    print(json.dumps(results, indent=2))
    print(f"run written to {config.output_dir}; tuned system in {saved} "
          f"(`fedrag-jax evaluate --rag {saved} --data FILE.jsonl` to score it, "
          f"`fedrag-jax export --system {saved} --out DIR` for HF folders)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tuning (LSR, RALT or both) from a YAML config plus key=value overrides;
    centralized unless the config sets federated: true."""
    from .config import load_config

    return _run_training(load_config(args.config, args.overrides))


def cmd_federate(args: argparse.Namespace) -> int:
    """Federated fine-tuning: `train` with federated=true forced. The engine is fed.engine
    (spmd: clients on device slices of one program; flower: Flower simulation, a Ray actor per
    client). Per-round metrics go to output_dir/federated_<method>/metrics.jsonl, the tuned
    system to output_dir/rag."""
    from .config import load_config

    return _run_training(load_config(args.config, [*args.overrides, "federated=true"]))


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a RAG system (EM, F1; recall@k and MRR when gold passage ids are known; accuracy
    on multiple-choice questions) on a benchmark read from local files or on a JSONL file."""
    from .config import load_config
    from .errors import ConfigError
    from .evals import Benchmarker, load_benchmark, load_qa_jsonl
    from .outputs import is_primary, out_path

    if (args.benchmark is None) == (args.data is None):
        raise ConfigError("pass either --data FILE.jsonl or --benchmark NAME --data-files FILE")
    if args.benchmark is not None and not args.data_files:
        raise ConfigError(f"--benchmark {args.benchmark} reads local files only: pass "
                          "--data-files with the dataset in its hub schema (JSON/JSONL/parquet)")
    if args.data is not None and args.data_files:
        raise ConfigError("--data-files goes with --benchmark; --data takes one JSONL file")
    if args.rag is not None and (args.config is not None or args.overrides):
        raise ConfigError("--rag evaluates a saved system as it is: drop --config and "
                          "key=value overrides (--top-k and --max-new-tokens still apply)")
    config = None
    if args.rag is None:
        config = load_config(args.config, args.overrides)
        _start_distributed(config)
        _secondary_hosts_quiet()

    if args.benchmark is not None:
        name = args.benchmark
        kwargs = {"split": args.split} if args.split else {}
        from .paths import local_copy

        files = [str(local_copy(f, "--data-files file")) for f in args.data_files]
        examples = load_benchmark(name, data_files=files, limit=args.limit, **kwargs)
    else:
        name = Path(str(args.data).rstrip("/").rsplit("/", 1)[-1]).stem
        examples = load_qa_jsonl(args.data, limit=args.limit)

    if args.rag is not None:
        from .rag import RAGSystem

        rag = RAGSystem.from_pretrained(args.rag,  # local or gs://
                                        allow_foreign_store=args.allow_foreign_store)
        default_out = out_path(str(args.rag).rstrip("/")).parent / "eval" / name
    else:
        from .finetune.manager import build_rag_system
        from .sharding import make_mesh

        rag, _ = build_rag_system(config, make_mesh(vars(config.mesh)))
        default_out = out_path(config.output_dir) / "eval" / name
    if args.top_k is not None:
        rag.config = dataclasses.replace(rag.config, top_k=args.top_k)
    if args.max_new_tokens is not None:
        rag.max_new_tokens = args.max_new_tokens
    out = out_path(args.output) if args.output else default_out  # local or gs://
    primary = is_primary()  # every host generates; one writes
    result = Benchmarker(rag, examples, batch_size=args.batch_size, recall_k=rag.config.top_k,
                         out_dir=out if primary else None,
                         progress=primary and (config is None or config.progress)
                         ).run(limit=args.limit)
    if primary:
        print(f"{name}: {result.num_examples} examples, top-{rag.config.top_k} retrieval\n")
        print(result.table())
        print(f"\nper-example results in {out / 'examples.jsonl'}, aggregate in "
              f"{out / 'aggregate.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Tuned retriever -> sentence-transformers folder(s); generator -> HF causal LM folder."""
    from .outputs import check_output, staged_directory
    from .rag import RAGSystem

    check_output(args.out, "export")  # refuse a user's folder before loading the system
    system = RAGSystem.from_pretrained(args.system)  # local or gs://
    r = system.retriever
    with staged_directory(args.out, kind="export") as out:  # local or gs://, atomically
        r.query_encoder.save_pretrained(out / "retriever", tokenizer=r.tokenizer)
        if r.context_encoder is not None:
            r.context_encoder.save_pretrained(out / "context_retriever", tokenizer=r.tokenizer)
        system.generator.model.save_pretrained(out / "generator",
                                               tokenizer=system.generator.tokenizer)
        names = sorted(p.name for p in out.iterdir())
    print(f"wrote {', '.join(names)} to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .outputs import check_output
    from .paths import require_local

    out = require_local(args.out, "demo --out")
    for name in ("retriever", "context_retriever", "generator"):  # before minutes of work
        check_output(out / "export" / name, "hf-model")
    run_demo(preset=args.preset, out_dir=out, overrides=args.overrides)
    print((Path(args.out) / "summary.md").read_text())
    print(f"report written to {Path(args.out).absolute()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedrag-jax",
        description="Fine-tune retrieval-augmented generation systems in JAX, centrally or "
                    "federated.")
    parser.add_argument("--version", action="version", version=f"fedrag-jax {__version__}")
    parser.add_argument("--log-level", default=None, choices=LOG_LEVELS,
                        help="log lines on stderr (resumes, fallbacks, federated rounds); "
                             "separate from progress bars (default: info)")
    parser.add_argument("-v", "--verbose", action="store_true", help="--log-level debug")
    parser.add_argument("-q", "--quiet", action="store_true", help="--log-level warning")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="GGUF or HF folder -> HF folder",
                       description=cmd_convert.__doc__)
    p.add_argument("src", help="a .gguf file or a Hugging Face model folder")
    p.add_argument("dst", help="output folder (written atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--kind", default="auto", choices=["auto", "causal-lm", "encoder"])
    p.add_argument("--max-shard-gb", type=float, default=2.0,
                   help="split the safetensors past this size (default 2 GB)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("index", help="build a knowledge store from a corpus")
    index_sub = p.add_subparsers(dest="index_command", required=True)
    p = index_sub.add_parser("build", description=cmd_index_build.__doc__,
                             help="encode a corpus and persist its store")
    p.add_argument("--corpus", default="bundled",
                   help="'bundled' (Wikipedia summaries) or a JSONL file of {id, title, text}")
    p.add_argument("--out", required=True, help="index folder to write (atomically)")
    p.add_argument("--retriever", default="bundled", help="retriever folder (default: MiniLM)")
    p.add_argument("--generator", default="bundled",
                   help="generator that `ask` should use with this index (default: SmolLM2)")
    p.add_argument("--backend", default="auto", choices=["auto", "scann", "exact"])
    p.add_argument("--limit", type=int, default=None, help="index only the first N passages")
    p.add_argument("--max-length", type=int, default=256, help="passage tokens kept")
    p.set_defaults(func=cmd_index_build)

    p = sub.add_parser("ask", help="answer a question over an index",
                       description=cmd_ask.__doc__)
    p.add_argument("question")
    p.add_argument("--index", required=True, help="folder written by `index build`")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--retriever", default=None, help="override the index's retriever")
    p.add_argument("--generator", default=None, help="override the index's generator")
    p.add_argument("--allow-foreign-store", action="store_true",
                   help="search the index even if another retriever built it")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("train", help="fine-tune (LSR / RALT) from a config",
                       description=cmd_train.__doc__)
    p.add_argument("--config", default=None,
                   help="YAML file (see configs/; configs/quickstart.yaml to start from)")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. lsr.steps=10 mesh.data=2")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("federate", help="federated fine-tuning (Flower or the SPMD simulator)",
                       description=cmd_federate.__doc__)
    p.add_argument("--config", default=None, help="YAML file (e.g. configs/federated.yaml)")
    p.add_argument("overrides", nargs="*",
                   help="key=value, e.g. fed.num_clients=4 fed.rounds=3 fed.engine=flower")
    p.set_defaults(func=cmd_federate)

    p = sub.add_parser("evaluate", help="score a RAG system on a benchmark or a JSONL file",
                       description=cmd_evaluate.__doc__,
                       epilog="examples:\n"
                              "  fedrag-jax evaluate --rag runs/quickstart/rag --data dev.jsonl\n"
                              "  fedrag-jax evaluate --config configs/quickstart.yaml "
                              "--benchmark nq_open --data-files nq_dev.jsonl --limit 200",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rag", default=None,
                   help="a saved RAG system (output_dir/rag of `train` / `federate`)")
    p.add_argument("--config", default=None,
                   help="or: evaluate the system this YAML config builds (untuned)")
    p.add_argument("overrides", nargs="*", help="key=value settings for --config")
    p.add_argument("--data", default=None,
                   help="JSONL of {query, answer or answers, optional gold_id, gold_passage, "
                        "choices + gold_choice}")
    p.add_argument("--benchmark", default=None,
                   help="a benchmark loader: mmlu, nq_open, trivia_qa, pubmedqa, boolq, "
                        "hotpotqa, squad_v2, hellaswag")
    p.add_argument("--data-files", nargs="+", default=None,
                   help="local files of --benchmark in its hub schema (nothing is downloaded)")
    p.add_argument("--split", default=None, help="split name for --benchmark (for ids)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--batch-size", type=int, default=16, help="queries per generate call")
    p.add_argument("--top-k", type=int, default=None, help="override the system's top_k")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--allow-foreign-store", action="store_true",
                   help="--rag: load the system even if another retriever built its store")
    p.add_argument("--output", default=None,
                   help="folder for examples.jsonl + aggregate.json (default: eval/NAME "
                        "beside the saved system, or under the config's output_dir)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="HF folders from a saved RAG system",
                       description=cmd_export.__doc__)
    p.add_argument("--system", required=True,
                   help="a RAGSystem folder (written by `train` / `federate` under "
                        "output_dir/rag)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="end-to-end demo on the bundled models and corpus",
                       description="Index the bundled Wikipedia summaries, evaluate the "
                                   "untuned RAG system, fine-tune it centrally (LSR, then "
                                   "RALT with LoRA) and federated (3 clients, non-IID by "
                                   "topic), and write a report with before/after metrics.")
    p.add_argument("--preset", default="quick", choices=["quick", "full"])
    p.add_argument("--out", default="reports/demo")
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. lsr.steps=20")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if sum((args.log_level is not None, args.verbose, args.quiet)) > 1:
        parser.error("give one of --log-level, -v and -q")
    setup_logging(args.log_level or ("debug" if args.verbose else
                                     "warning" if args.quiet else "info"))
    try:
        return args.func(args)
    except FedRAGJaxError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
