"""llama2_jax.training.outputs, the one JSON / JSONL writer of the trainers (samples, SFT pools and records,
evaluation summaries, run.json, the recipe manifest): UTF-8 as is, parent directories created, written whole."""

import json
import os

from llama2_jax.training import outputs


def test_jsonl_round_trip_keeps_non_ascii_text_and_creates_the_directory(tmp_path):
    records = [{"messages": [{"role": "user", "content": "Grüß Gott — 你好"}], "train_on": "last"}, {"n": 2}]
    path = tmp_path / "new" / "dir" / "pool.jsonl"
    outputs.write_jsonl(path, iter(records))  # any iterable: the rejection sampler writes a generator
    assert path.read_text(encoding="utf-8").splitlines()[0] == json.dumps(records[0], ensure_ascii=False)
    assert outputs.read_jsonl(path) == records


def test_json_replaces_the_file_whole_and_reads_a_default(tmp_path):
    path = tmp_path / "distill.json"
    assert outputs.read_json(path, {"evals": []}) == {"evals": []} and outputs.read_json(path) is None
    outputs.write_json(path, {"kept": 1})
    outputs.write_json(path, {"kept": 2})
    assert outputs.read_json(path) == {"kept": 2}
    assert os.listdir(tmp_path) == ["distill.json"]  # no temporary file left beside it
