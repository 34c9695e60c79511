"""The end-to-end demo on the bundled MiniLM retriever, SmolLM2 generator and Wikipedia corpus.

Today it runs retrieve-then-generate on questions made from the corpus and reports retrieval
recall@k; fine-tuning (LSR, RALT) and the federated run join it as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import assets
from .generator import Generator
from .retriever import DualEncoder

PROMPT = ("Answer the question using the context.\n\nContext:\n{context}\n\n"
          "Question: {query}\nAnswer:")


def make_questions(corpus: list[dict], count: int, seed: int = 0) -> list[dict]:
    """"What is <title>?" with the article's short description as the answer."""
    rng = np.random.default_rng(seed)
    usable = [i for i, e in enumerate(corpus) if e.get("description")]
    picked = rng.choice(usable, size=min(count, len(usable)), replace=False)
    return [{"query": f"What is {corpus[i]['title']}?", "response": corpus[i]["description"],
             "gold": int(i)} for i in picked]


def run_demo(num_passages: int = 1000, num_questions: int = 8, top_k: int = 3,
             out_dir: Path = Path("reports/demo")) -> dict:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    corpus = assets.load_corpus()[:num_passages]
    retriever = DualEncoder.from_pretrained(assets.retriever_path(), max_length=128)
    generator = Generator.from_pretrained(assets.generator_path())
    timings["load_s"] = time.perf_counter() - start

    t = time.perf_counter()
    passages = [f"{e['title']}: {e['extract']}" for e in corpus]
    embeddings = retriever.encode_context(passages)
    timings["index_s"] = time.perf_counter() - t

    questions = make_questions(corpus, num_questions)
    t = time.perf_counter()
    q = retriever.encode_query([x["query"] for x in questions])
    top = np.argsort(-(q @ embeddings.T), axis=1)[:, :top_k]
    prompts = [PROMPT.format(context="\n".join(passages[j][:400] for j in row), query=x["query"])
               for x, row in zip(questions, top, strict=True)]
    answers = generator.generate(prompts, max_new_tokens=32)
    timings["answer_s"] = time.perf_counter() - t

    rows = [{"query": x["query"], "gold": x["response"], "answer": a,
             "sources": [corpus[j]["title"] for j in row],
             "hit": bool(x["gold"] in row)} for x, row, a in zip(questions, top, answers,
                                                                   strict=True)]
    summary = {"passages": len(corpus), "questions": len(rows),
               f"recall@{top_k}": float(np.mean([r["hit"] for r in rows])),
               **{k: round(v, 1) for k, v in timings.items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "answers.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    for r in rows:
        print(f"Q: {r['query']}\nA: {r['answer']}\n   sources: {r['sources']}\n")
    return {"summary": summary, "rows": rows}
