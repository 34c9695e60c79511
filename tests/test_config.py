"""Configs: YAML + key=value overrides; unknown keys and wrong types are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedrag_jax.config import Config, load_config
from fedrag_jax.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_bundled_configs_load(path):
    assert isinstance(load_config(path), Config)


def test_overrides_apply_with_types():
    c = load_config(None, ["lsr.steps=7", "lsr.learning_rate=1e-4", "mesh.data=2",
                           "ralt.lora_targets=[q_proj, v_proj]", "data.index=null",
                           "progress=false"])
    assert c.lsr.steps == 7 and c.lsr.learning_rate == 1e-4 and c.mesh.data == 2
    assert c.ralt.lora_targets == ["q_proj", "v_proj"] and c.progress is False
    assert isinstance(c.lsr.learning_rate, float)
    c = load_config(None, ["retrieval.prompt_template=Q: {query} C: {context}"])
    assert c.retrieval.prompt_template == "Q: {query} C: {context}"


@pytest.mark.parametrize("override,message", [
    ("lsr.stepz=3", r"lsr\.stepz"),
    ("nonsense=1", "nonsense"),
    ("lsr.steps=ten", r"lsr\.steps must be an integer"),
    ("lsr.steps=1.5", r"lsr\.steps must be an integer"),
    ("mode=everything", "mode must be one of"),
    ("progress=3", "progress must be true or false"),
    ("ralt.lora_targets=q_proj", r"ralt\.lora_targets must be a list"),
    ("lsr=3", "lsr must be a mapping"),
    ("steps", "key=value"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lsr: {steps: [1, 2}")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("lsr:\n  tau_lm: fast\n")
    with pytest.raises(ConfigError, match=r"lsr\.tau_lm must be a number"):
        load_config(bad)


def test_config_reference_is_up_to_date():
    import importlib.util

    script = Path(__file__).parent.parent / "scripts" / "gen_config_docs.py"
    spec = importlib.util.spec_from_file_location("gen_config_docs", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    docs = Path(__file__).parent.parent / "docs" / "config.md"
    assert docs.read_text() == module.render(), "run scripts/gen_config_docs.py"


def test_quickstart_is_the_centralized_bundled_starting_point(tmp_path):
    path = Path(__file__).parent.parent / "configs" / "quickstart.yaml"
    assert path in CONFIGS
    c = load_config(path)
    assert (c.mode, c.federated) == ("both", False)
    assert (c.model.retriever, c.model.generator, c.data.corpus, c.data.train) == \
        ("bundled",) * 4
    assert c.lsr.steps > 0 and c.ralt.steps > 0
    # the one commented switch: uncommented, the same file is a federated run
    text = path.read_text()
    assert text.count("# federated: true") == 1
    switched = tmp_path / "federated.yaml"
    switched.write_text(text.replace("# federated: true", "federated: true"))
    f = load_config(switched)
    assert f.federated is True and f.to_dict() | {"federated": False} == c.to_dict()
