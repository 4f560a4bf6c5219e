"""The safety checker (`enable_safety_checker`): the prompt before any GPU work, sampled frames after decoding.

Three pluggable checks, each on only when the operator configures it:
- a term policy: a file of case-insensitive regular expressions matched as whole words, re-read when it changes;
- a text classifier (any `transformers` text-classification model in a local folder) on the prompt;
- an image classifier (any image-classification model in a local folder, e.g. an NSFW detector) on evenly spaced
  frames of the video.
A label from the configured list scoring at or above its threshold flags the request.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wanserve.config import Settings
from wanserve.engine.video import to_uint8
from wanserve.errors import ContentPolicyViolation, WanserveError


class SafetyConfigError(WanserveError):
    """The operator's safety configuration cannot be used (a bad regular expression, a missing model)."""

    http_status = 503
    error_type = "runner_server_error"


@dataclass
class TermPolicy:
    path: Path
    _mtime_ns: int = -1
    _patterns: list[tuple[str, re.Pattern[str]]] | None = None

    def patterns(self) -> list[tuple[str, re.Pattern[str]]]:
        """The policy's patterns, re-read whenever the file changed since the last look."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError as exc:
            raise SafetyConfigError(f"cannot read the safety term file {self.path}: {exc.strerror}") from None
        if self._patterns is None or mtime != self._mtime_ns:
            compiled = []
            for number, raw in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
                term = raw.strip()
                if not term or term.startswith("#"):
                    continue
                try:
                    compiled.append((term, re.compile(rf"(?<!\w)(?:{term})(?!\w)", re.IGNORECASE)))
                except re.error as exc:
                    raise SafetyConfigError(f"{self.path}:{number}: bad regular expression {term!r}: {exc}") from None
            self._patterns, self._mtime_ns = compiled, mtime
        return self._patterns

    def match(self, text: str) -> str | None:
        for term, pattern in self.patterns():
            if pattern.search(text):
                return term
        return None


WINDOW_CHARS, WINDOW_STEP = 400, 300  # ~100-150 tokens of English, ~400 of CJK: inside a 512-token classifier


def prompt_as_read(prompt: str) -> str:
    """The prompt as the text encoder reads it: diffusers' Wan cleaning (ftfy, HTML entities unescaped twice,
    whitespace runs), then NFKC, which UMT5's tokenizer applies too (full-width letters read as ASCII)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return unicodedata.normalize("NFKC", prompt_clean(prompt))


def text_windows(text: str) -> list[str]:
    """`text` in overlapping windows of WINDOW_CHARS that together cover all of it."""
    if len(text) <= WINDOW_CHARS:
        return [text]
    starts = range(0, len(text) - WINDOW_CHARS + WINDOW_STEP, WINDOW_STEP)
    return [text[i : i + WINDOW_CHARS] for i in starts]


WINDOW_OVERLAP_TOKENS = 64


