"""Write docs/config.md, the reference of every setting, from fedrag_jax/config.py.

    python scripts/gen_config_docs.py          # (a test checks the file is up to date)
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

from fedrag_jax import config as C

SECTIONS = [("(top level)", C.Config), ("model", C.ModelConfig), ("data", C.DataConfig),
            ("retrieval", C.RetrievalConfig), ("lsr", C.LSRConfig), ("ralt", C.RALTConfig),
            ("mesh", C.MeshSettings), ("fed", C.FederatedConfig)]
HEADER = """# Configuration reference

Generated from `fedrag_jax/config.py` by `scripts/gen_config_docs.py`; do not edit by hand.
Load a YAML file and override any key on the command line:

```bash
fedrag-jax train --config configs/lsr.yaml lsr.steps=100 mesh.data=4 ralt.lora_rank=0
```

Unknown keys and values of the wrong type are rejected with the key's dotted name.
"""


def _comment(cls: type, name: str) -> str:
    m = re.search(rf"^\s+{name}:.*?#\s*(.*)$", inspect.getsource(cls), re.M)
    return m.group(1) if m else ""


def render() -> str:
    out = [HEADER]
    for title, cls in SECTIONS:
        out += [f"\n## `{title}`\n", "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kind = re.sub(r"typing\.|<class '|'>", "", str(hints[f.name])).replace("|", "\\|")
            shown = repr(default).replace("|", "\\|").replace("\n", "\\n")
            shown = shown if len(shown) <= 48 else shown[:45] + "..."
            meaning = _comment(cls, f.name).replace("|", "\\|")
            out.append(f"| `{f.name}` | `{kind}` | `{shown}` | {meaning} |")
    return "\n".join(out) + "\n"


def main() -> None:
    path = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    path.write_text(render())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
