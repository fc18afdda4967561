"""Which chat template a tokenizer renders conversations with, for training, export and generation.

Order of precedence: `model.chat_template` (a name from `NAMED_TEMPLATES` or a Jinja file), else the
tokenizer's own template, else a fallback built for that tokenizer. Training must teach the model to end
its turn, so the fallback closes every turn with the tokenizer's EOS token (the Zephyr layout the ORPO
authors used for Mistral-ORPO), and starts with BOS exactly when the tokenizer's own post-processor would
add one (`tokenizer(text)` with special tokens). Our collator and generation encode rendered text with
`add_special_tokens=False`, so whatever BOS/EOS the model should see must be written by the template; for a
SentencePiece-style tokenizer (`<s> $A` post-processor, no template, e.g. Mistral-7B-v0.1) this gives the
same ids TRL's ORPOTrainer builds (it prepends BOS and appends EOS to the tokenized text).

The chosen template is stored on the tokenizer (`tokenizer.chat_template`), so `save_pretrained` exports it
and whoever loads the trained model renders prompts the way training did.
"""

from __future__ import annotations

import logging
from pathlib import Path

from orpo.config import ConfigError

log = logging.getLogger(__name__)

# ChatML, the template SmolLM2 ships (its EOS is <|im_end|>, so its turns end with EOS).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Zephyr's layout, as in the chat template of the published Mistral-ORPO models: every turn is closed by
# the tokenizer's EOS (</s> for Mistral), and the generation prompt is "<|assistant|>\n". Unlike theirs, the
# newline between turns is written only when something follows, so a trained response ends with EOS itself
# (not EOS + "\n", which would be one more token to learn after the stop token).
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token }}"
    "{% if not loop.last or add_generation_prompt %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE, "zephyr": ZEPHYR_TEMPLATE}

_BOS_PREFIX = "{{ bos_token }}"


class ChatTemplateError(ConfigError):
    """`model.chat_template` names neither a known template nor a readable file."""


def load_named_or_file(spec: str) -> str:
    """The template text for `spec`: a name in NAMED_TEMPLATES, or the path of a Jinja template file."""
    if spec in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[spec]
    path = Path(spec).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ChatTemplateError(f"model.chat_template: {path} is empty")
        return text
    raise ChatTemplateError(
        f"model.chat_template: {spec!r} is neither a template name ({', '.join(NAMED_TEMPLATES)}) "
        "nor an existing Jinja file; give one of those names or the path of a .jinja file"
    )


def post_processor_adds_bos(tokenizer) -> bool:
    """Whether encoding text with special tokens puts BOS first (what the tokenizer does on its own)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos and bos not in tokenizer("a", add_special_tokens=False)["input_ids"]


def with_tokenizer_bos(template: str, tokenizer) -> str:
    """`template`, starting with `{{ bos_token }}` when the tokenizer's post-processor adds BOS itself."""
    if post_processor_adds_bos(tokenizer) and "bos_token" not in template:
        return _BOS_PREFIX + template
    return template


def fallback_template(tokenizer) -> str:
    """For a tokenizer without a template: Zephyr turns closed by its EOS, BOS as its post-processor does."""
    if getattr(tokenizer, "eos_token", None) is None:
        raise ChatTemplateError(
            "the tokenizer has neither a chat template nor an EOS token, so no turn could end; set "
            "model.chat_template to a Jinja file whose assistant turns end with a stop token"
        )
    return with_tokenizer_bos(ZEPHYR_TEMPLATE, tokenizer)


def template_of(tokenizer) -> str:
    """The template conversations are rendered with: the tokenizer's own, else the fallback for it."""
    return getattr(tokenizer, "chat_template", None) or fallback_template(tokenizer)


def training_template(tokenizer, spec: str | None) -> str:
    """The template training renders with, given `model.chat_template` (`spec`): the named template (with the
    tokenizer's BOS, like the fallback) or the file as written; without a spec, `template_of(tokenizer)`.

    Training (through `apply_chat_template_config`) and data preparation's length limits both call this.
    """
    if not spec:
        return template_of(tokenizer)
    template = load_named_or_file(spec)
    return with_tokenizer_bos(template, tokenizer) if spec in NAMED_TEMPLATES else template


def spec_digest(spec: str) -> str:
    """A hash of the template `spec` names (the file's content, not its path): changes when it is edited."""
    import hashlib

    return hashlib.sha256(load_named_or_file(spec).encode()).hexdigest()[:16]


def apply_chat_template_config(tokenizer, spec: str | None, source: str = "the tokenizer"):
    """Set `tokenizer.chat_template` to `training_template(tokenizer, spec)`. Returns the tokenizer."""
    own = getattr(tokenizer, "chat_template", None)
    template = training_template(tokenizer, spec)
    if spec and own and own != template:
        log.info("using chat template %r instead of the one %s ships", spec, source)
    elif not spec and not own:
        log.info("%s has no chat template; using Zephyr-style turns closed by %s", source, tokenizer.eos_token)
    tokenizer.chat_template = template
    return tokenizer