def token_windows(text: str, tokenizer: Any) -> list[str]:
    """`text` in overlapping windows that each fit the classifier's input (its own tokens, special ones included),
    cut where a word starts; together they cover all of it. Character windows (`text_windows`) where the tokenizer
    cannot map tokens back to the text."""
    limit = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
    body = limit - int(tokenizer.num_special_tokens_to_add(pair=False))
    try:
        spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer: no offsets
        return text_windows(text)
    if len(spans) <= body:
        return [text]

    def word_start(i: int) -> bool:
        begin = spans[i][0]
        return begin == 0 or text[begin - 1].isspace()

    overlap = max(1, min(WINDOW_OVERLAP_TOKENS, body // 4))
    windows, start = [], 0
    while True:
        end = min(start + body, len(spans))
        windows.append(text[spans[start][0] : spans[end - 1][1]])
        if end == len(spans):
            return windows
        # the next window starts `overlap` tokens back (so a word the cut split is whole in it), at the first token
        # of a word if one is within another `overlap`
        candidates = range(end - overlap, max(end - 2 * overlap, start + 1) - 1, -1)
        start = max(next((i for i in candidates if word_start(i)), end - overlap), start + 1)


def _flagged(scores: list[dict[str, Any]], labels: list[str], threshold: float) -> tuple[str, float] | None:
    wanted = {label.lower() for label in labels}
    for entry in scores:
        if str(entry["label"]).lower() in wanted and float(entry["score"]) >= threshold:
            return str(entry["label"]), float(entry["score"])
    return None


NOTHING_CONFIGURED = "nothing configured"


class SafetyChecker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.terms = TermPolicy(settings.safety_terms_file) if settings.safety_terms_file else None
        self._text: Any = None
        self._image: Any = None

    def describe(self) -> str:
        parts = []
        if self.terms is not None:
            parts.append("term policy")
        if self.settings.safety_text_model is not None:
            parts.append("text classifier")
        if self.settings.safety_image_model is not None:
            parts.append(f"image classifier on {self.settings.safety_frames} frames")
        return ", ".join(parts) or NOTHING_CONFIGURED

    @property
    def checks_output(self) -> bool:
        return self.settings.safety_image_model is not None

    def _pipeline(self, task: str, path: Path) -> Any:
        """A transformers pipeline over a local folder (loaded with `local_files_only`: never a download)."""
        import transformers

        try:
            if task == "image-classification":
                model = transformers.AutoModelForImageClassification.from_pretrained(
                    path, local_files_only=True, use_safetensors=True
                )
                processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
                return transformers.pipeline(task, model=model, image_processor=processor, device="cpu")
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                path, local_files_only=True, use_safetensors=True
            )
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            return transformers.pipeline(task, model=model, tokenizer=tokenizer, device="cpu")
        except Exception as exc:
            raise SafetyConfigError(f"cannot load the {task} model {path}: {type(exc).__name__}: {exc}") from None

    def check_prompt(self, prompt: str) -> None:
        """Checks the prompt as given and as the text encoder reads it (`prompt_as_read`): HTML entities or
        full-width letters must not carry past the checks what the model then reads in plain letters."""
        read = prompt_as_read(prompt)
        if self.terms is not None:
            term = self.terms.match(prompt) or self.terms.match(read)
            if term is not None:
                raise ContentPolicyViolation("prompt", f"it matches the term policy ({term!r})")
        s = self.settings
        if s.safety_text_model is not None:
            if self._text is None:
                self._text = self._pipeline("text-classification", s.safety_text_model)
            # The classifier reads a few hundred tokens; the encoder reads up to 512 of its own. Every part of the
            # prompt is classified, in overlapping windows of the classifier's own tokens, so nothing past its
            # length goes unread.
            tokenizer = getattr(self._text, "tokenizer", None)
            windows = token_windows(read, tokenizer) if tokenizer is not None else text_windows(read)
            for scores in self._text(windows, top_k=None, truncation=True):
                hit = _flagged(scores, s.safety_text_labels, s.safety_text_threshold)
                if hit is not None:
                    raise ContentPolicyViolation("prompt", f"the text classifier scored {hit[0]!r} at {hit[1]:.2f}")

    def check_frames(self, frames: np.ndarray) -> None:
        """`frames`: (n, height, width, 3) uint8 RGB, as the engine returns them (or floats in [0, 1])."""
        s = self.settings
        if s.safety_image_model is None:
            return
        from PIL import Image

        if self._image is None:
            self._image = self._pipeline("image-classification", s.safety_image_model)
        picks = np.unique(np.linspace(0, len(frames) - 1, num=min(s.safety_frames, len(frames))).round().astype(int))
        images = [Image.fromarray(frame) for frame in to_uint8(frames[picks])]
        for index, scores in zip(picks, self._image(images, top_k=None), strict=True):
            hit = _flagged(scores, s.safety_image_labels, s.safety_image_threshold)
            if hit is not None:
                raise ContentPolicyViolation(
                    "output", f"the image classifier scored {hit[0]!r} at {hit[1]:.2f} on frame {index}"
                )
