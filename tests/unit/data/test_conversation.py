"""Tokenisation of LLaVA conversations: exact labels, image expansion, and specific errors."""

import pytest
from transformers import AutoProcessor

from llava_platform.data.conversation import (
    IGNORE_INDEX,
    EmptyConversationError,
    ImagePlaceholderError,
    LabelAlignmentError,
    MissingFieldError,
    RoleOrderError,
    SequenceTooLongError,
    TemplateRejectedError,
    UnknownRoleError,
    tokenize_conversation,
)
from llava_platform.data.errors import SampleError
from llava_platform.data.templates import CHAT_TEMPLATES, TemplateError, resolve_chat_template

TWO_TURNS = [
    {"from": "human", "value": "<image>\nWhat colour is the square?"},
    {"from": "gpt", "value": "The square is red."},
    {"from": "human", "value": "And the circle?"},
    {"from": "gpt", "value": "blue"},
]
END_OF_TURN = {"vicuna_v1": "</s>", "mistral": "</s>", "llama3": "<|eot_id|>", "chatml": "<|im_end|>",
               "qwen_1_5": "<|im_end|>", "chatml_direct": "<|im_end|>"}


def tokenize(tokenizer, conversation, template="vicuna_v1", tokens_per_image=(4,), **kwargs):
    return tokenize_conversation(
        conversation, tokenizer, CHAT_TEMPLATES[template], tokens_per_image=list(tokens_per_image),
        image_token="<image>", max_length=kwargs.pop("max_length", 512),
        truncation=kwargs.pop("truncation", "drop"), **kwargs,
    )


def labelled_runs(tokenizer, sample):
    """Decode each maximal run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current)), current.clear()
    if current:
        runs.append(tokenizer.decode(current))
    return runs


@pytest.mark.parametrize("template", ["vicuna_v1", "llama3", "mistral", "chatml", "qwen_1_5", "chatml_direct"])
def test_only_answers_and_their_end_of_turn_are_labelled(tokenizer, template):
    sample = tokenize(tokenizer, TWO_TURNS, template)
    runs = [run.strip() for run in labelled_runs(tokenizer, sample)]
    eot = END_OF_TURN[template]
    assert runs == [f"The square is red.{eot}", f"blue{eot}"]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert sample.input_ids.count(image_id) == 4
    assert all(label == IGNORE_INDEX for token, label in zip(sample.input_ids, sample.labels, strict=True)
               if token == image_id)


def test_plain_template_labels_the_caption_only(tokenizer):
    caption = [{"from": "human", "value": "<image>\nDescribe briefly."}, {"from": "gpt", "value": "a red square"}]
    sample = tokenize(tokenizer, caption, "plain", tokens_per_image=(9,))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert sample.input_ids[0] == tokenizer.bos_token_id
    assert sample.input_ids[1:10] == [image_id] * 9
    assert "Describe" not in tokenizer.decode(sample.input_ids)  # LLaVA's plain drops the prompt text
    assert labelled_runs(tokenizer, sample) == ["a red square\n"]


def test_system_turn_replaces_default_and_is_masked(tokenizer):
    conversation = [{"from": "system", "value": "Answer tersely."}, *TWO_TURNS]
    sample = tokenize(tokenizer, conversation)
    text = tokenizer.decode(sample.input_ids)
    assert text.startswith("<s>Answer tersely. USER:") and "curious human" not in text
    assert len(labelled_runs(tokenizer, sample)) == 2


def test_text_only_sample(tokenizer):
    conversation = [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]
    sample = tokenize(tokenizer, conversation, tokens_per_image=())
    assert labelled_runs(tokenizer, sample) == [" hi</s>"]


def test_training_prompt_matches_the_serving_prompt(tokenizer, saved_checkpoints):
    """The checkpoint's processor renders the same prompt tokens that training saw before the answer."""
    processor = AutoProcessor.from_pretrained(saved_checkpoints["llava"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    served = processor.tokenizer(prompt.replace("<image>", "<image>" * 16), add_special_tokens=False)["input_ids"]
    conversation = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]
    trained = tokenize(processor.tokenizer, conversation, tokens_per_image=(16,))
    first_label = next(i for i, label in enumerate(trained.labels) if label != IGNORE_INDEX)
    assert trained.input_ids[:first_label] == served


@pytest.mark.parametrize(
    "conversation, error, reason",
    [
        ([], EmptyConversationError, "empty_conversation"),
        ([{"from": "human"}], MissingFieldError, "missing_field"),
        ([{"from": "human", "value": 3}], MissingFieldError, "missing_field"),
        ([{"from": "robot", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}], UnknownRoleError, "unknown_role"),
        (
            [{"from": "gpt", "value": "x"}, {"from": "human", "value": "<image>\nhi"}],
            RoleOrderError,
            "wrong_role_order",
        ),
        ([{"from": "human", "value": "<image>\nhi"}], RoleOrderError, "wrong_role_order"),
        (
            [{"from": "human", "value": "<image>"}, {"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
            RoleOrderError,
            "wrong_role_order",
        ),
        ([{"from": "human", "value": "no image here"}, {"from": "gpt", "value": "x"}], ImagePlaceholderError,
         "image_placeholder_mismatch"),
        ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}], ImagePlaceholderError,
         "image_placeholder_mismatch"),
        ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "<image>"}], ImagePlaceholderError,
         "image_placeholder_mismatch"),
    ],
    ids=["empty", "no-value", "non-string", "unknown-role", "gpt-first", "no-answer", "human-twice",
         "missing-placeholder", "extra-placeholder", "placeholder-in-answer"],
)
def test_malformed_conversations_raise_specific_errors(tokenizer, conversation, error, reason):
    with pytest.raises(error) as err:
        tokenize(tokenizer, conversation)
    assert err.value.reason == reason
    assert isinstance(err.value, SampleError)  # what the data pipeline catches and quarantines


