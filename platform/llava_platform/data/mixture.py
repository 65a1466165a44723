"""Data mixtures as LLaVA-NeXT writes them: a YAML list of sources, each with a sampling strategy.

    sources = expand_sources(stage.data.train_files, read_text)    # plain files and data YAMLs, in order
    plan = SourcePlan.of(sources[0], rows=1_000, seed=recipe.seed, position=0)
    keep = plan.selection.contains(indices)                        # which rows of the file the strategy takes

A data YAML is what LLaVA-NeXT's ``train.py`` reads (``scripts/train/onevision.yaml``)::

    datasets:
      - json_path: /data/llava_onevision/allava_instruct.json
        sampling_strategy: first:10%       # all | first:N | end:N | random:N; N a count or a percentage
      - json_path: /data/llava_onevision/sharegpt4v.jsonl
        sampling_strategy: random:5000
        image_root: /data/sharegpt4v       # ours: where this source's relative image paths start

The semantics are ``train.py``'s: ``all`` by default, a percentage rounded up (``ceil(p x rows / 100)``),
``first`` the first N records in file order, ``end`` the last N. Where ``train.py`` is silent or loose we are
strict: ``random:N`` draws N distinct records seeded by the recipe seed and the source's position (the same
rows on every run; ``train.py`` shuffles with an unseeded generator) and keeps them in file order; an
unknown strategy, an N larger than the source, a duplicated source and a missing ``json_path`` are errors
naming the YAML file, line and source (``train.py`` takes everything there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

STRATEGIES = ("all", "first", "end", "random")
YAML_SUFFIXES = (".yaml", ".yml")


class MixtureError(ValueError):
    """A data YAML or a source in it that cannot be read as LLaVA-NeXT's ``train.py`` would (with its line)."""


@dataclass(frozen=True)
class DataSource:
    """One source of a stage's data: a plain file (all of it) or one entry of a data YAML."""

    path: str
    strategy: str = "all"
    """``all``, ``first``, ``end`` or ``random``."""
    number: float | None = None
    """N of ``first:N`` / ``end:N`` / ``random:N`` (a count, or a percentage with ``percent``)."""
    percent: bool = False
    image_root: str | None = None
    """Where this source's relative image and video paths start; ``None``: the stage's ``data.image_root``."""
    origin: str = ""
    """Where it was named: ``mixture.yaml:7`` for a YAML entry, empty for a plain file."""

    @property
    def rule(self) -> str:
        """The strategy as written: ``all``, ``first:1000``, ``random:10%``."""
        if self.number is None:
            return self.strategy
        return f"{self.strategy}:{self.number:g}{'%' if self.percent else ''}"

    def where(self) -> str:
        return f"{self.origin} ({self.path})" if self.origin else self.path


def is_mixture(path: str) -> bool:
    return path.lower().endswith(YAML_SUFFIXES)


def expand_sources(files: Sequence[str], read_text: Callable[[str], str]) -> list[DataSource]:
    """A stage's ``train_files`` as sources, in order: each data YAML replaced by its entries.

    Raises:
        MixtureError: a YAML that is not a ``datasets:`` list, a bad entry, or a source named twice.
    """
    sources: list[DataSource] = []
    for path in files:
        sources.extend(parse_mixture(read_text(path), path) if is_mixture(path) else [DataSource(path)])
    seen: dict[str, DataSource] = {}
    for source in sources:
        if source.path in seen:
            raise MixtureError(f"{source.where()}: the same file as {seen[source.path].where()}; name each source "
                               "once (its rows would be taken twice)")
        seen[source.path] = source
    return sources


def parse_mixture(text: str, yaml_path: str) -> list[DataSource]:
    """The entries of a LLaVA-NeXT data YAML (``datasets:`` of ``json_path`` + ``sampling_strategy``)."""
    import yaml

    try:
        root = yaml.compose(text)
    except yaml.YAMLError as error:
        raise MixtureError(f"{yaml_path}: not valid YAML: {error}") from None
    datasets = _mapping(root).get("datasets") if root is not None else None
    if datasets is None or not isinstance(datasets, yaml.SequenceNode) or not datasets.value:
        raise MixtureError(f"{yaml_path}: expected a non-empty `datasets:` list of `json_path` entries "
                           "(LLaVA-NeXT's data YAML)")
    return [_source(entry, yaml_path) for entry in datasets.value]


