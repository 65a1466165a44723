"""A recipe's data mixtures, as ``--dry-run`` prints them: each stage's data YAML sources and strategies.

    print(plan_mixtures(recipe))     # '' when no stage names a data YAML
"""

from __future__ import annotations

from functools import partial

from llava_platform import storage
from llava_platform.config.schema import Recipe
from llava_platform.data.mixture import MixtureError, expand_sources, is_mixture


def plan_mixtures(recipe: Recipe) -> str:
    """What ``--dry-run`` prints for the stages whose data names data YAMLs: each source and its strategy
    (rows are counted by ``jobs.preprocess`` / training, on the cluster)."""
    lines = []
    for name, stage in recipe.stages().items():
        data = stage.data
        if not any(is_mixture(path) for path in data.train_files):
            continue
        try:
            sources = expand_sources(data.train_files, partial(_read_text, endpoint=data.s3_endpoint_url))
        except (MixtureError, OSError) as error:
            lines.append(f"# {name} data mixture: unavailable ({error})")
            continue
        lines.append(f"# {name} data mixture: {len(sources)} sources (rows counted when preprocessing plans them)")
        lines += [f"#   {source.rule:<14} {source.path}" + (f"  (images: {source.image_root})"
                                                            if source.image_root else "") for source in sources]
    return "\n".join(lines)


def _read_text(path: str, endpoint: str | None) -> str:
    return storage.read_bytes(path, endpoint).decode()