def test_too_long_is_dropped_by_default(tokenizer):
    with pytest.raises(SequenceTooLongError, match="policy: drop"):
        tokenize(tokenizer, TWO_TURNS, max_length=60)


def prompt_length(tokenizer, conversation, tokens_per_image=(4,)):
    """Tokens before the first answer token."""
    sample = tokenize(tokenizer, conversation, tokens_per_image=tokens_per_image, max_length=100_000)
    return next(i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX)


def test_truncation_keeps_the_image_and_part_of_the_answer(tokenizer):
    long_answer = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "red " * 200}]
    limit = prompt_length(tokenizer, long_answer) + 10
    sample = tokenize(tokenizer, long_answer, truncation="truncate", max_length=limit)
    assert sample.truncated and len(sample.input_ids) == len(sample.labels) == limit
    assert sum(label != IGNORE_INDEX for label in sample.labels) == 10


def test_truncation_never_cuts_an_image(tokenizer):
    image_late = [{"from": "system", "value": "word " * 100}, {"from": "human", "value": "<image>"},
                  {"from": "gpt", "value": "x"}]
    limit = prompt_length(tokenizer, image_late, tokens_per_image=(20,)) - 15  # inside the image run
    with pytest.raises(SequenceTooLongError, match="would cut an image"):
        tokenize(tokenizer, image_late, truncation="truncate", max_length=limit, tokens_per_image=(20,))


def test_truncation_that_leaves_no_answer_is_refused(tokenizer):
    long_question = [{"from": "human", "value": "<image>\n" + "why " * 200}, {"from": "gpt", "value": "because"}]
    limit = prompt_length(tokenizer, long_question) - 5
    with pytest.raises(SequenceTooLongError, match="no answer tokens"):
        tokenize(tokenizer, long_question, truncation="truncate", max_length=limit)