KEYS = ("json_path", "sampling_strategy", "image_root")


def _mapping(node) -> dict:
    import yaml

    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: value for key, value in node.value}


def _source(node, yaml_path: str) -> DataSource:
    origin = f"{yaml_path}:{node.start_mark.line + 1}"
    entry = _mapping(node)
    if not entry:
        raise MixtureError(f"{origin}: a `datasets:` entry must be a mapping with `json_path`")
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise MixtureError(f"{origin}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(KEYS)}")
    if "json_path" not in entry or not entry["json_path"].value:
        raise MixtureError(f"{origin}: the entry has no `json_path`")
    path = str(entry["json_path"].value)
    rule = str(entry["sampling_strategy"].value) if "sampling_strategy" in entry else "all"
    strategy, _, number = rule.partition(":")
    where = f"{origin} ({path})"
    if strategy not in STRATEGIES:
        raise MixtureError(f"{where}: unknown sampling_strategy {rule!r}; allowed: all, first:N, end:N, random:N "
                           "(N a count or a percentage such as 10%)")
    if strategy == "all" and number:
        raise MixtureError(f"{where}: `all` takes no number ({rule!r})")
    if strategy != "all" and not number:
        raise MixtureError(f"{where}: {strategy} needs a number: {strategy}:N or {strategy}:N%")
    percent = number.endswith("%")
    value = None
    if number:
        try:
            value = float(number.removesuffix("%")) if percent else int(number)
        except ValueError:
            raise MixtureError(f"{where}: {rule!r}: N must be a whole number or a percentage") from None
        if value <= 0 or (percent and value > 100):
            raise MixtureError(f"{where}: {rule!r}: N must be above 0{' and at most 100%' if percent else ''}")
    image_root = str(entry["image_root"].value) if "image_root" in entry else None
    return DataSource(path, strategy, value, percent, image_root, origin)


@dataclass(frozen=True)
class Selection:
    """The rows of a file a strategy takes: a range of positions, or (``random``) sorted positions."""

    start: int
    stop: int
    positions: np.ndarray | None = None

    def contains(self, indices: np.ndarray) -> np.ndarray:
        """A boolean mask over ``indices`` (positions in the file)."""
        indices = np.asarray(indices)
        if self.positions is None:
            return (indices >= self.start) & (indices < self.stop)
        found = np.searchsorted(self.positions, indices)
        found = np.minimum(found, max(len(self.positions) - 1, 0))
        return (self.positions[found] == indices) if len(self.positions) else np.zeros(len(indices), bool)

    @property
    def count(self) -> int:
        return self.stop - self.start if self.positions is None else len(self.positions)


@dataclass(frozen=True)
class SourcePlan:
    """A source with its row count and the rows its strategy takes."""

    source: DataSource
    rows: int
    selection: Selection

    @property
    def taken(self) -> int:
        return self.selection.count

    @classmethod
    def of(cls, source: DataSource, *, rows: int, seed: int, position: int) -> SourcePlan:
        """Resolve ``source``'s strategy over its ``rows`` records (``position``: its place in the stage's list,
        which seeds ``random`` apart from the other sources').

        Raises:
            MixtureError: N larger than the source.
        """
        if source.strategy == "all":
            return cls(source, rows, Selection(0, rows))
        wanted = math.ceil(source.number * rows / 100) if source.percent else int(source.number)
        if wanted > rows:
            raise MixtureError(f"{source.where()}: {source.rule} asks for {wanted:,} records, the source has "
                               f"{rows:,}")
        if source.strategy == "first":
            return cls(source, rows, Selection(0, wanted))
        if source.strategy == "end":
            return cls(source, rows, Selection(rows - wanted, rows))
        rng = np.random.default_rng([seed, position])
        positions = np.sort(rng.choice(rows, size=wanted, replace=False)).astype(np.int64)
        return cls(source, rows, Selection(0, rows, positions))
