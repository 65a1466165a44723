"""LLaVA-NeXT's data YAML (``llava_platform.data.mixture``): its keys and strategies as ``train.py`` reads them,
the rows each strategy takes, reproducible ``random:N``, and errors that name the YAML line and the source."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llava_platform.data.mixture import DataSource, MixtureError, SourcePlan, expand_sources, parse_mixture

YAML = """\
datasets:
  - json_path: /data/a.json
  - json_path: /data/b.jsonl
    sampling_strategy: first:10%
  - json_path: /data/c.json
    sampling_strategy: end:300
    image_root: /images/c
  - json_path: s3://bucket/d.parquet
    sampling_strategy: random:25
"""


def test_the_yaml_reads_as_llava_next_writes_it():
    a, b, c, d = parse_mixture(YAML, "mix.yaml")
    assert (a.path, a.rule, a.origin) == ("/data/a.json", "all", "mix.yaml:2")
    assert (b.rule, b.percent, b.origin) == ("first:10%", True, "mix.yaml:3")
    assert (c.rule, c.image_root, c.origin) == ("end:300", "/images/c", "mix.yaml:5")
    assert (d.path, d.strategy, d.number) == ("s3://bucket/d.parquet", "random", 25)


def test_plain_files_and_yamls_expand_in_order():
    sources = expand_sources(["/x.jsonl", "mix.yaml", "/y.json"], {"mix.yaml": YAML}.__getitem__)
    assert [s.path for s in sources] == ["/x.jsonl", "/data/a.json", "/data/b.jsonl", "/data/c.json",
                                         "s3://bucket/d.parquet", "/y.json"]
    assert sources[0] == DataSource("/x.jsonl")


@pytest.mark.parametrize("rows", [1, 7, 999, 1000, 1001])
def test_percentages_round_up_as_train_py_does(rows):
    plan = SourcePlan.of(DataSource("f", "first", 10, percent=True), rows=rows, seed=0, position=0)
    assert plan.taken == math.ceil(10 * rows / 100)  # train.py: math.ceil(int(p) * len(data) / 100)


def test_first_and_end_take_the_files_first_and_last_records():
    positions = np.arange(1000)
    first = SourcePlan.of(DataSource("f", "first", 100), rows=1000, seed=0, position=0)
    end = SourcePlan.of(DataSource("f", "end", 300), rows=1000, seed=0, position=0)
    assert list(positions[first.selection.contains(positions)]) == list(range(100))  # data[:100]
    assert list(positions[end.selection.contains(positions)]) == list(range(700, 1000))  # data[-300:]
    everything = SourcePlan.of(DataSource("f"), rows=1000, seed=0, position=0)
    assert everything.taken == 1000 and everything.selection.contains(positions).all()


def test_random_is_reproducible_per_seed_and_source():
    source = DataSource("f", "random", 25)

    def draw(seed, position):
        return SourcePlan.of(source, rows=1000, seed=seed, position=position).selection.positions

    assert np.array_equal(draw(42, 0), draw(42, 0))  # the same rows on every run
    assert not np.array_equal(draw(42, 0), draw(43, 0)) and not np.array_equal(draw(42, 0), draw(42, 1))
    taken = draw(42, 0)
    assert len(set(taken)) == 25 and list(taken) == sorted(taken) and taken.max() < 1000
    mask = SourcePlan.of(source, rows=1000, seed=42, position=0).selection.contains(np.arange(1000))
    assert mask.sum() == 25 and set(np.flatnonzero(mask)) == set(taken)


@pytest.mark.parametrize(("entry", "message"), [
    ("  - json_path: /a.json\n    sampling_strategy: sample:5", r"mix.yaml:2 \(/a.json\): unknown sampling_strategy"),
    ("  - json_path: /a.json\n    sampling_strategy: first", r"mix.yaml:2 \(/a.json\): first needs a number"),
    ("  - json_path: /a.json\n    sampling_strategy: end:x%", r"mix.yaml:2 .*N must be a whole number"),
    ("  - json_path: /a.json\n    sampling_strategy: first:150%", r"at most 100%"),
    ("  - sampling_strategy: all", r"mix.yaml:2: the entry has no `json_path`"),
    ("  - json_path: /a.json\n    images: x", r"mix.yaml:2: unknown key\(s\) images"),
    ("  - json_path: /a.json\n  - json_path: /a.json", r"mix.yaml:3 \(/a.json\): the same file as mix.yaml:2"),
])
def test_bad_entries_name_their_line_and_source(entry, message):
    with pytest.raises(MixtureError, match=message):
        expand_sources(["mix.yaml"], {"mix.yaml": f"datasets:\n{entry}\n"}.__getitem__)


def test_a_yaml_without_datasets_and_n_beyond_the_source_are_errors():
    with pytest.raises(MixtureError, match="expected a non-empty `datasets:` list"):
        parse_mixture("sources: []\n", "mix.yaml")
    with pytest.raises(MixtureError, match=r"mix.yaml:4 \(/b.json\): end:300 asks for 300 records, the source has 200"):
        SourcePlan.of(DataSource("/b.json", "end", 300, origin="mix.yaml:4"), rows=200, seed=0, position=0)
