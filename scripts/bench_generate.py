"""Decode throughput of the bundled SmolLM2-135M-Instruct: fedrag-jax vs transformers (PyTorch).

Same weights (dequantized from the bundled GGUF), fp32, greedy, exactly ``--new-tokens`` new
tokens per row (early stopping disabled on both sides), the same FanOutQA questions (chat
template) at each batch size, same machine, one run. Each side is warmed up (compiled) once,
then timed best-of-N. Also times a 1-token generate (prefill + first token) to split the
per-step decode cost from the prefill, measures the machine's memory read bandwidth, and puts
batch-1 decode next to its floor (every weight read once per token). Prints tables and writes
JSON.

    python scripts/bench_generate.py [--batches 1 8] [--new-tokens 64] [--repeats 3]
                                     [--skip-torch] [--out FILE]

``--fusion``: instead, the decode cost of the two ways a RAG system puts its top-k passages
into the generator, on the same queries (bundled MiniLM retriever over the first
``--corpus-limit`` passages of the bundled corpus, bundled SmolLM2, chat template, k=3,
passages cut to 160 tokens as retrieval.max_context_tokens does): concat (one prompt of k
passages per query) against ensemble (REPLUG: k prompts per query, one batched KV-cache
decode mixing their next-token distributions), with and without the shared prompt prefix.
Then a sanity run: the questions (``SANITY_QUESTIONS``: facts stated in a passage) answered
(EOS on) by both, untuned, and the per-token log p of the gold answer under each.

    python scripts/bench_generate.py --fusion [--queries 8] [--new-tokens 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def time_it(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls after one warm-up (compile) call, and the last result."""
    out = fn()  # warm-up (and compile)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Read bandwidth (bytes/s): best of a threaded sum and a BLAS dot over ~1 GiB of fp32."""
    import numpy as np

    a = np.ones(nbytes // 4, np.float32)  # ones, not empty: fault every page in first
    threads = os.cpu_count() or 1
    chunks = np.array_split(a, threads)

    def best(fn) -> float:
        fn()
        seconds = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            seconds = min(seconds, time.perf_counter() - start)
        return a.nbytes / seconds

    with ThreadPoolExecutor(threads) as pool:
        sum_bw = best(lambda: list(pool.map(np.sum, chunks)))
    dot_bw = best(lambda: np.dot(a, a))  # reads a once (both operands are the same buffer)
    return {"bytes": a.nbytes, "threads": threads, "sum_bytes_per_s": sum_bw,
            "dot_bytes_per_s": dot_bw, "bytes_per_s": max(sum_bw, dot_bw)}


def load_prompts(n: int) -> list[str]:
    from fedrag_jax import assets

    questions = json.loads(assets.questions_path().read_text(encoding="utf-8"))
    return [q["question"] for q in questions[:n]]


def compare_tokens(ours, theirs, stop_ids) -> tuple[bool, int]:
    """Equal up to our first stop token (theirs suppresses EOS there via min_new_tokens)."""
    import numpy as np

    stops = np.flatnonzero(np.isin(ours, stop_ids))
    n = int(stops[0]) if stops.size else len(ours)
    return bool(np.array_equal(ours[:n], theirs[:n])), n


# --fusion's sanity questions: the answer is a fact that the gold article's passage states
# (never its title); the index holds these articles and the first --corpus-limit others
SANITY_QUESTIONS = [
    ("Who wrote the play Hamlet?", "William Shakespeare", "Hamlet"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", "Mona Lisa"),
    ("What is the chemical symbol of gold?", "Au", "Gold"),
    ("What is the atomic number of gold?", "79", "Gold"),
    ("Counting from the Sun, which planet is Jupiter?", "fifth", "Jupiter"),
    ("Which river is Paris located on?", "Seine", "Paris"),
    ("How many days does the Moon take to complete an orbit relative to Earth and the Sun?",
     "29.5", "Moon"),
    ("Which theory is Albert Einstein best known for developing?", "relativity",
     "Albert Einstein"),
]


def fusion_bench(args) -> None:
    """concat vs ensemble decode cost on the same queries, then their answers (see module doc)."""
    import jax
    import numpy as np

    from fedrag_jax import assets
    from fedrag_jax.evals.metrics import exact_match, normalize_answer
    from fedrag_jax.generator import Generator, bucket_length, shared_prefix_length
    from fedrag_jax.indexing import build_store, load_corpus
    from fedrag_jax.rag import RAGSystem
    from fedrag_jax.retriever import DualEncoder
    from fedrag_jax.types import RAGConfig

    k, n_new, tau = 3, args.new_tokens, 0.05  # tau: lsr.tau_retrieval, the default fusion one
    everything = load_corpus("bundled")
    by_title = {r["title"]: r for r in everything}
    questions = [{"query": q, "response": a, "gold_id": by_title[t]["id"]}
                 for q, a, t in SANITY_QUESTIONS[:args.queries]]
    gold = {q["gold_id"] for q in questions}
    corpus = [r for r in everything if r["id"] in gold] + \
        [r for r in everything[:args.corpus_limit] if r["id"] not in gold]
    retriever = DualEncoder.from_pretrained(assets.retriever_path(), max_length=128)
    print(f"indexing {len(corpus)} passages ...", flush=True)
    store = build_store(corpus, retriever, backend="exact", progress=False)
    generator = Generator.from_pretrained(assets.generator_path())
    config = RAGConfig(top_k=k, fusion_temperature=tau)
    rag = RAGSystem(retriever, store, generator, config, max_new_tokens=n_new,
                    max_context_tokens=160)
    queries = [q["query"] for q in questions]
    sources = rag.batch_retrieve(queries)
    concat_ids = generator.encode_prompts([rag.build_prompt(q, s)
                                           for q, s in zip(queries, sources, strict=True)])
    groups = generator.encode_prompt_groups([rag.passage_prompts(q, s)
                                       for q, s in zip(queries, sources, strict=True)])
    log_weights = rag.fusion_log_weights(sources)

    eos_ids = generator.stop_ids.copy()
    generator.stop_ids = np.asarray([-1], np.int32)  # timing: exactly n_new tokens
    flat = [p for ps in groups for p in ps]
    prefix = shared_prefix_length(flat)
    modes = {
        "concat": (len(queries), bucket_length(max(map(len, concat_ids)),
                                               generator.length_buckets), 0,
                   lambda n: generator.generate_ids(concat_ids, n)),
        "ensemble": (len(flat), bucket_length(max(len(p) - prefix for p in flat),
                                              generator.length_buckets), prefix,
                     lambda n: generator.generate_ensemble_ids(groups, log_weights, n)),
        "ensemble, no shared prefix": (
            len(flat), bucket_length(max(map(len, flat)), generator.length_buckets), 0,
            lambda n: generator.generate_ensemble_ids(groups, log_weights, n,
                                                      share_prefix=False)),
    }
    load_before = os.getloadavg()
    for *_, fn in modes.values():  # compile both lengths of every mode first
        fn(n_new), fn(1)
    # round-robin, best of --repeats: on a shared machine a burst of load hits every mode
    best = {name: [float("inf"), float("inf")] for name in modes}
    for repeat in range(args.repeats):
        for name, (*_, fn) in modes.items():
            for j, n in enumerate((n_new, 1)):
                start = time.perf_counter()
                fn(n)
                best[name][j] = min(best[name][j], time.perf_counter() - start)
        print(f"  round {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{name} {b[0]:.2f} s" for name, b in best.items()), flush=True)
    rows = []
    for name, (n_rows, padded, shared, _) in modes.items():
        full, one = best[name]
        rows.append({"mode": name, "rows": n_rows, "padded_prompt_length": padded,
                     "shared_prefix": shared, "seconds": full, "seconds_1_token": one,
                     "decode_ms_per_step": (full - one) / (n_new - 1) * 1e3,
                     # the work that explains the times: tokens through the model in the
                     # prefill, and the KV-cache slots all rows attend to at the last step
                     "prefill_tokens": n_rows * padded + shared,
                     "kv_slots_last_step": n_rows * (shared + padded + n_new)})
    generator.stop_ids = eos_ids
    load_after = os.getloadavg()
    base = rows[0]
    print(f"\nconcat vs ensemble: SmolLM2-135M-Instruct fp32 ({jax.default_backend()}), "
          f"{len(queries)} queries x k={k} passages (<= 160 tokens each), greedy, {n_new} new "
          f"tokens per query (no early stop), best of {args.repeats}; 1-min load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after on {os.cpu_count()} cpus")
    print(f"{'mode':<28} {'rows':>4} {'prompt':>6} {'prefix':>6} {'prefill tok':>11} "
          f"{'KV slots':>8} {'prefill ms':>10} {'decode ms/step':>14} {'total s':>8} "
          f"{'total vs concat':>15} {'prefill vs':>10} {'step vs':>8}")
    for r in rows:
        r["total_ratio_vs_concat"] = r["seconds"] / base["seconds"]
        r["prefill_ratio_vs_concat"] = r["seconds_1_token"] / base["seconds_1_token"]
        r["decode_ratio_vs_concat"] = r["decode_ms_per_step"] / base["decode_ms_per_step"]
        print(f"{r['mode']:<28} {r['rows']:>4} {r['padded_prompt_length']:>6} "
              f"{r['shared_prefix']:>6} {r['prefill_tokens']:>11} {r['kv_slots_last_step']:>8} "
              f"{r['seconds_1_token'] * 1e3:>10.1f} {r['decode_ms_per_step']:>14.1f} "
              f"{r['seconds']:>8.3f} {r['total_ratio_vs_concat']:>14.2f}x "
              f"{r['prefill_ratio_vs_concat']:>9.2f}x {r['decode_ratio_vs_concat']:>7.2f}x")
    print("(prompt = padded prompt tokens per row after the shared prefix, which runs once; "
          "prefill tok = tokens through the model before the first new one; KV slots = cache "
          "slots attended at the last step, all rows; prefill ms = a 1-token generate; decode "
          "ms/step = (t(n) - t(1)) / (n - 1); 'vs' columns: ratio to concat)")

    # --- sanity: answers of both, untuned, EOS on ------------------------------------------
    answers, gold_logp = {}, {}
    golds = [q["response"] for q in questions]
    for fusion in ("concat", "ensemble"):
        rag.config = RAGConfig(top_k=k, fusion=fusion, fusion_temperature=tau)
        answers[fusion] = [r.answer for r in rag.batch_query(queries)]
        gold_logp[fusion] = rag.score(queries, golds, reduction="mean").tolist()
    gold_in_top = [any(s.node_id == q["gold_id"] for s in row)
                   for q, row in zip(questions, sources, strict=True)]
    sanity = []
    print(f"\nanswers (untuned, EOS on, up to {n_new} tokens); P_R = softmax(s / {tau})")
    for i, q in enumerate(questions):
        weights = np.exp(log_weights[i])
        row = {"query": q["query"], "gold": q["response"], "gold_in_top_k": gold_in_top[i],
               "weights": weights.round(3).tolist()}
        print(f"- {q['query']}  [gold: {q['response']}; gold passage in top {k}: "
              f"{gold_in_top[i]}; P_R {np.round(weights, 2).tolist()}]")
        for fusion in ("concat", "ensemble"):
            contained = normalize_answer(q["response"]) in normalize_answer(answers[fusion][i])
            row[fusion] = {"answer": answers[fusion][i], "answer_contained": contained,
                           "exact_match": exact_match(answers[fusion][i], q["response"]),
                           "gold_mean_logprob": gold_logp[fusion][i]}
            print(f"    {fusion:<8} {answers[fusion][i]!r} (contained {contained}, "
                  f"mean log p(gold) {gold_logp[fusion][i]:.2f})")
        sanity.append(row)
    for fusion in ("concat", "ensemble"):
        print(f"{fusion}: answer contained {sum(r[fusion]['answer_contained'] for r in sanity)}"
              f"/{len(sanity)}, EM {sum(r[fusion]['exact_match'] for r in sanity):.0f}"
              f"/{len(sanity)}, mean log p(gold) per token "
              f"{np.mean(gold_logp[fusion]):.3f}")

    out = Path(args.out if args.out != "bench_results/generate.json"
               else "bench_results/generate_fusion.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "smollm2_fusion", "new_tokens": n_new, "top_k": k, "queries": queries,
        "fusion_temperature": tau, "corpus_passages": len(corpus), "repeats": args.repeats,
        "machine": platform.machine(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
        "load_average_before": load_before, "load_average_after": load_after,
        "jax_version": jax.__version__, "results": rows, "sanity": sanity}, indent=2))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench_results/generate.json")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--fusion", action="store_true",
                        help="concat vs ensemble fusion instead (see the module doc)")
    parser.add_argument("--queries", type=int, default=len(SANITY_QUESTIONS),
                        help="--fusion: questions (the first of SANITY_QUESTIONS)")
    parser.add_argument("--corpus-limit", type=int, default=1000,
                        help="--fusion: passages of the bundled corpus to index")
    args = parser.parse_args()
    n_new = args.new_tokens
    if n_new < 2:
        parser.error("--new-tokens must be >= 2 (the decode step is timed as t(n) - t(1))")
    if args.fusion:
        fusion_bench(args)
        return

    import jax
    import numpy as np
    from flax import nnx

    from fedrag_jax import assets
    from fedrag_jax.generator import Generator, bucket_length
    from fedrag_jax.models.hf import load_tokenizer
    from fedrag_jax.models.llama import CausalLM

    gguf = assets.generator_path()
    tokenizer = load_tokenizer(gguf)
    model = CausalLM.from_pretrained(gguf)
    c = model.config
    generator = Generator(model, tokenizer)
    eos_ids = generator.stop_ids.copy()
    generator.stop_ids = np.asarray([-1], np.int32)  # no early stop: exactly n_new tokens
    pad_id = generator.pad_id
    prompts = load_prompts(max(args.batches))
    prompt_ids = generator.encode_prompts(prompts)

    # parameter bytes: each stored once (the tied embedding is one array, read whole by the
    # LM head at every step; the embedding lookup itself touches only one row per token)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    n_params = sum(int(p.size) for p in params)
    param_bytes = sum(int(p.size) * p.dtype.itemsize for p in params)

    load_before = os.getloadavg()
    print(f"measuring memory bandwidth ({os.cpu_count()} cpus, load average "
          f"{load_before[0]:.1f}) ...", flush=True)
    bandwidth = memory_bandwidth()

    # rows: (implementation, batch, seconds for n_new tokens, seconds for a 1-token generate)
    ours_name = f"fedrag-jax (jit, {jax.default_backend()})"
    rows = []
    ours_tokens = {}
    for b in args.batches:
        ids = prompt_ids[:b]
        full, out = time_it(lambda ids=ids: generator.generate_ids(ids, n_new), args.repeats)
        one, _ = time_it(lambda ids=ids: generator.generate_ids(ids, 1), args.repeats)
        ours_tokens[b] = out
        rows.append((ours_name, b, full, one))
        print(f"  {ours_name} batch {b}: {full:.3f} s for {n_new} tokens", flush=True)

    checks = {}
    if not args.skip_torch:
        import torch
        import transformers

        ref = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        theirs_name = f"transformers {transformers.__version__} (torch {torch.__version__})"
        for b in args.batches:
            ids = prompt_ids[:b]
            ids_np = np.full((b, max(len(p) for p in ids)), pad_id, np.int64)
            mask_np = np.zeros(ids_np.shape, np.int64)
            for i, p in enumerate(ids):
                ids_np[i, ids_np.shape[1] - len(p):] = p
                mask_np[i, ids_np.shape[1] - len(p):] = 1
            ids_t, mask_t = torch.from_numpy(ids_np), torch.from_numpy(mask_np)

            def torch_generate(n, ids_t=ids_t, mask_t=mask_t):
                with torch.inference_mode():
                    out = ref.generate(input_ids=ids_t, attention_mask=mask_t,
                                       max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                       pad_token_id=pad_id)
                return out[:, ids_t.shape[1]:].numpy()

            full, out = time_it(lambda: torch_generate(n_new), args.repeats)
            one, _ = time_it(lambda: torch_generate(1), args.repeats)
            rows.append((theirs_name, b, full, one))
            print(f"  {theirs_name} batch {b}: {full:.3f} s for {n_new} tokens", flush=True)
            assert out.shape == (b, n_new), out.shape
            per_row = [compare_tokens(o, t, eos_ids) for o, t in zip(ours_tokens[b], out,
                                                                      strict=True)]
            checks[b] = {"rows_identical": sum(ok for ok, _ in per_row), "rows": b,
                         "compared_tokens": [n for _, n in per_row]}

    # --- throughput table --------------------------------------------------------------------
    load_after = os.getloadavg()
    print(f"\nSmolLM2-135M-Instruct generate, fp32, greedy, {n_new} new tokens per row "
          f"(no early stop), prompts = first FanOutQA dev questions (chat template), "
          f"best of {args.repeats}; 1-min load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after on {os.cpu_count()} cpus")
    print(f"{'implementation':<44} {'batch':>5} {'prompt':>6} {'new tok/s':>10} "
          f"{'ms/token':>9} {'prefill ms':>10} {'decode ms/step':>14} {'vs transformers':>15}")
    reference = {b: full for name, b, full, _ in rows if name != ours_name}
    results = []
    for name, b, full, one in rows:
        tok_s = b * n_new / full
        ms_token = full / n_new * 1e3
        decode_ms = (full - one) / (n_new - 1) * 1e3
        ratio = reference[b] / full if b in reference else None
        if name == ours_name:
            prompt_len = bucket_length(max(len(p) for p in prompt_ids[:b]),
                                       generator.length_buckets)
        else:
            prompt_len = max(len(p) for p in prompt_ids[:b])
        print(f"{name:<44} {b:>5} {prompt_len:>6} {tok_s:>10.1f} {ms_token:>9.1f} "
              f"{one * 1e3:>10.1f} {decode_ms:>14.1f} "
              f"{f'{ratio:.2f}x' if ratio is not None else '-':>15}")
        results.append({"implementation": name, "batch": b, "padded_prompt_length": prompt_len,
                        "seconds": full, "seconds_1_token": one, "new_tokens_per_s": tok_s,
                        "ms_per_token": ms_token, "decode_ms_per_step": decode_ms,
                        "ratio_vs_transformers": ratio})
    print("(ms/token = whole generate / new tokens, i.e. per decode step for the whole batch; "
          "prefill ms = a 1-token generate; decode ms/step = (t(n) - t(1)) / (n - 1))")

    for b, check in checks.items():
        if b == 1:
            n = check["compared_tokens"][0]
            note = (f"all {n} tokens" if n == n_new else
                    f"first {n} tokens, up to our EOS; min_new_tokens suppresses EOS on theirs")
            print(f"tokens identical: {'yes' if check['rows_identical'] == 1 else 'no'} "
                  f"(batch 1, {note})")
        else:
            print(f"batch {b}: {check['rows_identical']}/{b} rows identical (up to each row's "
                  "first EOS of ours)")

    # --- batch-1 floor -------------------------------------------------------------------------
    floor = None
    ours_b1 = next((r for r in results if r["implementation"] == ours_name and r["batch"] == 1),
                   None)
    if ours_b1 is not None:
        bw = bandwidth["bytes_per_s"]
        floor_ms = param_bytes / bw * 1e3
        cache_len = ours_b1["padded_prompt_length"] + n_new
        cache_bytes = 2 * c.num_layers * cache_len * c.num_kv_heads * c.head_dim * 4
        floor = {"param_count": n_params, "param_bytes": param_bytes,
                 "memory_bandwidth_bytes_per_s": bw, "floor_ms_per_token": floor_ms,
                 "measured_ms_per_token": ours_b1["ms_per_token"],
                 "measured_decode_ms_per_step": ours_b1["decode_ms_per_step"],
                 "ratio": ours_b1["ms_per_token"] / floor_ms,
                 "decode_ratio": ours_b1["decode_ms_per_step"] / floor_ms,
                 "kv_cache_bytes": cache_bytes}
        print(f"\nbatch-1 floor: {n_params / 1e6:.1f} M params x 4 B = {param_bytes / 1e6:.0f} MB "
              f"read per token (tied embedding counted once: the LM head reads all of it); "
              f"memory read bandwidth {bw / 1e9:.1f} GB/s (best of threaded sum "
              f"{bandwidth['sum_bytes_per_s'] / 1e9:.1f}, dot "
              f"{bandwidth['dot_bytes_per_s'] / 1e9:.1f} over {bandwidth['bytes'] >> 20} MiB)")
        print(f"  measured {ours_b1['ms_per_token']:.1f} ms/token "
              f"(decode step alone {ours_b1['decode_ms_per_step']:.1f}), floor {floor_ms:.1f} "
              f"ms/token, ratio {floor['ratio']:.2f}x (decode step {floor['decode_ratio']:.2f}x);"
              f" the KV cache adds only {cache_bytes / 1e6:.1f} MB per step")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "smollm2_generate", "new_tokens": n_new, "batches": args.batches,
        "repeats": args.repeats, "prompts": prompts, "machine": platform.machine(),
        "cpus": os.cpu_count(), "load_average_before": load_before,
        "load_average_after": load_after, "jax_version": jax.__version__,
        "memory_bandwidth": bandwidth,
        "results": results, "token_checks": {str(b): v for b, v in checks.items()},
        "batch1_floor": floor,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
