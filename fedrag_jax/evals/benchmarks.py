"""Benchmark loaders: eight QA / multiple-choice datasets as one ``BenchmarkExample`` type.

Every loader reads the dataset's Hugging Face hub schema, from one of three sources:

- ``"files"``: local JSON / JSONL / parquet / CSV files in that schema (``data_files=``),
  read with ``datasets.load_dataset(<format>, data_files=...)``; nothing is downloaded;
- ``"hub"``: the dataset on the Hugging Face hub (needs network or a warm cache);
- ``"tfds"``: TensorFlow Datasets, for the five that TFDS builds; needs TensorFlow.

``"auto"`` (the default) means files when ``data_files`` is given, else the hub.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, DataError
from ..jsonl import read_jsonl

DataFiles = str | os.PathLike | Sequence[str | os.PathLike] | Mapping[str, Any]
SOURCES = ("auto", "hub", "files", "tfds")
_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class BenchmarkExample:
    """One benchmark question with its gold answers (and choices / gold passage if any).

    ``answers == []`` means unanswerable (SQuAD v2): the correct prediction is "".
    Multiple-choice examples carry ``choices`` and ``gold_choice``, with
    ``answers == [choices[gold_choice]]``.
    """

    example_id: str
    query: str
    answers: list[str]
    choices: list[str] | None = None
    gold_choice: int | None = None
    gold_passage: str | None = None
    gold_passage_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.choices is None) != (self.gold_choice is None):
            raise DataError(f"example {self.example_id!r}: choices and gold_choice must be "
                            "given together")
        if self.choices is not None and not 0 <= self.gold_choice < len(self.choices):
            raise DataError(f"example {self.example_id!r}: gold_choice {self.gold_choice} is "
                            f"out of range for {len(self.choices)} choices")

    @property
    def is_multiple_choice(self) -> bool:
        return self.choices is not None


# --- reading one row -----------------------------------------------------------------------
def _parse_nested(value: Any, kind: type) -> Any:
    """CSV cells hold lists/dicts as text: accept JSON or a Python literal."""
    if isinstance(value, str):
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(value)
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, kind):
                return parsed
    return value


class _Record:
    """A row (or a nested dict of one) whose accessors raise DataError naming field and file."""

    def __init__(self, data: Mapping[str, Any], where: str, prefix: str = "") -> None:
        self.data, self.where, self.prefix = data, where, prefix

    def fail(self, name: str, problem: str) -> DataError:
        return DataError(f"field '{self.prefix}{name}' {problem} in {self.where}; "
                         "the file must follow the dataset's hub schema")

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def raw(self, name: str) -> Any:
        # datasets fills a column missing from some rows with None: treat both as missing.
        if name not in self.data or self.data[name] is None:
            raise self.fail(name, "is missing")
        return self.data[name]

    def text(self, name: str, *, nonempty: bool = False, default: str | None = None) -> str:
        if default is not None and not self.has(name):
            return default
        value = self.raw(name)
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, got {type(value).__name__}")
        if nonempty and not value.strip():
            raise self.fail(name, "is empty")
        return value

    def texts(self, name: str, *, nonempty: bool = False, optional: bool = False) -> list[str]:
        if optional and not self.has(name):
            return []
        value = _parse_nested(self.raw(name), list)
        if isinstance(value, str) or not isinstance(value, Sequence) or not all(
                isinstance(v, str) for v in value):
            raise self.fail(name, f"must be a list of strings, got {value!r:.80}")
        if nonempty and not value:
            raise self.fail(name, "is an empty list")
        return list(value)

    def integer(self, name: str) -> int:
        value = self.raw(name)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        elif isinstance(value, float) and value.is_integer():  # CSV/pandas int columns
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"must be an integer, got {value!r:.80}")
        return value

    def boolean(self, name: str) -> bool:
        value = self.raw(name)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise self.fail(name, f"must be a boolean, got {value!r:.80}")
        return value

    def record(self, name: str) -> _Record:
        value = _parse_nested(self.raw(name), dict)
        if not isinstance(value, Mapping):
            raise self.fail(name, f"must be a mapping, got {type(value).__name__}")
        return _Record(value, self.where, f"{self.prefix}{name}.")

    def choice_index(self, name: str, n_choices: int) -> int:
        """A gold choice given as an integer, a digit string, or a letter "A".."Z"."""
        value = self.raw(name)
        if isinstance(value, str) and len(value.strip()) == 1 and value.strip().isalpha():
            index = ord(value.strip().upper()) - ord("A")
        else:
            index = self.integer(name)
        if not 0 <= index < n_choices:
            raise self.fail(name, f"= {value!r} is out of range for {n_choices} choices")
        return index


def _dedupe(texts: Iterable[str]) -> list[str]:
    """Non-empty strings, first occurrence kept, order preserved."""
    return list(dict.fromkeys(t for t in texts if t.strip()))


# --- the eight parsers (hub schema -> BenchmarkExample) ------------------------------------
def _parse_mmlu(r: _Record, i: int, split: str) -> BenchmarkExample:
    choices = r.texts("choices", nonempty=True)
    gold = r.choice_index("answer", len(choices))
    return BenchmarkExample(
        example_id=f"mmlu-{split}-{i}", query=r.text("question", nonempty=True),
        answers=[choices[gold]], choices=choices, gold_choice=gold,
        metadata={"subject": r.text("subject", default="")})


def _parse_nq_open(r: _Record, i: int, split: str) -> BenchmarkExample:
    return BenchmarkExample(
        example_id=f"nq_open-{split}-{i}", query=r.text("question", nonempty=True),
        answers=_dedupe(r.texts("answer", nonempty=True)))


def _parse_trivia_qa(r: _Record, i: int, split: str) -> BenchmarkExample:
    answer = r.record("answer")
    answers = _dedupe([answer.text("value"), *answer.texts("aliases", optional=True)])
    if not answers:
        # An empty answer would read as "unanswerable" and reward empty predictions.
        raise answer.fail("value", "is empty (TriviaQA's test split has no public answers; "
                                    "use the validation split)")
    return BenchmarkExample(
        example_id=r.text("question_id", nonempty=True), query=r.text("question", nonempty=True),
        answers=answers,
        metadata={"normalized_aliases": answer.texts("normalized_aliases", optional=True),
                  "answer_type": answer.text("type", default=""),
                  "question_source": r.text("question_source", default="")})


def _parse_pubmedqa(r: _Record, i: int, split: str) -> BenchmarkExample:
    pubid = r.raw("pubid")
    if isinstance(pubid, bool) or not isinstance(pubid, int | str):
        raise r.fail("pubid", f"must be an integer or string, got {pubid!r:.80}")
    context = r.record("context")
    contexts = context.texts("contexts", nonempty=True)
    decision = r.text("final_decision").strip().lower()
    if decision not in ("yes", "no", "maybe"):
        raise r.fail("final_decision", f"must be yes, no or maybe, got {decision!r}")
    return BenchmarkExample(
        example_id=str(pubid), query=r.text("question", nonempty=True), answers=[decision],
        gold_passage="\n".join(contexts),
        metadata={"long_answer": r.text("long_answer", default=""),
                  "labels": context.texts("labels", optional=True),
                  "meshes": context.texts("meshes", optional=True)})


def _parse_boolq(r: _Record, i: int, split: str) -> BenchmarkExample:
    return BenchmarkExample(
        example_id=f"boolq-{split}-{i}", query=r.text("question", nonempty=True),
        answers=["yes" if r.boolean("answer") else "no"],
        gold_passage=r.text("passage", nonempty=True),
        metadata={"title": r.text("title", default="")})


def _parse_hotpotqa(r: _Record, i: int, split: str) -> BenchmarkExample:
    facts = r.record("supporting_facts")
    fact_titles = facts.texts("title", nonempty=True)
    context = r.record("context")
    titles = context.texts("title", nonempty=True)
    sentences = _parse_nested(context.raw("sentences"), list)
    if (not isinstance(sentences, list) or len(sentences) != len(titles)
            or not all(isinstance(s, list) and all(isinstance(t, str) for t in s)
                       for s in sentences)):
        raise context.fail("sentences", "must be one list of strings per context title")
    paragraphs = dict(zip(titles, sentences, strict=True))
    supporting = list(dict.fromkeys(fact_titles))  # unique, in order of first mention
    missing = [t for t in supporting if t not in paragraphs]
    if missing:
        raise facts.fail("title", f"names {missing!r}, which are not among context.title")
    return BenchmarkExample(
        example_id=r.text("id", nonempty=True), query=r.text("question", nonempty=True),
        answers=[r.text("answer", nonempty=True)],
        # HotpotQA sentences carry their own leading spaces: join them with "".
        gold_passage="\n".join("".join(paragraphs[t]).strip() for t in supporting),
        metadata={"type": r.text("type", default=""), "level": r.text("level", default=""),
                  "supporting_titles": supporting})


def _parse_squad_v2(r: _Record, i: int, split: str) -> BenchmarkExample:
    answers = r.record("answers")
    texts = answers.texts("text")
    starts = answers.raw("answer_start") if answers.has("answer_start") else []
    starts = _parse_nested(starts, list)
    return BenchmarkExample(
        example_id=r.text("id", nonempty=True), query=r.text("question", nonempty=True),
        answers=_dedupe(texts), gold_passage=r.text("context", nonempty=True),
        metadata={"title": r.text("title", default=""), "answer_start": list(starts),
                  "is_impossible": not _dedupe(texts)})


def _parse_hellaswag(r: _Record, i: int, split: str) -> BenchmarkExample:
    endings = r.texts("endings", nonempty=True)
    if r.has("label") and isinstance(r.raw("label"), str) and not r.raw("label").strip():
        raise r.fail("label", "is empty (HellaSwag's test split has no public labels; "
                               "use the validation split)")
    gold = r.choice_index("label", len(endings))
    ctx = r.text("ctx", nonempty=True)
    activity = r.text("activity_label", default="")
    ind = r.integer("ind") if r.has("ind") else i
    return BenchmarkExample(
        # "activity: context", as lm-evaluation-harness presents it: the label sets the scene.
        example_id=f"hellaswag-{split}-{ind}", query=f"{activity}: {ctx}" if activity else ctx,
        answers=[endings[gold]], choices=endings, gold_choice=gold,
        metadata={"activity_label": activity, "ctx": ctx,
                  "source_id": r.text("source_id", default=""),
                  "split_type": r.text("split_type", default="")})


# --- sources -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Spec:
    name: str
    hub_path: str
    hub_config: str | None
    default_split: str
    parse: Callable[[_Record, int, str], BenchmarkExample]
    tfds_name: str | None = None
    # TFDS renames a few hub fields; this maps a TFDS record back to the hub schema.
    from_tfds: Callable[[dict[str, Any]], dict[str, Any]] = lambda row: row


def _flat_files(data_files: DataFiles) -> list[str]:
    if isinstance(data_files, str | os.PathLike):
        return [os.fspath(data_files)]
    if isinstance(data_files, Mapping):
        return [f for v in data_files.values() for f in _flat_files(v)]
    return [os.fspath(f) for f in data_files]


def _file_format(files: list[str]) -> str:
    formats = set()
    for f in files:
        ext = os.path.splitext(f[:-3] if f.endswith(".gz") else f)[1].lower()
        if ext not in _FORMATS:
            raise ConfigError(f"cannot tell the format of {f!r}; use files ending in "
                              f"{', '.join(sorted(_FORMATS))}")
        formats.add(_FORMATS[ext])
    if len(formats) > 1:
        raise ConfigError(f"data_files mix formats {sorted(formats)}; pass one format at a time")
    return formats.pop()


def _read_files(spec: _Spec, split: str, data_files: DataFiles,
                cache_dir: str | None) -> tuple[Iterable[Mapping[str, Any]], str]:
    if isinstance(data_files, Mapping):
        if split not in data_files:
            raise ConfigError(f"{spec.name}: split {split!r} is not a key of data_files "
                              f"(keys: {sorted(data_files)}); pass split= one of them")
        data_files = {split: data_files[split]}
    files = _flat_files(data_files)
    if not files:
        raise ConfigError(f"{spec.name}: data_files is empty; pass at least one file")
    fmt = _file_format(files)
    for f in files:
        if not any(ch in f for ch in "*?[") and not os.path.exists(f):
            raise DataError(f"{spec.name}: data file not found: {f}")
    where = ", ".join(files)

    import datasets  # slow import: only when reading

    try:
        ds = datasets.load_dataset(fmt, data_files=data_files, cache_dir=cache_dir,
                                   split=split if isinstance(data_files, Mapping) else "train")
    except Exception as e:  # datasets wraps parse errors in several exception types
        raise DataError(f"{spec.name}: could not read {where} as {fmt}: {e}; check that it "
                        "is valid and in the dataset's hub schema") from e
    return ds, where


def _read_hub(spec: _Spec, split: str, config: str | None,
              cache_dir: str | None) -> tuple[Iterable[Mapping[str, Any]], str]:
    import datasets

    config = config or spec.hub_config
    where = f"hub dataset {spec.hub_path}" + (f" ({config})" if config else "") + f" [{split}]"
    try:
        ds = datasets.load_dataset(spec.hub_path, config, split=split, cache_dir=cache_dir)
    except Exception as e:
        raise DataError(f"{spec.name}: could not load {where}: {e}; check the split and your "
                        "network, or pass data_files= with local copies") from e
    return ds, where


def _from_numpy(value: Any) -> Any:
    """TFDS numpy records -> plain Python (bytes decoded), like datasets rows."""
    import numpy as np

    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, Mapping):
        return {k: _from_numpy(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_from_numpy(v) for v in value.tolist()]
    if isinstance(value, list | tuple):
        return [_from_numpy(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_tfds(spec: _Spec, split: str,
               cache_dir: str | None) -> tuple[Iterable[Mapping[str, Any]], str]:
    if spec.tfds_name is None:
        raise ConfigError(f"{spec.name} has no TensorFlow Datasets builder; use source='hub' "
                          "or pass data_files= with local files")
    try:
        import tensorflow  # noqa: F401  (TFDS imports without it but cannot build or load)
    except ImportError as e:
        raise ConfigError(f"source='tfds' needs TensorFlow, which is not installed: "
                          f"pip install tensorflow, or pass data_files= with local files of "
                          f"{spec.name} in its hub schema (source='files')") from e
    import tensorflow_datasets as tfds

    where = f"TFDS {spec.tfds_name} [{split}]"
    try:
        ds = tfds.load(spec.tfds_name, split=split, data_dir=cache_dir)
    except Exception as e:
        raise DataError(f"{spec.name}: could not load {where}: {e}") from e

    def rows() -> Iterator[dict[str, Any]]:
        for ex in tfds.as_numpy(ds):
            yield spec.from_tfds(_from_numpy(ex))

    return rows(), where


def _load(spec: _Spec, split: str, data_files: DataFiles | None, limit: int | None,
          source: str, config: str | None, cache_dir: str | None) -> list[BenchmarkExample]:
    if source not in SOURCES:
        raise ConfigError(f"source must be one of {SOURCES}, got {source!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit must be an integer >= 0 or None, got {limit!r}")
    if source == "auto":
        source = "files" if data_files is not None else "hub"
    if source == "files":
        if data_files is None:
            raise ConfigError(f"{spec.name}: source='files' needs data_files=")
        rows, where = _read_files(spec, split, data_files, cache_dir)
    elif data_files is not None:
        raise ConfigError(f"{spec.name}: data_files is only read with source='files' or 'auto', "
                          f"not {source!r}")
    elif source == "hub":
        rows, where = _read_hub(spec, split, config, cache_dir)
    else:
        rows, where = _read_tfds(spec, split, cache_dir)

    examples = []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        examples.append(spec.parse(_Record(row, f"row {i} of {where}"), i, split))
    return examples


def _hellaswag_from_tfds(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "ctx": row.get("context"), "label": str(row.get("label"))}


_SPECS = {s.name: s for s in [
    _Spec("mmlu", "cais/mmlu", "all", "test", _parse_mmlu),
    _Spec("nq_open", "google-research-datasets/nq_open", "nq_open", "validation",
          _parse_nq_open, tfds_name="natural_questions_open"),
    _Spec("trivia_qa", "mandarjoshi/trivia_qa", "rc.nocontext", "validation", _parse_trivia_qa,
          tfds_name="trivia_qa/rc.nocontext"),
    _Spec("pubmedqa", "qiaojin/PubMedQA", "pqa_labeled", "train", _parse_pubmedqa),
    _Spec("boolq", "google/boolq", None, "validation", _parse_boolq, tfds_name="bool_q"),
    _Spec("hotpotqa", "hotpotqa/hotpot_qa", "distractor", "validation", _parse_hotpotqa),
    _Spec("squad_v2", "rajpurkar/squad_v2", "squad_v2", "validation", _parse_squad_v2,
          tfds_name="squad/v2.0"),
    _Spec("hellaswag", "Rowan/hellaswag", None, "validation", _parse_hellaswag,
          tfds_name="hellaswag", from_tfds=_hellaswag_from_tfds),
]}


# --- public loaders ------------------------------------------------------------------------
# Common arguments: split (hub split name; with a dict data_files, the key to read),
# data_files (local files in the hub schema), limit (first N rows), source (auto|hub|files|
# tfds), config (hub config override, e.g. an MMLU subject), cache_dir (datasets/TFDS cache).
def load_mmlu(split: str = "test", data_files: DataFiles | None = None, limit: int | None = None,
              source: str = "auto", *, config: str | None = None,
              cache_dir: str | None = None) -> list[BenchmarkExample]:
    """MMLU (cais/mmlu, "all"): 4-way multiple choice over 57 subjects."""
    return _load(_SPECS["mmlu"], split, data_files, limit, source, config, cache_dir)


def load_nq_open(split: str = "validation", data_files: DataFiles | None = None,
                 limit: int | None = None, source: str = "auto", *, config: str | None = None,
                 cache_dir: str | None = None) -> list[BenchmarkExample]:
    """Natural Questions, open-domain version: short answers, several golds per question."""
    return _load(_SPECS["nq_open"], split, data_files, limit, source, config, cache_dir)


def load_trivia_qa(split: str = "validation", data_files: DataFiles | None = None,
                   limit: int | None = None, source: str = "auto", *, config: str | None = None,
                   cache_dir: str | None = None) -> list[BenchmarkExample]:
    """TriviaQA rc.nocontext: answers = the value and its aliases."""
    return _load(_SPECS["trivia_qa"], split, data_files, limit, source, config, cache_dir)


def load_pubmedqa(split: str = "train", data_files: DataFiles | None = None,
                  limit: int | None = None, source: str = "auto", *, config: str | None = None,
                  cache_dir: str | None = None) -> list[BenchmarkExample]:
    """PubMedQA pqa_labeled (its only split is train): answers yes / no / maybe."""
    return _load(_SPECS["pubmedqa"], split, data_files, limit, source, config, cache_dir)


def load_boolq(split: str = "validation", data_files: DataFiles | None = None,
               limit: int | None = None, source: str = "auto", *, config: str | None = None,
               cache_dir: str | None = None) -> list[BenchmarkExample]:
    """BoolQ: yes/no questions about a Wikipedia passage (the gold passage)."""
    return _load(_SPECS["boolq"], split, data_files, limit, source, config, cache_dir)


def load_hotpotqa(split: str = "validation", data_files: DataFiles | None = None,
                  limit: int | None = None, source: str = "auto", *, config: str | None = None,
                  cache_dir: str | None = None) -> list[BenchmarkExample]:
    """HotpotQA distractor: multi-hop; gold passage = the supporting paragraphs joined."""
    return _load(_SPECS["hotpotqa"], split, data_files, limit, source, config, cache_dir)


def load_squad_v2(split: str = "validation", data_files: DataFiles | None = None,
                  limit: int | None = None, source: str = "auto", *, config: str | None = None,
                  cache_dir: str | None = None) -> list[BenchmarkExample]:
    """SQuAD v2: extractive QA; unanswerable questions have answers == []."""
    return _load(_SPECS["squad_v2"], split, data_files, limit, source, config, cache_dir)


def load_hellaswag(split: str = "validation", data_files: DataFiles | None = None,
                   limit: int | None = None, source: str = "auto", *, config: str | None = None,
                   cache_dir: str | None = None) -> list[BenchmarkExample]:
    """HellaSwag: pick the ending that continues the context (4-way multiple choice)."""
    return _load(_SPECS["hellaswag"], split, data_files, limit, source, config, cache_dir)


BENCHMARKS: dict[str, Callable[..., list[BenchmarkExample]]] = {
    "mmlu": load_mmlu,
    "nq_open": load_nq_open,
    "trivia_qa": load_trivia_qa,
    "pubmedqa": load_pubmedqa,
    "boolq": load_boolq,
    "hotpotqa": load_hotpotqa,
    "squad_v2": load_squad_v2,
    "hellaswag": load_hellaswag,
}
_ALIASES = {"nq": "nq_open", "natural_questions": "nq_open", "natural_questions_open": "nq_open",
            "triviaqa": "trivia_qa", "pubmed_qa": "pubmedqa", "bool_q": "boolq",
            "hotpot_qa": "hotpotqa", "squadv2": "squad_v2", "squad2": "squad_v2"}


def load_qa_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[BenchmarkExample]:
    """Examples from a JSONL file of our own simple schema, one object per line:

    ``query`` (or ``question``); ``answers`` (list) or ``answer`` / ``response`` (string);
    optional ``gold_id`` / ``gold_passage_id`` (the knowledge-store id of the passage that
    answers it: enables recall@k and MRR), ``gold_passage`` (its text), ``choices`` with
    ``gold_choice`` (index or letter: multiple choice), ``id``. The training records of
    ``data.train`` / ``data.eval`` ({query, response, gold_id}) are valid input as they are.
    """
    from ..paths import local_copy

    path = os.fspath(local_copy(path, "JSONL file"))  # local, or gs:// fetched once
    if not os.path.isfile(path):
        raise DataError(f"no such JSONL file: {path}; pass a file of {{query, answer}} lines")
    examples: list[BenchmarkExample] = []
    for line_no, row in read_jsonl(path):
        if limit is not None and len(examples) >= limit:
            break
        examples.append(_qa_row(_Record(row, f"{path}:{line_no}"), row, line_no))
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def _qa_row(r: _Record, row: dict[str, Any], line_no: int) -> BenchmarkExample:
    def fail(problem: str) -> DataError:
        return DataError(f"{r.where}: {problem}; each line needs 'query' and 'answer' "
                         "(or 'answers'), see fedrag_jax.evals.load_qa_jsonl")

    query_key = next((k for k in ("query", "question") if r.has(k)), None)
    if query_key is None:
        raise fail("no 'query'")
    if r.has("answers"):
        answers = r.texts("answers")
    else:
        key = next((k for k in ("answer", "response") if r.has(k)), None)
        if key is None and not r.has("choices"):
            raise fail("no 'answer'")
        answers = [r.text(key)] if key else []
    choices = gold = None
    if r.has("choices"):
        choices = r.texts("choices", nonempty=True)
        if not r.has("gold_choice"):
            raise fail("'choices' without 'gold_choice'")
        gold = r.choice_index("gold_choice", len(choices))
        answers = answers or [choices[gold]]
    gold_id = row.get("gold_passage_id", row.get("gold_id"))
    return BenchmarkExample(
        example_id=str(row.get("id", line_no)), query=r.text(query_key, nonempty=True),
        answers=_dedupe(answers), choices=choices, gold_choice=gold,
        gold_passage=r.text("gold_passage") if r.has("gold_passage") else None,
        gold_passage_id=None if gold_id is None else str(gold_id))


def load_benchmark(name: str, **kwargs: Any) -> list[BenchmarkExample]:
    """Load a benchmark by name (case, '-' and ' ' ignored); kwargs go to its loader."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key](**kwargs)
