"""Draw the seeded per-kind sample of generated questions that is checked by reading, and
score the reader's verdicts (docs/questions.md describes the method).

    python scripts/question_sample.py draw  --out docs/questions_sample_v1.jsonl  # 50 per kind
    python scripts/question_sample.py score --sample docs/questions_sample_v1.jsonl

``draw`` writes one line per question: {n, kind, rule, query, answers, title, gold_id,
evidence, ok: null, why: ""}; the reader sets ``ok`` (true: well-formed, answer correct and
supported by the passage, unambiguous) and a reason when false. ``score`` prints precision
per kind (and per rule) and exits non-zero while verdicts are missing. ``draw`` refuses to
overwrite a sample that holds verdicts unless --force.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def draw(args) -> None:
    from fedrag_jax.indexing import load_corpus
    from fedrag_jax.questions import generate_questions, kind_counts

    out = Path(args.out)
    if out.is_file() and not args.force and any(
            json.loads(line).get("ok") is not None for line in out.read_text().splitlines()):
        raise SystemExit(f"{out} holds verdicts; pass --force to draw a new sample over it")
    questions = generate_questions(load_corpus(args.corpus))
    counts = kind_counts(questions)
    rng = np.random.default_rng(args.seed)
    lines = []
    for kind in counts:
        if args.kinds and kind not in args.kinds:
            continue
        pool = [q for q in questions if q["kind"] == kind]
        pick = sorted(rng.choice(len(pool), size=min(args.per_kind, len(pool)), replace=False))
        for i in pick:
            q = pool[i]
            lines.append({"n": len(lines), "kind": kind, "rule": q["rule"], "query": q["query"],
                          "answers": q["answers"], "title": q["title"],
                          "gold_id": q["gold_id"], "evidence": q["evidence"], "ok": None,
                          "why": ""})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    print(f"wrote {len(lines)} questions ({dict(Counter(line['kind'] for line in lines))}) "
          f"to {out}; questions per kind in the corpus: {counts}")


def score(args) -> int:
    rows = [json.loads(line) for line in Path(args.sample).read_text().splitlines()]
    missing = [r["n"] for r in rows if r["ok"] is None]
    per_kind: dict[str, list[bool]] = defaultdict(list)
    per_rule: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        if r["ok"] is not None:
            per_kind[r["kind"]].append(bool(r["ok"]))
            per_rule[f"{r['kind']}/{r['rule']}"].append(bool(r["ok"]))
    print("| kind | checked | correct | precision |\n|---|---|---|---|")
    for kind, v in per_kind.items():
        print(f"| {kind} | {len(v)} | {sum(v)} | {sum(v) / len(v):.2f} |")
    print("\n| kind/rule | checked | correct |\n|---|---|---|")
    for rule, v in sorted(per_rule.items()):
        print(f"| {rule} | {len(v)} | {sum(v)} |")
    for r in rows:
        if r["ok"] is False:
            print(f"- [{r['kind']}] {r['query']} -> {r['answers']}: {r['why']}")
    if missing:
        print(f"{len(missing)} questions have no verdict yet (n = {missing[:10]} ...)")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("draw")
    d.add_argument("--out", default="docs/questions_sample_new.jsonl")
    d.add_argument("--corpus", default="bundled")
    d.add_argument("--per-kind", type=int, default=50)
    d.add_argument("--seed", type=int, default=17)
    d.add_argument("--kinds", nargs="+", default=None, help="only these kinds")
    d.add_argument("--force", action="store_true")
    s = sub.add_parser("score")
    s.add_argument("--sample", default="docs/questions_sample_v1.jsonl")
    args = p.parse_args(argv)
    if args.cmd == "draw":
        draw(args)
        return 0
    return score(args)


if __name__ == "__main__":
    raise SystemExit(main())
