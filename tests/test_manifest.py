"""The variant manifest is one typed record: read and written by manifest.py alone, older ones still read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import quantpub
from conftest import typed
from quantpub.manifest import SCHEMA_VERSION, Manifest, ManifestError, read, write

FIELDS = tuple(Manifest.model_fields)
SUBSCRIPT = re.compile(r"""(?:\[\s*["'](%s)["']\s*\]|\.get\(\s*["'](%s)["'])""" % ("|".join(FIELDS), "|".join(FIELDS)))
EVENTS = re.compile(r"\bevent(?:\.get\(|\[)")  # progress events are dicts with a "variant" key, not manifests


def test_no_module_but_manifest_indexes_a_manifest_by_key():
    """Every field of a manifest is read by attribute (typed) outside manifest.py: the schema lives in one place."""
    root = Path(quantpub.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "manifest.py" or "hub" in path.relative_to(root).parts:  # the hub serves any repo's files
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if SUBSCRIPT.search(line) and not EVENTS.search(line):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_no_module_but_manifest_parses_a_manifest_file():
    root = Path(quantpub.__file__).parent
    readers = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "manifest.py"
               and re.search(r"MANIFEST\)?\.read_text|json\.loads\([^)]*MANIFEST", p.read_text())]
    assert readers == []


def _manifest(**extra) -> dict:
    return {"variant": "gptq-4bit-128g-actorder_False", "method": "gptq", "branch": "main", "repo": "ns/m-GPTQ",
            "model": "ns/m", "parameters": {"bits": 4, "group_size": 128}, "size": 10, "tools": {"quantpub": "0.1.0"},
            "files": {"model.safetensors": {"size": 10, "sha256": "0" * 64}}, **extra}


def test_written_then_read_is_equal_and_versioned(tmp_path):
    built = typed(_manifest(evaluation={"perplexity": 12.5, "kld": 0.01, "memory": {"bytes": 5, "kind": "RAM"}}))
    (tmp_path / "v").mkdir()
    write(tmp_path / "v", built)
    again = read(tmp_path / "v")
    assert again == built and again.schema_version == SCHEMA_VERSION
    assert again.evaluation.memory.bytes == 5 and again.evaluation.metrics()["kld"] == 0.01
    assert (tmp_path / ".records" / built.variant / f"{built.digest}.json").is_file()  # kept for a rebuild


def test_a_manifest_of_an_older_quantpub_is_read(tmp_path):
    """Version 1 had the same fields and no schema_version; builders added fields the types do not name."""
    old = {**_manifest(), "device": "cpu", "quantize_seconds": 1.5,
           "validation": {"loaded_with": "llama_cpp.Llama", "type_mix": {"Q4_K": 3}}}
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "quantpub.json").write_text(json.dumps(old))
    m = read(tmp_path / "v")
    assert m.schema_version == SCHEMA_VERSION and m.validation.get("type_mix") == {"Q4_K": 3}


@pytest.mark.parametrize(("content", "says"), [
    ("{not json", "cannot read it"),
    (json.dumps({"variant": "x"}), "delete v and run the same command again to rebuild it"),
    (json.dumps({**_manifest(), "schema_version": SCHEMA_VERSION + 1}), "written by a newer quantpub"),
])
def test_an_unreadable_manifest_names_its_file_and_the_fix(tmp_path, content, says):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "quantpub.json").write_text(content)
    with pytest.raises(ManifestError, match=re.escape(says)) as err:
        read(tmp_path / "v")
    assert str(tmp_path / "v" / "quantpub.json") in str(err.value)
