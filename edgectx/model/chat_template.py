"""Render a conversation with the model's own chat template (Jinja2, from GGUF `tokenizer.chat_template`).

Templates run in Jinja2's immutable sandbox with the helpers Hugging Face templates expect
(`raise_exception`, `strftime_now`, an unescaped `tojson`). A model without a template gets ChatML.

    template = ChatTemplate(source, bos_token="<s>", eos_token="</s>")
    text = template.render([{"role": "user", "content": "hi"}])
"""

from __future__ import annotations

import datetime
import json

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgectx.errors import EdgectxError

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# The names every render passes; a client's template variables may not replace them (or the helpers)
TEMPLATE_NAMES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "raise_exception",
                            "strftime_now"})


class TemplateError(EdgectxError):
    """The model's chat template refused the conversation (for example, roles out of the order it expects)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"The model's chat template refused the conversation: {message}")


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        self.is_fallback = not source
        self.source = source or CHATML
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"The model's chat template does not parse ({e}); the model file may be damaged.") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **variables) -> str:
        """The conversation as the model reads it. `variables`: more names for the template (a client's
        `chat_template_kwargs`, such as Qwen3's `enable_thinking`); they cannot replace the ones given here."""
        clash = TEMPLATE_NAMES & variables.keys()
        if clash:
            raise ValueError(f"template variables may not replace {', '.join(sorted(clash))}")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **variables,
            )
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"The model's chat template failed on this conversation: {e}.") from None
