"""samplecache.py: stable keys and model identities, and generations.jsonl read back after a clean
run and after a kill that tore the last line."""

import hashlib
import json
from pathlib import Path

import samplecache

PARAMS = (8, 160, 0.6, 0.95, 0)  # k, max new tokens, temperature, top-p, seed


def test_key_is_stable_across_runs_and_versions():
    # pinned: a change here makes every existing generations.jsonl draw its samples again
    key = samplecache.key("toy|", "toy_gsm8k", 3, "What is 2+3?", PARAMS, 1)
    assert key == "1956011caeee06910ead5f363fb2a9b2"
    assert samplecache.key(0, "toy_gsm8k", 0) == "3d2e46c9be2a832a1207a68d49c647bd"
    parts = ["toy|", "toy_gsm8k", 3]
    want = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    assert samplecache.key(*parts) == want


def test_key_depends_on_every_part_and_its_place_but_not_on_dict_order():
    base = samplecache.key("m", "b", 1, "p", PARAMS, 0)
    others = [
        samplecache.key("m2", "b", 1, "p", PARAMS, 0),
        samplecache.key("m", "b2", 1, "p", PARAMS, 0),
        samplecache.key("m", "b", 2, "p", PARAMS, 0),
        samplecache.key("m", "b", 1, "p2", PARAMS, 0),
        samplecache.key("m", "b", 1, "p", (8, 160, 0.7, 0.95, 0), 0),
        samplecache.key("m", "b", 1, "p", PARAMS, 1),
        samplecache.key("b", "m", 1, "p", PARAMS, 0),
    ]
    assert len({base, *others}) == len(others) + 1
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in others)
    assert samplecache.key({"x": 1, "y": 2}) == samplecache.key({"y": 2, "x": 1})
    # parts JSON cannot encode are keyed by their str()
    assert samplecache.key(Path("runs/a")) == samplecache.key("runs/a")


def test_identity_names_the_base_and_each_adapter_by_its_weights(tmp_path):
    assert samplecache.identity("", "toy") == "toy|"
    assert samplecache.identity("org/model", "toy") == "toy|org/model"
    a, b = tmp_path / "a", tmp_path / "b"
    for d, content in ((a, b"first adapter"), (b, b"second")):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(content)
    head = hashlib.sha256(b"first adapter").hexdigest()[:16]
    assert samplecache.identity(str(a), "toy") == f"toy|{a}:13:{head}"
    both = samplecache.identity(f"{a}+{b}", "toy")
    assert both.startswith(f"toy|{a}:13:{head}+{b}:6:") and both == samplecache.identity(
        f"{a}+{b}", "toy"
    )
    # an adapter retrained into the same directory is another model
    (a / "adapter_model.safetensors").write_bytes(b"first adaptex")
    assert samplecache.identity(str(a), "toy") != f"toy|{a}:13:{head}"


def _row(i: int) -> dict:
    problem = {"id": f"p{i}", "prompt": "?"}
    return samplecache.sample_row(f"k{i}", "toy_gsm8k", problem, i % 2, f"text {i}", 5 + i, "stop")


def test_sample_row_fields():
    assert _row(3) == {
        "key": "k3",
        "benchmark": "toy_gsm8k",
        "problem": "p3",
        "sample": 1,
        "text": "text 3",
        "tokens": 8,
        "finish_reason": "stop",
    }


def test_cache_round_trip(tmp_path):
    path = tmp_path / "generations.jsonl"
    cache = samplecache.Cache(path)
    assert cache.rows == {}
    for i in range(3):
        cache.add(_row(i))
    # each row is on disk as soon as it is added, before the file is closed
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["k0", "k1", "k2"]
    cache.file.close()
    again = samplecache.Cache(path)
    assert again.rows == {f"k{i}": _row(i) for i in range(3)}
    again.add(_row(3))
    again.file.close()
    assert len(samplecache.Cache(path).rows) == 4


def test_a_torn_last_line_is_drawn_again_and_the_next_row_survives(tmp_path):
    path = tmp_path / "generations.jsonl"
    good = "".join(json.dumps(_row(i)) + "\n" for i in range(2))
    path.write_text(good + json.dumps(_row(2))[:25])  # killed in the middle of a write
    cache = samplecache.Cache(path)
    assert set(cache.rows) == {"k0", "k1"}
    cache.add(_row(2))
    cache.file.close()
    assert samplecache.Cache(path).rows == {f"k{i}": _row(i) for i in range(3)}
