import json

import pytest

from quantpub import calibration
from quantpub.errors import CalibrationError
from quantpub.matrix import CalibrationSpec


class WordTokenizer:
    """One id per whitespace-separated word: enough to test cutting and hashing."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


TEXT = " ".join(f"word{i % 97}" for i in range(5000))


def test_samples_are_seeded_reproducible_and_hashed():
    a = calibration.build(TEXT, "t", WordTokenizer(), n_samples=8, seq_len=64, seed=3)
    b = calibration.build(TEXT, "t", WordTokenizer(), n_samples=8, seq_len=64, seed=3)
    c = calibration.build(TEXT, "t", WordTokenizer(), n_samples=8, seq_len=64, seed=4)
    assert a == b and a.sha256 == b.sha256
    assert a.sha256 != c.sha256
    assert (a.n_samples, a.seq_len, a.source_tokens) == (8, 64, 5000)
    assert a.record() == {"source": "t", "n_samples": 8, "seq_len": 64, "source_tokens": 5000, "seed": 3,
                          "sha256": a.sha256}
    named = calibration.build(TEXT, "/data/t.txt", WordTokenizer(), n_samples=8, seq_len=64,
                              origin=calibration.origin(CalibrationSpec(), "/data/t.txt"))
    assert named.record()["file"] == "t.txt" and named.record()["split"] is None
    assert calibration.origin(CalibrationSpec(dataset="allenai/c4", config=None, split="validation"), None) == {
        "dataset": "allenai/c4", "config": None, "split": "validation", "file": None}
    rows = a.as_gptqmodel()
    assert len(rows) == 8 and rows[0]["attention_mask"] == [1] * 64


def test_too_short_text_is_a_clear_error():
    with pytest.raises(CalibrationError, match="has 10 tokens, fewer than one sample of seq_len 64"):
        calibration.build("a " * 10, "short.txt", WordTokenizer(), n_samples=4, seq_len=64)


def test_text_jsonl_and_parquet_files(tmp_path):
    spec = CalibrationSpec()
    (tmp_path / "c.txt").write_text("plain text")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "", "beta"]}), tmp_path / "c.parquet")
    assert calibration.load_text(spec, tmp_path / "c.txt") == ("plain text", str(tmp_path / "c.txt"))
    assert calibration.load_text(spec, tmp_path / "c.jsonl")[0] == "one\n\ntwo"
    assert calibration.load_text(spec, tmp_path / "c.parquet")[0] == "alpha\n\nbeta"


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "no such file"),
    ("bad.jsonl", "{not json", "cannot read it"),
    ("nofield.jsonl", '{"body": "x"}', "a line has no 'text' field"),
])
def test_bad_files(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(CalibrationError, match=message):
        calibration.load_text(CalibrationSpec(), tmp_path / name)


def test_offline_dataset_names_the_fix():
    with pytest.raises(CalibrationError) as info:
        calibration.load_text(CalibrationSpec())
    assert "wikitext/wikitext-2-raw-v1:train" in str(info.value)
    assert "--calibration-file" in str(info.value)
