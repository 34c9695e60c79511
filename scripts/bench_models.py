"""Forward throughput of the bundled SmolLM2-135M: fedrag-jax (jit) vs transformers (PyTorch).

Same weights (dequantized from the bundled GGUF), fp32, batch 8 x 256 tokens, same machine,
one run. Prints a table and writes JSON.

    python scripts/bench_models.py [--batch 8] [--length 256] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def flops_per_token(config) -> float:
    """2 x (matmul parameters) + attention scores/values, per token at this sequence length."""
    c = config
    per_layer = (c.hidden_size * c.head_dim * (c.num_heads * 2 + c.num_kv_heads * 2)
                 + 3 * c.hidden_size * c.intermediate_size)
    return 2.0 * (c.num_layers * per_layer + c.hidden_size * c.vocab_size)


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up (and compile)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench_results/models.json")
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from fedrag_jax import assets
    from fedrag_jax.models.llama import CausalLM

    gguf = assets.generator_path()
    model = CausalLM.from_pretrained(gguf)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, (args.batch, args.length)).astype(np.int32)
    mask = np.ones_like(ids, dtype=bool)
    tokens = args.batch * args.length
    flops = flops_per_token(model.config) * tokens

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    jax_s = time_it(lambda: forward(state, ids_j, mask_j).block_until_ready(), args.repeats)
    rows = [("fedrag-jax (jit)", jax.default_backend(), jax_s)]

    if not args.skip_torch:
        import torch
        import transformers

        ref = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
        ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

        def torch_forward():
            with torch.inference_mode():
                ref(input_ids=ids_t, attention_mask=mask_t)

        torch_s = time_it(torch_forward, args.repeats)
        rows.append((f"transformers {transformers.__version__} (torch {torch.__version__})",
                     "cpu", torch_s))

    print(f"\nSmolLM2-135M forward, fp32, batch {args.batch} x {args.length} tokens, "
          f"{flops / 1e9:.0f} GFLOP per forward, best of {args.repeats}")
    print(f"{'implementation':<48} {'device':<6} {'s/fwd':>8} {'tokens/s':>10} {'GFLOP/s':>8}")
    results = []
    for name, device, seconds in rows:
        print(f"{name:<48} {device:<6} {seconds:>8.3f} {tokens / seconds:>10.0f} "
              f"{flops / seconds / 1e9:>8.1f}")
        results.append({"implementation": name, "device": device, "seconds": seconds,
                        "tokens_per_s": tokens / seconds, "gflops_per_s": flops / seconds / 1e9})
    if len(rows) > 1:
        ratio = rows[1][2] / rows[0][2]
        print(f"\nfedrag-jax / transformers throughput ratio: {ratio:.2f}x (goal >= 1.0x on CPU)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "smollm2_forward", "batch": args.batch, "length": args.length,
        "flop_per_forward": flops, "machine": platform.machine(), "cpus": os.cpu_count(),
        "jax_version": jax.__version__, "results": results,
        "ratio_vs_transformers": rows[1][2] / rows[0][2] if len(rows) > 1 else None,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
