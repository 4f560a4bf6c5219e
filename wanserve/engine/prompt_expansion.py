"""Prompt expansion (`enable_prompt_expansion`): an LLM rewrites the prompt into a detailed, visual,
motion-aware description, keeping its meaning and language.

Two backends behind one small interface: a local `transformers` causal LM loaded from a folder, or any
OpenAI-compatible chat-completions API. Expansion never fails a request: an error, a timeout or an empty
or garbled answer leaves the original prompt in place, and the caller logs why.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import httpx

from wanserve.config import Settings
from wanserve.logsetup import loggable_url

SYSTEM_PROMPT = (
    "You rewrite prompts for a text-to-video model. Expand the user's prompt into one vivid paragraph of at most "
    "120 words that a camera could film: the subject and its appearance, the setting, the lighting and colours, "
    "the motion of the subject and of the camera, and the shot type. Keep every element and the meaning of the "
    "original, add nothing that contradicts it, and write in the same language as the prompt. Answer with the "
    "rewritten prompt only: no preamble, no quotes, no lists."
)
MAX_PROMPT_CHARS = 2000  # an expansion longer than this is cut at a sentence end
# A chat model's lead-in: "Here is the rewritten prompt:", "Prompt:". Short, and only where it names what follows
# (a prompt, a rewrite...): "Here is a fox ... at 6:45" is the prompt itself and keeps every word.
_PREAMBLE = re.compile(
    r"^\s*(?:here(?:'s| is)[^:\n]{0,60}?\b(?:prompt|rewrite|rewritten|expanded|expansion|version|description)\b"
    r"[^:\n]{0,20}:|(?:rewritten |expanded )?prompt\s*:)\s*",
    re.IGNORECASE,
)
_QUOTE_PAIRS = {'"': '"', "“": "”", "'": "'"}


class ExpansionFailed(Exception):
    """The backend answered nothing usable (the caller keeps the original prompt)."""


class PromptExpander(Protocol):
    description: str  # for the request log, e.g. "local model /models/qwen"

    def expand(self, prompt: str) -> str: ...


def _unquoted(text: str) -> str:
    """Text wrapped in one pair of quotes, without them; any other text as it is (a sign that reads "OPEN" at the
    end keeps its quotes)."""
    if len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        inner = text[1:-1]
        if text[0] not in inner and text[-1] not in inner:
            return inner.strip()
    return text


def clean_expansion(text: str) -> str:
    """The rewritten prompt alone: no chat preamble or wrapping quotes, bounded in length."""
    text = _unquoted(_PREAMBLE.sub("", text.strip()).strip())
    text = " ".join(text.split())
    if len(text) > MAX_PROMPT_CHARS:
        cut = text[:MAX_PROMPT_CHARS]
        end = max(cut.rfind(". "), cut.rfind("。"))
        text = cut[: end + 1] if end > MAX_PROMPT_CHARS // 2 else cut
    if not text or not any(ch.isalnum() for ch in text):
        raise ExpansionFailed("the model answered no text")
    return text


class OpenAICompatibleExpander:
    def __init__(self, base_url: str, model: str, key: str | None, timeout_s: float, max_tokens: int) -> None:
        parts = urlsplit(base_url)  # the path gets the route; a query (`?api-version=`) stays a query
        self.url = urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions"))
        self.model = model
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.description = f"chat API {loggable_url(self.url)} (model {model})"  # shown in /ready and job logs

    def expand(self, prompt: str) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": 0.7,
        }
        try:
            response = httpx.post(self.url, json=body, headers=self.headers, timeout=self.timeout_s)
        except httpx.TimeoutException:
            raise ExpansionFailed(f"no answer within {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise ExpansionFailed(f"{type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise ExpansionFailed(f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ExpansionFailed(f"not a chat-completions answer: {response.text[:200]}") from None
        if not isinstance(content, str):
            raise ExpansionFailed("the answer has no text content")
        return clean_expansion(content)


class LocalModelExpander:
    """A chat model from a local folder, loaded once. On a GPU it visits the GPU only while expanding."""

    def __init__(self, path: Path, device: str, timeout_s: float, max_tokens: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
        # one expansion at a time: one abandoned past its deadline must finish before the next uses the model
        self.lock = threading.Lock()
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.description = f"local model {path}"

    def _inputs(self, prompt: str) -> Any:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:  # a base model: a plain transcript it can continue
            text = f"{SYSTEM_PROMPT}\n\nPrompt: {prompt}\nRewritten prompt:"
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)

    def expand(self, prompt: str) -> str:
        from transformers import MaxTimeCriteria, StoppingCriteriaList

        inputs = self._inputs(prompt)
        offload = self.device.type != "cpu"
        with self.lock:
            return self._generate(inputs, offload, StoppingCriteriaList([MaxTimeCriteria(self.timeout_s)]))

    def _generate(self, inputs: Any, offload: bool, stopping: Any) -> str:
        try:
            if offload:
                self.model.to(self.device)
            with self.torch.no_grad():
                out = self.model.generate(
                    **inputs.to(self.device),
                    max_new_tokens=self.max_tokens,
                    do_sample=False,
                    stopping_criteria=stopping,
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                )
        finally:
            if offload:
                self.model.to("cpu")
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        return clean_expansion(self.tokenizer.decode(new_tokens, skip_special_tokens=True))


def expander_from_settings(settings: Settings) -> PromptExpander | None:
    """The configured backend (a local model first, else an API), or None when expansion is not set up."""
    if settings.prompt_expansion_model is not None:
        return LocalModelExpander(
            settings.prompt_expansion_model,
            settings.prompt_expansion_device,
            settings.prompt_expansion_timeout_s,
            settings.prompt_expansion_max_tokens,
        )
    if settings.prompt_expansion_url:
        return OpenAICompatibleExpander(
            settings.prompt_expansion_url,
            settings.prompt_expansion_api_model,
            settings.prompt_expansion_key,
            settings.prompt_expansion_timeout_s,
            settings.prompt_expansion_max_tokens,
        )
    return None


def expand_with_deadline(expander: PromptExpander, prompt: str, timeout_s: float) -> str:
    """Runs `expand` with a hard deadline: a backend that hangs past it is abandoned (its thread finishes alone)."""
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["text"] = expander.expand(prompt)
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=work, name="prompt-expansion", daemon=True)
    thread.start()
    thread.join(timeout_s + 5.0)
    if thread.is_alive():
        raise ExpansionFailed(f"no answer within {timeout_s:g} s")
    if "error" in result:
        error = result["error"]
        raise error if isinstance(error, ExpansionFailed) else ExpansionFailed(f"{type(error).__name__}: {error}")
    return str(result["text"])