def test_tokenizer_template_needs_generation_blocks():
    with pytest.raises(TemplateError, match="no chat_template"):
        resolve_chat_template("tokenizer", None)
    with pytest.raises(TemplateError, match="no {% generation %} blocks"):
        resolve_chat_template("tokenizer", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(TemplateError, match="no {% generation %} blocks"):  # "generation" in another name
        resolve_chat_template("tokenizer", "{{ m }}{% if add_generation_prompt %}A:{% endif %}")
    own = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    assert resolve_chat_template("tokenizer", own) == own
    with pytest.raises(TemplateError, match="unknown template 'alpaca'"):
        resolve_chat_template("alpaca", None)


def test_vicuna_text_matches_llava(tokenizer):
    sample = tokenize(tokenizer, TWO_TURNS, tokens_per_image=(2,))
    text = tokenizer.decode(sample.input_ids)
    assert text == (
        "<s>A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image><image>\nWhat colour is the square? "
        "ASSISTANT: The square is red.</s>USER: And the circle? ASSISTANT: blue</s>"
    )


def test_image_placeholder_moves_to_the_front_as_in_llava(tokenizer):
    trailing = [{"from": "human", "value": "What colour is it?\n<image>"}, {"from": "gpt", "value": "red"}]
    leading = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"}]
    assert tokenize(tokenizer, trailing).input_ids == tokenize(tokenizer, leading).input_ids


def test_client_part_order_does_not_change_the_prompt(tokenizer):
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(parts):
        messages = [{"role": "user", "content": parts}]
        return render_jinja_template([messages], chat_template=CHAT_TEMPLATES["vicuna_v1"], add_generation_prompt=True,
                                     **tokenizer.special_tokens_map)[0][0]

    text_first = render([{"type": "text", "text": "Colour?"}, {"type": "image"}])
    assert text_first == render([{"type": "image"}, {"type": "text", "text": "Colour?"}])
    assert text_first.endswith("USER: <image>\nColour? ASSISTANT:")


def test_plain_template_takes_one_captioned_image(tokenizer):
    with pytest.raises(TemplateRejectedError, match="one user turn and one caption") as err:
        tokenize(tokenizer, TWO_TURNS, "plain")
    assert err.value.reason == "template_rejected"
    with pytest.raises(TemplateRejectedError, match="needs an image"):
        tokenize(tokenizer, [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], "plain",
                 tokens_per_image=())


def test_templates_must_mark_every_answer(tokenizer):
    only_first = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and loop.index == 2 %}"
        "{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )
    with pytest.raises(LabelAlignmentError, match="marked 1 answer span"):
        tokenize_conversation(TWO_TURNS, tokenizer, only_first, tokens_per_image=[4], image_token="<image>",
                              max_length=512, truncation="drop")


def test_zero_width_offsets_inside_an_answer_are_labelled():
    from llava_platform.data.conversation import label_tokens

    text = "Q: A: a b"
    offsets = [(0, 2), (3, 5), (6, 7), (7, 7), (8, 9)]  # (7, 7): a trimmed whitespace token
    assert label_tokens(text, [(6, 9)], offsets) == [False, False, True, True, True]


@pytest.mark.parametrize(("template", "system"), [("qwen_1_5", "You are a helpful assistant."),
                                                  ("chatml_direct", "Answer the questions."), ("chatml", None)])
def test_chatml_variants_open_with_their_default_system_turn_unless_given_one(tokenizer, template, system):
    """LLaVA-NeXT's ``qwen_1_5`` (NeXT-72B/110B) and ``chatml_direct`` (NeXT-34B) are ChatML with a system turn."""
    text = tokenizer.decode(tokenize(tokenizer, TWO_TURNS, template).input_ids)
    user = "<|im_start|>user\n<image><image><image><image>\nWhat colour is the square?<|im_end|>\n"
    assert text.startswith((f"<|im_start|>system\n{system}<|im_end|>\n" if system else "") + user)
    given = tokenizer.decode(tokenize(tokenizer, [{"from": "system", "value": "Be brief."}, *TWO_TURNS],
                                      template).input_ids)
    assert given.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    assert (system or "no default") not in given
