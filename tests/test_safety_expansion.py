"""Safety checker and prompt expansion: the pieces on their own, then through a real server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safety_models import write_causal_lm, write_image_classifier, write_text_classifier
from server import CHEAP_INPUT, Server, run_request
from transformers import PreTrainedTokenizerFast

from wanserve.config import Settings
from wanserve.engine.prompt_expansion import (
    SYSTEM_PROMPT,
    ExpansionFailed,
    LocalModelExpander,
    OpenAICompatibleExpander,
    clean_expansion,
    expand_with_deadline,
)
from wanserve.engine.safety import (
    SafetyChecker,
    SafetyConfigError,
    _flagged,
    prompt_as_read,
    text_windows,
    token_windows,
)
from wanserve.errors import ContentPolicyViolation

APP = "fal-ai/wan-22"
EXPANDED = "A red fox trots through deep fresh snow at golden sunrise, slow tracking shot, soft mist."
EXPANDED_FLAGGED = "A red fox guards a forbidden temple at dusk."


@dataclass
class ChatServer:
    """An OpenAI-compatible chat-completions endpoint: answers, stalls or talks nonsense, and records requests."""

    mode: str = "ok"
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""


@pytest.fixture(scope="module")
def chat() -> Iterator[ChatServer]:
    state = ChatServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            state.requests.append({"path": self.path, "auth": self.headers.get("authorization"), **body})
            if state.mode == "slow":
                time.sleep(3)
            if state.mode == "garbage":
                payload = b"<html>oops</html>"
            elif state.mode == "flagged":  # an expansion the term policy flags
                answer = f"{EXPANDED_FLAGGED}"
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
            else:
                answer = f'Here is the rewritten prompt: "{EXPANDED}"'
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
            try:
                self.send_response(200)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                pass  # the client gave up (the timeout case)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state
    server.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("safety-models")
    return {
        "lm": write_causal_lm(folder / "lm"),
        "nsfw": write_image_classifier(folder / "nsfw", always="nsfw"),
        "clean": write_image_classifier(folder / "clean", always="normal"),
        "toxic": write_text_classifier(folder / "toxic", always="toxic"),
        "safe": write_text_classifier(folder / "safe", always="safe"),
    }


# --- prompt expansion ---
def test_openai_compatible_expansion_and_its_request(chat: ChatServer) -> None:
    chat.mode, chat.requests[:] = "ok", []
    expander = OpenAICompatibleExpander(chat.url, "qwen2.5-7b", "sk-test", timeout_s=5, max_tokens=200)
    assert expander.expand("a red fox in snow") == EXPANDED  # the preamble and quotes are stripped
    (sent,) = chat.requests
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer sk-test"
    assert sent["model"] == "qwen2.5-7b" and sent["max_tokens"] == 200
    assert sent["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "a red fox in snow"},
    ]


def test_an_api_url_with_a_query_and_credentials_is_called_right_and_shown_without_them(chat: ChatServer) -> None:
    """Azure-style `?api-version=`: the route goes on the path, the query stays. What /ready and the job log show
    of the URL has no user, password or query."""
    chat.mode, chat.requests[:] = "ok", []
    base = chat.url.replace("http://", "http://admin:llmPASS@") + "?api-version=2024-06-01&api_key=QSECRET"
    expander = OpenAICompatibleExpander(base, "m", None, timeout_s=5, max_tokens=50)
    assert expander.expand("a red fox in snow") == EXPANDED
    assert chat.requests[0]["path"] == "/v1/chat/completions?api-version=2024-06-01&api_key=QSECRET"
    shown = expander.description
    assert "llmPASS" not in shown and "QSECRET" not in shown and "admin" not in shown
    assert shown.startswith("chat API http://127.0.0.1:") and "/...?..." in shown


@pytest.mark.parametrize("mode", ["slow", "garbage"])
def test_expansion_failures_are_reported_not_raised_further(chat: ChatServer, mode: str) -> None:
    chat.mode = mode
    expander = OpenAICompatibleExpander(chat.url, "m", None, timeout_s=1, max_tokens=50)
    started = time.monotonic()
    with pytest.raises(ExpansionFailed, match="within 1 s" if mode == "slow" else "not a chat-completions answer"):
        expand_with_deadline(expander, "a fox", timeout_s=1)
    assert time.monotonic() - started < 3


def test_unreachable_api_fails_cleanly() -> None:
    expander = OpenAICompatibleExpander("http://127.0.0.1:9/v1", "m", None, timeout_s=2, max_tokens=50)
    with pytest.raises(ExpansionFailed, match="ConnectError"):
        expander.expand("a fox")


def test_local_causal_lm_expands_through_the_real_loading_code(models: dict[str, Path]) -> None:
    expander = LocalModelExpander(models["lm"], "cpu", timeout_s=20, max_tokens=12)
    expanded = expander.expand("a red fox runs through snow")
    assert expanded and expanded != "a red fox runs through snow"
    assert len(expanded.split()) <= 12  # bounded by max_tokens (one word per token here)
    assert expander.expand("a red fox runs through snow") == expanded  # greedy: reproducible


def test_clean_expansion_bounds_and_refuses_empty_answers() -> None:
    assert clean_expansion('Prompt: "A fox."') == "A fox."
    assert clean_expansion("Here is the rewritten prompt: “A fox at dawn.”") == "A fox at dawn."
    assert clean_expansion("Here's an expanded version of your prompt:\nA fox.") == "A fox."
    # The prompt's own words stay: a colon further on is not the end of a preamble, an inner quote not a wrapper.
    fox = "Here is a red fox in fresh snow while a clock tower behind it shows 6:45, soft golden light."
    assert clean_expansion(fox) == fox
    assert clean_expansion("Here's a quiet street at night; a sign says: closed.") == (
        "Here's a quiet street at night; a sign says: closed."
    )
    assert clean_expansion('A neon sign above the door reads "OPEN"') == 'A neon sign above the door reads "OPEN"'
    assert clean_expansion('"OPEN" glows on a sign, and "CLOSED" below it"') == (
        '"OPEN" glows on a sign, and "CLOSED" below it"'
    )
    long = "A fox runs. " * 400
    assert len(clean_expansion(long)) <= 2000 and clean_expansion(long).endswith(".")
    for empty in ("", "   ", '""', "..."):
        with pytest.raises(ExpansionFailed):
            clean_expansion(empty)


# --- safety ---
def test_term_policy_matches_whole_words_case_insensitively_and_follows_edits(tmp_path: Path) -> None:
    terms = tmp_path / "terms.txt"
    terms.write_text("# one regular expression per line\nforbidden\nblood(y)?\n\n")
    checker = SafetyChecker(Settings(safety_terms_file=terms))
    with pytest.raises(ContentPolicyViolation, match="forbidden") as hit:
        checker.check_prompt("A FORBIDDEN fox")
    assert hit.value.detail() == {
        "loc": ["body", "prompt"],
        "msg": "the prompt was flagged: it matches the term policy ('forbidden')",
        "type": "content_policy_violation",
    }
    with pytest.raises(ContentPolicyViolation):
        checker.check_prompt("a bloody fox")
    checker.check_prompt("a fox in unforbiddenland, bloodhound")  # not whole words: passes
    time.sleep(0.01)
    terms.write_text("snow\n")
    with pytest.raises(ContentPolicyViolation, match="snow"):
        checker.check_prompt("a fox in snow")
    checker.check_prompt("a forbidden fox")  # the edited policy no longer has it
    terms.write_text("bad[\n")
    with pytest.raises(SafetyConfigError, match=r"terms\.txt:1"):
        checker.check_prompt("x")


@pytest.mark.parametrize(
    "prompt",
    [
        "a &#102;orbidden statue",  # an HTML entity, unescaped by the encoder's cleaning
        "a f&amp;#111;rbidden statue",  # escaped twice: the cleaning unescapes twice
        "&#x66;&#x6F;&#x72;&#x62;&#x69;&#x64;&#x64;&#x65;&#x6E;",
        "a ｆｏｒｂｉｄｄｅｎ statue",  # full-width letters: UMT5's tokenizer reads them as ASCII (NFKC)
        "a\u00a0forbidden\tstatue",
    ],
)
def test_the_term_policy_reads_the_prompt_as_the_encoder_does(tmp_path: Path, prompt: str) -> None:
    terms = tmp_path / "terms.txt"
    terms.write_text("forbidden\n")
    assert "forbidden" in prompt_as_read(prompt)
    with pytest.raises(ContentPolicyViolation, match="forbidden"):
        SafetyChecker(Settings(safety_terms_file=terms)).check_prompt(prompt)


def test_the_text_classifier_reads_every_part_of_a_long_prompt() -> None:
    """A classifier reads a few hundred tokens; a prompt may be 10,000 characters. Every window is classified."""
    seen: list[str] = []

    def classifier(texts: list[str], top_k: None, truncation: bool) -> list[list[dict[str, Any]]]:
        seen.extend(texts)
        return [[{"label": "toxic", "score": 1.0 if "forbidden" in t else 0.0}] for t in texts]

    checker = SafetyChecker(Settings(safety_text_model=Path("never-loaded")))
    checker._text = classifier  # stands in for the loaded pipeline: flags any window holding the word
    filler = "a red fox runs through the snow " * 200  # 6,400 characters
    checker.check_prompt(filler)
    assert len(seen) > 15 and all(len(t) <= 400 for t in seen)
    with pytest.raises(ContentPolicyViolation, match="text classifier scored 'toxic'"):
        checker.check_prompt(filler + "a forbidden fox")
    text = "".join(chr(65 + i % 26) for i in range(1000))
    windows = text_windows(text)
    assert [len(w) for w in windows] == [400, 400, 400]
    assert windows[0] + "".join(w[100:] for w in windows[1:]) == text  # each overlaps the one before by 100


def test_classifiers_flag_by_label_and_threshold(models: dict[str, Path]) -> None:
    frames = np.random.default_rng(0).random((81, 64, 96, 3), dtype=np.float32)
    flagging = SafetyChecker(Settings(safety_image_model=models["nsfw"], safety_text_model=models["toxic"]))
    with pytest.raises(ContentPolicyViolation, match=r"'nsfw' at 1\.00 on frame 0") as hit:
        flagging.check_frames(frames)
    assert hit.value.detail()["loc"] == ["output", "video"]
    with pytest.raises(ContentPolicyViolation, match="text classifier scored 'toxic'"):
        flagging.check_prompt("a red fox")
    SafetyChecker(Settings(safety_image_model=models["clean"])).check_frames(frames)
    relaxed = Settings(
        safety_image_model=models["nsfw"],
        safety_image_labels=["gore"],
        safety_text_model=models["toxic"],
        safety_text_labels=["insult"],
    )
    SafetyChecker(relaxed).check_frames(frames)
    SafetyChecker(relaxed).check_prompt("a red fox")
    with pytest.raises(SafetyConfigError, match="cannot load"):
        SafetyChecker(Settings(safety_image_model=models["lm"] / "missing")).check_frames(frames)


def test_each_classifier_flags_at_its_own_threshold(models: dict[str, Path]) -> None:
    """The clean image model and the safe text model score their bad label near 0: only a threshold of 0 makes
    that a flag, and each classifier reads its own threshold."""
    frames = np.random.default_rng(0).random((81, 64, 96, 3), dtype=np.float32)
    strict_image = SafetyChecker(Settings(safety_image_model=models["clean"], safety_image_threshold=0.0))
    with pytest.raises(ContentPolicyViolation, match="'nsfw'"):
        strict_image.check_frames(frames)
    strict_text = SafetyChecker(Settings(safety_text_model=models["safe"], safety_text_threshold=0.0))
    with pytest.raises(ContentPolicyViolation, match="'toxic'"):
        strict_text.check_prompt("a red fox")
    both = Settings(safety_image_model=models["clean"], safety_text_model=models["safe"])
    SafetyChecker(both.model_copy(update={"safety_image_threshold": 0.0})).check_prompt("a red fox")
    SafetyChecker(both.model_copy(update={"safety_text_threshold": 0.0})).check_frames(frames)
    # a score at the threshold flags; one just under it does not
    assert _flagged([{"label": "NSFW", "score": 0.7}], ["nsfw"], 0.7) == ("NSFW", 0.7)
    assert _flagged([{"label": "nsfw", "score": 0.7}], ["nsfw"], 0.700001) is None
    assert _flagged([{"label": "other", "score": 1.0}], ["nsfw"], 0.0) is None


# --- through the server ---
@pytest.fixture(scope="module")
def safe_server(
    tmp_path_factory: pytest.TempPathFactory,
    model_cache: Path,
    coarse_model: Path,
    models: dict[str, Path],
    chat: ChatServer,
) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("safe-server")
    terms = folder / "terms.txt"
    terms.write_text("forbidden\n")
    srv = Server(
        folder / "data",
        model_cache,
        env={
            "WANSERVE_SAFETY_TERMS_FILE": str(terms),
            "WANSERVE_SAFETY_IMAGE_MODEL": str(models["nsfw"]),
            "WANSERVE_PROMPT_EXPANSION_URL": chat.url,
            "WANSERVE_PROMPT_EXPANSION_TIMEOUT_S": "2",
        },
        args=["--model", str(coarse_model)],
    ).start()
    yield srv
    srv.stop()


def run(server: Server, body: dict[str, Any]) -> tuple[dict[str, Any], httpx.Response, list[str]]:
    return run_request(server, APP, {**CHEAP_INPUT, **body})


def test_flagged_prompt_is_refused_before_any_denoising_step(safe_server: Server) -> None:
    status, result, logs = run(safe_server, {"prompt": "a Forbidden fox"})
    assert status["error_type"] == "content_policy_violation"
    assert result.status_code == 422 and result.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert any(line.startswith("Safety checker: checking the prompt (term policy, image classifier") for line in logs)
    assert not any(line.startswith("step ") for line in logs), logs


def test_flagged_output_is_refused_and_no_video_is_stored(safe_server: Server) -> None:
    status, result, logs = run(safe_server, {"prompt": "a red fox"})
    assert status["error_type"] == "content_policy_violation"
    detail = result.json()["detail"][0]
    assert detail["loc"] == ["output", "video"] and "image classifier scored 'nsfw'" in detail["msg"]
    assert any(line.startswith("step 1/1") for line in logs)
    assert "Safety checker: checking the video's frames" in logs
    assert not any(line.startswith(("Encoding", "Stored video")) for line in logs), logs
    assert not list((safe_server.data_dir / "files" / "objects").rglob("*.mp4"))


def test_with_the_checker_off_both_requests_succeed(safe_server: Server) -> None:
    for prompt in ("a Forbidden fox", "a red fox"):
        status, result, logs = run(safe_server, {"prompt": prompt, "enable_safety_checker": False})
        assert result.status_code == 200, (status, logs)
        # No check ran (neither the prompt's nor the frames'), and the log says so.
        assert [line for line in logs if line.startswith("Safety checker")] == [
            "Safety checker: off for this request (enable_safety_checker: false)"
        ]


EXPAND = {"prompt": "a red fox", "enable_prompt_expansion": True, "enable_safety_checker": False}


def test_expansion_through_the_server_and_its_fallback(safe_server: Server, chat: ChatServer) -> None:
    chat.mode = "ok"
    _, result, logs = run(safe_server, EXPAND)
    assert result.json()["prompt"] == EXPANDED
    assert "Expanded prompt" in "\n".join(logs) and any(EXPANDED in line for line in logs)
    chat.mode = "flagged"  # the caller's prompt passes; its expansion does not: dropped, never shown
    _, result, logs = run(safe_server, {**EXPAND, "enable_safety_checker": True})
    assert any(line.startswith("The expanded prompt was flagged (it matches the term policy") for line in logs), logs
    assert not any(EXPANDED_FLAGGED in line for line in logs)
    assert result.json()["detail"][0]["loc"] == ["output", "video"]  # it went on (this server flags every video)
    chat.mode = "slow"
    _, result, logs = run(safe_server, EXPAND)
    assert result.status_code == 200 and result.json()["prompt"] == "a red fox"
    assert any(line.startswith("Prompt expansion failed (no answer within 2 s)") for line in logs), logs
    chat.mode = "ok"


def char_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    """One token per character (a stand-in for a tokenizer that spends many tokens on few characters), with the
    [CLS]/[SEP] a BERT-style classifier adds."""
    from tokenizers import Tokenizer, models, processors

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz .,"))
    vocab = {t: i for i, t in enumerate(["[UNK]", "[PAD]", "[CLS]", "[SEP]", *chars])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        model_max_length=max_length,
    )  # fmt: skip


def test_classifier_windows_fit_its_own_tokens_and_start_at_words() -> None:
    tokenizer = char_tokenizer(64)
    words = ["w" + "".join("abcdefghij"[int(d)] for d in f"{i:03d}") for i in range(300)]  # all different
    text = " ".join(words)
    windows = token_windows(text, tokenizer)
    assert len(windows) > 10
    for i, window in enumerate(windows):
        assert len(tokenizer(window)["input_ids"]) <= 64  # nothing cut off by the classifier's truncation
        if i:
            start = text.index(window)
            assert text[start - 1] == " "  # a word's start, not the middle of one
    covered = set()
    for window in windows:
        start = text.index(window)
        covered.update(range(start, start + len(window)))
    assert covered == set(range(len(text)))
    assert token_windows("a short prompt", tokenizer) == ["a short prompt"]
