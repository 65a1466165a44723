"""The teacher's prompts: per response type a system message and few-shot examples, kept as versioned
YAML files (``prompts/v1/<type>.yaml``); a user folder with the same files overrides them.

    prompts = load_prompts()                     # the packaged version (PROMPT_VERSION)
    prompts = load_prompts("my_prompts/")        # conversation.yaml, detail.yaml, reasoning.yaml there
    messages = prompts.messages("reasoning", context_text(image))

The version that goes into the manifest and MLflow is ``v1`` for the packaged files, else
``custom-<sha256 of the files, 12 hex>``, so two runs with the same prompts say so.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from llava_platform.datagen.annotations import ImageContext

TYPES = ("conversation", "detail", "reasoning")
"""The response types of LLaVA-Instruct: conversation (58K), detailed description (23K), complex reasoning (77K)."""
PROMPT_VERSION = "v1"
PACKAGED = Path(__file__).parent / "prompts" / PROMPT_VERSION


class PromptError(ValueError):
    """A prompt folder or file that is missing something; names the file and the key."""


@dataclass(frozen=True)
class TypePrompt:
    system: str
    examples: tuple[tuple[str, str], ...]
    """(context, response) pairs, shown as earlier user/assistant turns."""
    questions: tuple[str, ...] = ()
    """Detail only: the instructions a description answers (one picked per image)."""


@dataclass(frozen=True)
class PromptSet:
    version: str
    types: dict[str, TypePrompt]

    def messages(self, kind: str, context: str) -> list[dict[str, str]]:
        """Chat messages for one image: system, the few-shot examples as turns, then this image's context."""
        prompt = self.types[kind]
        messages = [{"role": "system", "content": prompt.system}]
        for example_context, response in prompt.examples:
            messages += [{"role": "user", "content": example_context}, {"role": "assistant", "content": response}]
        return messages + [{"role": "user", "content": context}]

    def detail_question(self, image_id: str) -> str:
        """The instruction a detailed description answers, picked by the image id (stable across reruns)."""
        questions = self.types["detail"].questions
        return questions[int(hashlib.sha256(image_id.encode()).hexdigest(), 16) % len(questions)]


def context_text(image: ImageContext) -> str:
    """The captions first, one per line, then one ``label: [x1, y1, x2, y2]`` line per box."""
    lines = list(image.captions)
    if image.boxes:
        lines += [""] + [box.text() for box in image.boxes]
    return "\n".join(lines)


def load_prompts(folder: str | Path | None = None, kinds: tuple[str, ...] = TYPES) -> PromptSet:
    """The prompts for ``kinds`` from ``folder`` (default: the packaged version).

    Raises:
        PromptError: a file or key missing, naming it.
    """
    root = Path(folder) if folder else PACKAGED
    types, digest = {}, hashlib.sha256()
    for kind in kinds:
        path = root / f"{kind}.yaml"
        if not path.is_file():
            raise PromptError(f"{path}: missing (a prompt folder holds {', '.join(f'{k}.yaml' for k in kinds)})")
        text = path.read_text()
        digest.update(text.encode())
        data = yaml.safe_load(text) or {}
        if not isinstance(data.get("system"), str) or not data["system"].strip():
            raise PromptError(f"{path}: 'system' (the system message) is missing")
        examples = data.get("examples") or []
        if not all(isinstance(e, dict) and {"context", "response"} <= set(e) for e in examples):
            raise PromptError(f"{path}: 'examples' must be a list of {{context, response}}")
        questions = tuple(data.get("questions") or ())
        if kind == "detail" and not questions:
            raise PromptError(f"{path}: 'questions' (the instructions a description answers) is missing")
        types[kind] = TypePrompt(data["system"].strip(), tuple((e["context"].strip(), e["response"].strip())
                                                               for e in examples), questions)
    version = PROMPT_VERSION if folder is None else f"custom-{digest.hexdigest()[:12]}"
    return PromptSet(version, types)
