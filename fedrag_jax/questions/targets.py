"""Training targets for generated questions: the bare answer, or a sentence that states it.

RA-DIT's generator tuning keeps the model reading its context by mixing in data whose
answers are grounded in the passage; a bare span ("1878") teaches a short-answer template
instead, and the untuned model's own style ("Pope Pius IX died in 1878.") is lost. The
"sentence" target is the passage sentence that states the answer (``evidence``), cut at the
first clause boundary after the answer so it stays short:

    "Gamal Abdel Nasser Hussein was an Egyptian military officer and revolutionary who
    served as the second president of Egypt from 1954 until his death in 1970."
    -> "Gamal Abdel Nasser Hussein was an Egyptian military officer ... from 1954 until his
    death in 1970." (24 words or fewer stay whole)
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import DataError

TARGETS = ("answer", "sentence")
_BOUNDARY = re.compile(r",\s|;\s|\s\(|\s–\s|\s—\s")


def sentence_target(record: dict, max_words: int = 24, min_words: int = 10) -> str:
    """The evidence sentence; one of over ``max_words`` words is cut at the first clause
    boundary after the canonical answer that leaves at least ``min_words`` words. Where the
    sentence does not hold the answer as a word sequence ("Roman art" for "The art of
    Ancient Rome ..."), the answer itself: a target must state it."""
    evidence = " ".join(str(record.get("evidence") or "").split())
    answer = str(record["response"]).strip()
    match = re.search(r"(?<!\w)" + re.escape(answer) + r"(?!\w)", evidence, re.IGNORECASE)
    if match is None:
        return answer + ("" if answer.endswith(".") else ".")
    text = evidence
    if len(evidence.split()) > max_words:
        for cut in _BOUNDARY.finditer(evidence, match.end()):
            head = evidence[:cut.start()]
            if len(head.split()) >= min_words:
                text = head
                break
    text = text.rstrip(" ,;:.")
    return text + "."


def with_targets(records: Iterable[dict], target: str) -> list[dict]:
    """Copies of ``records`` whose ``response`` (what LSR scores and RALT trains on) is
    ``target``: "answer" (the canonical answer) or "sentence" (:func:`sentence_target`).
    ``answers`` (what evaluation accepts) is left as it is."""
    if target not in TARGETS:
        raise DataError(f"question target must be one of {TARGETS}, got {target!r}")
    out = []
    for r in records:
        r = dict(r)
        if target == "sentence":
            r["response"] = sentence_target(r)
        out.append(r)
    return out
