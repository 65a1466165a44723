"""LLaVA Platform core library: recipes, image geometry, conversations, model composition.

Knows nothing of Ray: `pipelines/`, `serve/` and `jobs/` at the repository root build on it.
"""

__version__ = "0.1.0"
