"""The playground page in real headless Chromium (Debian's, driven by Playwright) against a real server with
an API key: the form built from the schema, submit, live progress, the video, field errors, cancel, history."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright
from server import Server

KEY = "playground-key"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("WANSERVE_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path, coarse_model: Path) -> Iterator[Server]:
    srv = Server(
        tmp_path_factory.mktemp("playground") / "data",
        model_cache,
        args=["--model", str(coarse_model), "--api-key", KEY],
    ).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, keyed_server: Server) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    opened.goto(keyed_server.url + "/")
    yield opened
    context.close()
    assert errors == []  # no uncaught script error on the page


def fill_request(page: Page, frames: int, steps: int) -> None:
    page.get_by_label("Prompt *").fill("a red fox walks through fresh snow")
    page.get_by_label("Resolution").select_option("480p")
    page.get_by_label("Num frames").fill(str(frames))
    page.get_by_label("Num inference steps").fill(str(steps))
    page.get_by_label("Seed").fill("7")


def test_form_is_generated_from_the_schema_with_ranges_and_defaults(page: Page) -> None:
    frames = page.get_by_label("Num frames")
    expect(frames).to_have_attribute("min", "81")
    expect(frames).to_have_attribute("max", "121")
    expect(frames).to_have_value("81")
    expect(page.locator("#help-num_frames")).to_contain_text("Range 81–121")
    expect(page.get_by_label("Aspect ratio").locator("option")).to_have_text(["16:9", "9:16", "1:1"])
    expect(page.get_by_label("Resolution")).to_have_value("720p")
    expect(page.get_by_label("Enable safety checker")).to_be_checked()
    expect(page.get_by_label("Seed")).to_have_attribute("placeholder", "random")
    # a bound past 2^53 as the schema writes it, not rounded by JSON.parse (a seed in the shown range must be valid)
    expect(page.get_by_label("Seed")).to_have_attribute("max", str(2**63 - 1))
    expect(page.locator("#help-seed")).to_contain_text(f"Range {-(2**63)}–{2**63 - 1}.")
    page.get_by_role("button", name="Add LoRA").click()
    expect(page.locator(".lora-row")).to_have_count(1)
    expect(page.locator(".lora-row").get_by_label("Expert")).to_have_value("both")
    expect(page.locator(".lora-row").get_by_label("Path or URL")).to_be_focused()  # keyboard users land in it
    # Remove: focus goes back to "Add LoRA", and each Remove is named by its row's place
    page.get_by_role("button", name="Add LoRA").click()
    page.get_by_role("button", name="Remove LoRA 1").click()
    expect(page.locator(".lora-row")).to_have_count(1)
    expect(page.get_by_role("button", name="Add LoRA")).to_be_focused()
    expect(page.locator(".lora-row .remove-lora")).to_have_attribute("aria-label", "Remove LoRA 1")
    # every control has a label a screen reader announces, and the whole form is reachable with Tab
    unlabeled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea')]
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
            .map(el => el.id || el.name)"""
    )
    assert unlabeled == []
    page.get_by_label("API key").focus()
    reached = set()
    for _ in range(60):
        page.keyboard.press("Tab")
        reached.add(page.evaluate("document.activeElement.id"))
    assert {"f-prompt", "f-num_frames", "f-resolution", "add-lora", "submit"} <= reached


def test_without_the_key_the_request_is_refused_clearly(page: Page) -> None:
    fill_request(page, 81, 1)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_have_text("Request refused (HTTP 401).")
    expect(page.locator("#form-error")).not_to_be_empty()
    # a pasted key with characters no header carries: said before anything is sent (fetch threw about ISO-8859-1)
    page.get_by_label("API key").fill("ключ-key")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#form-error")).to_have_text(
        "The API key holds characters no HTTP header can carry: check what was pasted."
    )
    expect(page.get_by_label("API key")).to_be_focused()


def test_generate_shows_progress_plays_the_video_and_remembers_it(
    page: Page, capsys: pytest.CaptureFixture[str]
) -> None:
    submitted: list[tuple[str, str]] = []
    page.on("request", lambda r: submitted.append((r.url, r.post_data or "")) if r.method == "POST" else None)
    page.get_by_label("API key").fill(KEY)
    fill_request(page, frames=85, steps=2)
    page.get_by_label("Frames per second").fill("10")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_have_text("Done · seed 7", timeout=180_000)
    # To the base endpoint, without the unchecked reverse_video it does not read (it would log it as unknown).
    assert [url.split("/", 3)[3] for url, _ in submitted] == ["fal-ai/wan-22"], submitted
    assert "reverse_video" not in json.loads(submitted[0][1])
    progress = page.locator("#progress")
    assert progress.evaluate("p => [p.value, p.max]") == [2, 2]  # the last denoising step was shown
    duration, width, height = page.locator("#video").evaluate(
        """async (v) => {
            if (v.readyState < 1) await new Promise((ok, fail) => {
                v.addEventListener('loadedmetadata', ok, {once: true});
                v.addEventListener('error', () => fail(new Error('video error ' + v.error?.code)), {once: true});
            });
            return [v.duration, v.videoWidth, v.videoHeight];
        }"""
    )
    assert duration == pytest.approx(85 / 10, abs=0.01) and (width, height) == (832, 480)
    expect(page.get_by_role("link", name="Download mp4")).to_have_attribute(
        "href", (page.locator("#video").get_attribute("src") or "") + "&download=1"
    )
    page.get_by_label("Seed").fill("")
    page.get_by_role("button", name="Use this seed").click()
    expect(page.get_by_label("Seed")).to_have_value("7")
    expect(page.locator("#history li").first).to_contain_text("done · seed 7")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    with capsys.disabled():  # into the CI log: where the screenshot artifact is
        print(f"\nplayground screenshot: {shot.resolve()}")
    # the history survives a reload (this browser's requests)
    page.reload()
    expect(page.locator("#history li").first).to_contain_text("done · seed 7")
    expect(page.get_by_label("API key")).to_have_value(KEY)


def test_bad_values_show_field_errors(page: Page) -> None:
    page.get_by_label("API key").fill(KEY)
    fill_request(page, frames=500, steps=1)
    page.get_by_label("Guidance scale", exact=True).fill("99")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#err-num_frames")).to_have_text("Input should be less than or equal to 121")
    expect(page.locator("#err-guidance_scale")).to_contain_text("less than or equal to 20")
    expect(page.get_by_label("Num frames")).to_have_attribute("aria-invalid", "true")
    # a LoRA the server cannot use: its row shows the reason once the request fails. The first row is left empty
    # (not sent): the server's `loras[0]` is the page's second row.
    page.get_by_label("Num frames").fill("81")
    page.get_by_label("Guidance scale", exact=True).fill("1")
    page.get_by_role("button", name="Add LoRA").click()
    page.get_by_role("button", name="Add LoRA").click()
    rows = page.locator(".lora-row")
    rows.nth(1).get_by_label("Path or URL").fill("/etc/passwd.safetensors")
    page.get_by_role("button", name="Generate").click()
    expect(rows.nth(1).locator(".error").first).to_contain_text("local LoRA paths are disabled", timeout=60_000)
    expect(rows.nth(0).locator(".error").first).to_be_empty()
    expect(page.locator("#status")).to_have_text("Failed: invalid_lora")  # the type, from the result's header


def test_a_number_the_browser_cannot_read_is_an_error_not_the_default(page: Page) -> None:
    """Chromium gives a number field holding "12e" the value "": left out, the server would draw a random seed (or
    use the default) without a word. An emptied LoRA scale is the server's default, 1, never 0."""
    posted: list[str] = []
    page.on("request", lambda r: posted.append(r.post_data or "") if r.method == "POST" else None)
    page.get_by_label("API key").fill(KEY)
    fill_request(page, 81, 1)
    page.get_by_label("Seed").fill("")
    page.get_by_label("Seed").press_sequentially("12e")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#err-seed")).to_have_text("Not a number.")
    expect(page.get_by_label("Seed")).to_be_focused()
    assert posted == []
    page.get_by_label("Seed").fill("7")
    page.get_by_role("button", name="Add LoRA").click()
    row = page.locator(".lora-row")
    row.get_by_label("Path or URL").fill("owner/styles")
    row.get_by_label("Weight file").fill("ink.safetensors")
    row.get_by_label("Scale").fill("")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text("Failed", timeout=60_000)
    (lora,) = json.loads(posted[0])["loras"]
    assert lora == {"path": "owner/styles", "weight_name": "ink.safetensors", "transformer": "both"}


def test_a_seed_past_2_53_is_sent_exactly_or_refused_never_rounded(page: Page) -> None:
    posted: list[str] = []
    page.on("request", lambda r: posted.append(r.post_data or "") if r.method == "POST" else None)
    page.get_by_label("API key").fill(KEY)
    fill_request(page, 81, 1)
    big = str(2**63 - 1)
    page.get_by_label("Seed").fill(big)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_have_text(f"Done · seed {big}", timeout=120_000)
    assert f'"seed":{big}' in posted[0]
    # A browser without JSON.rawJSON (older Safari, Firefox before 135) would send it rounded: refused instead.
    page.add_init_script("delete JSON.rawJSON")
    page.reload()
    fill_request(page, 81, 1)
    page.get_by_label("Seed").fill(big)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#err-seed")).to_have_text("This browser cannot send a number this large exactly.")
    assert len(posted) == 1


def test_the_page_waits_out_a_server_outage_and_shows_the_result(page: Page) -> None:
    """A server restart (or a proxy answering 502-504 meanwhile) while a request runs: the request goes on, so the
    page keeps asking, says so, and shows the result once the server answers again."""
    page.get_by_label("API key").fill(KEY)
    fill_request(page, 81, 2)
    outage = {"status": 4, "result": 2}  # failed answers left: status polls unreachable, results from a proxy

    def outage_answer(route: Route) -> None:
        path = urlsplit(route.request.url).path
        if "/status" in path and outage["status"] > 0:  # the status stream, then the polls that replace it
            outage["status"] -= 1
            route.abort("connectionrefused")
        elif path.endswith(("/status", "/stream", "/cancel")):
            route.continue_()
        elif outage["result"] > 0:
            outage["result"] -= 1
            route.fulfill(status=502, body="<html>bad gateway</html>", content_type="text/html")
        else:
            route.continue_()

    page.route(lambda url: "/requests/" in url, outage_answer)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text("Server unreachable", timeout=60_000)
    expect(page.locator("#status")).to_have_text("Done · seed 7", timeout=120_000)
    assert outage == {"status": 0, "result": 0}
    expect(page.locator("#history li").first).to_contain_text("done · seed 7")


def test_the_key_is_kept_for_the_tab_unless_the_user_asks_to_remember_it(page: Page, keyed_server: Server) -> None:
    # Earlier versions kept every key typed in localStorage, unasked: gone at the next visit, not taken as "remember"
    page.evaluate("localStorage.setItem('wanserve.key', 'an-old-key')")
    page.reload()
    expect(page.get_by_label("API key")).to_have_value("")
    expect(page.get_by_label("Remember on this computer")).not_to_be_checked()
    assert page.evaluate("localStorage.getItem('wanserve.key')") is None
    page.get_by_label("API key").fill(KEY)
    fill_request(page, 500, 1)  # refused by the server: the key is kept when a request is sent, whatever comes back
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#err-num_frames")).not_to_be_empty()
    assert page.evaluate("localStorage.getItem('wanserve.api-key')") is None
    page.reload()
    expect(page.get_by_label("API key")).to_have_value(KEY)  # this tab still has it
    other = page.context.new_page()
    other.goto(keyed_server.url + "/")
    expect(other.get_by_label("API key")).to_have_value("")  # another tab does not
    page.get_by_label("Remember on this computer").check()
    assert page.evaluate("localStorage.getItem('wanserve.api-key')") == KEY
    other.reload()
    expect(other.get_by_label("API key")).to_have_value(KEY)
    expect(other.get_by_label("Remember on this computer")).to_be_checked()
    other.get_by_label("Remember on this computer").uncheck()
    assert other.evaluate("localStorage.getItem('wanserve.api-key')") is None


def test_cancel_stops_a_running_request(page: Page) -> None:
    page.get_by_label("API key").fill(KEY)
    fill_request(page, frames=121, steps=100)  # long enough (tens of seconds) to be cancelled mid-way
    page.get_by_label("Resolution").select_option("580p")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text(re.compile(r"Step \d+/100"), timeout=120_000)
    # A cancel that does not get through says so, and can be tried again.
    page.route("**/cancel", lambda route: route.fulfill(status=503, json={"detail": "store unavailable"}))
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#form-error")).to_have_text(
        "Cancel failed (HTTP 503: store unavailable); the request is still running."
    )
    expect(page.get_by_role("button", name="Cancel")).to_be_enabled()
    page.unroute("**/cancel")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#status")).to_have_text("Cancelled.", timeout=60_000)
    expect(page.locator("#history li").first).to_contain_text("cancelled")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()


def test_reverse_video_is_sent_to_the_endpoint_that_reads_it(page: Page) -> None:
    """reverse_video exists only on /lora; the base endpoint would ignore it (with a warning in the logs). The same
    request checks what the form sends as typed: a seed past 2^53 to the digit (a JS number would round it, and
    the video would not be the one asked for), and an emptied negative prompt (none, not the default)."""
    submitted: list[tuple[str, str]] = []
    page.on("request", lambda r: submitted.append((r.url, r.post_data or "")) if r.method == "POST" else None)
    page.get_by_label("API key").fill(KEY)
    fill_request(page, frames=81, steps=1)
    big_seed = str(2**53 + 1)  # 9007199254740993; as a JS number, 9007199254740992
    page.get_by_label("Seed").fill("0" + big_seed)  # a number field takes a leading zero; JSON does not
    page.get_by_label("Negative prompt").fill("")
    page.get_by_label("Reverse video").check()
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_have_text(f"Done · seed {big_seed}", timeout=120_000)
    assert [url.split("/", 3)[3] for url, _ in submitted] == ["fal-ai/wan-22/lora"], submitted
    sent = json.loads(submitted[0][1], parse_int=int)
    assert sent["seed"] == 2**53 + 1 and sent["negative_prompt"] == "" and sent["reverse_video"] is True
    page.get_by_label("Seed").fill("")
    page.get_by_role("button", name="Use this seed").click()
    expect(page.get_by_label("Seed")).to_have_value(big_seed)


def test_the_api_docs_page_renders_from_this_server_alone(browser: Browser, keyed_server: Server) -> None:
    """FastAPI's `/docs` loads its script from a CDN: blank on a network without one, and running whatever the CDN
    serves on a page that takes the API key. Here every request to another host is refused."""
    context = browser.new_context()
    elsewhere: list[str] = []

    def only_this_server(route: Route) -> None:
        if route.request.url.startswith(keyed_server.url + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_this_server)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        opened.goto(keyed_server.url + "/docs")
        expect(opened.locator(".opblock-summary-path", has_text="/{endpoint}").first).to_be_visible(timeout=20_000)
        expect(opened.get_by_role("button", name="Authorize")).to_be_visible()  # the API key's security scheme
    finally:
        context.close()
    assert elsewhere == [] and errors == []


def test_download_saves_the_video_when_its_url_is_on_another_origin(browser: Browser, keyed_server: Server) -> None:
    """The page at `localhost`, its videos at the server's public URL (`127.0.0.1`): another origin, where a link's
    `download` attribute does nothing (the video opened in the tab instead), as it is behind an S3 redirect."""
    context = browser.new_context(accept_downloads=True)
    opened = context.new_page()
    try:
        opened.goto(keyed_server.url.replace("127.0.0.1", "localhost") + "/")
        opened.get_by_label("API key").fill(KEY)
        fill_request(opened, frames=81, steps=1)
        opened.get_by_role("button", name="Generate").click()
        expect(opened.locator("#status")).to_have_text("Done · seed 7", timeout=180_000)
        assert (opened.locator("#video").get_attribute("src") or "").startswith(keyed_server.url + "/files/")
        with opened.expect_download(timeout=20_000) as started:
            opened.get_by_role("link", name="Download mp4").click()
        download = started.value
        assert download.suggested_filename.endswith(".mp4")
        assert Path(download.path()).read_bytes()[4:8] == b"ftyp"
    finally:
        context.close()


def test_a_request_is_followed_with_its_own_key_and_again_after_a_reload(page: Page) -> None:
    """Another key typed while a request runs owns other requests (its result answered 401 to the page), and a
    reload mid-run used to leave the request IN_QUEUE in the history for ever, its video out of reach."""
    page.get_by_label("API key").fill(KEY)
    fill_request(page, frames=81, steps=12)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text(re.compile(r"Step \d+/12"), timeout=120_000)
    page.get_by_label("API key").fill("another-key-typed-meanwhile")
    expect(page.locator("#status")).to_have_text("Done · seed 7", timeout=120_000)
    expect(page.locator("#video")).to_be_visible()
    # the next request starts without the last one's video and seed on screen
    page.get_by_label("API key").fill(KEY)
    page.get_by_label("Num frames").fill("500")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#err-num_frames")).not_to_be_empty()
    expect(page.locator("#video")).to_be_hidden()
    expect(page.locator("#result-meta")).to_be_hidden()

    page.get_by_label("Num frames").fill("81")
    page.get_by_label("Seed").fill("8")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text(re.compile(r"Step \d+/12"), timeout=120_000)
    page.reload()
    expect(page.locator("#status")).to_have_text("Done · seed 8", timeout=120_000)
    expect(page.locator("#history li").first).to_contain_text("done · seed 8")
    # no video URL is kept in the browser (signed, it opens without a key for days): Show reads the result again
    assert "/files/" not in page.evaluate("localStorage.getItem('wanserve.history')")
    page.get_by_role("button", name=re.compile("^Show: a red fox")).first.click()
    expect(page.locator("#video")).to_have_attribute("src", re.compile("/files/"))
    # reopened without the key (it was kept for the tab only): the request is not "error" for good, Check reads it
    fill_request(page, frames=81, steps=12)
    page.get_by_label("Seed").fill("9")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_contain_text(re.compile(r"Step \d+/12"), timeout=120_000)
    page.evaluate("sessionStorage.clear()")
    page.reload()
    expect(page.locator("#history li").first).to_contain_text("unknown (not readable with this key, or gone)")
    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name=re.compile("^Check: a red fox")).click()
    expect(page.locator("#status")).to_have_text("Done · seed 9", timeout=120_000)
    page.get_by_role("button", name="Clear history").click()
    expect(page.locator("#history li")).to_have_count(0)
    assert page.evaluate("localStorage.getItem('wanserve.history')") is None


def test_a_status_stream_gone_silent_gives_way_to_polling(page: Page) -> None:
    """A connection dropped without a reset (a laptop that slept, a proxy's idle timeout) left the page waiting for
    ever: the server's keep-alives every 15 s stop, and after 45 s of silence the page polls instead."""
    page.clock.install()
    page.reload()
    held: list[Route] = []
    page.route("**/status/stream*", lambda route: held.append(route))  # never answered: a dead connection
    page.get_by_label("API key").fill(KEY)
    fill_request(page, frames=81, steps=1)
    page.get_by_role("button", name="Generate").click()
    for _ in range(120):  # (the page's own waiting functions run on the installed clock: polled from here)
        if held:
            break
        page.wait_for_timeout(250)
    assert len(held) == 1
    page.clock.fast_forward(50_000)
    for _ in range(120):  # the polls' 1 s waits run on the installed clock too
        if page.locator("#status").text_content() == "Done · seed 7":
            break
        page.clock.fast_forward(1_000)
        page.wait_for_timeout(250)
    expect(page.locator("#status")).to_have_text("Done · seed 7")
    assert len(held) == 1


def test_a_lora_file_from_this_computer_is_uploaded_and_its_url_used(page: Page, keyed_server: Server) -> None:
    """Opened under another name than the server's public URL (`localhost` here, `127.0.0.1` there), as on a LAN:
    the upload goes to this page's origin (the public URL's would be a cross-origin PUT, refused)."""
    page.goto(keyed_server.url.replace("127.0.0.1", "localhost") + "/")
    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name="Add LoRA").click()
    row = page.locator(".lora-row").first
    expect(row).to_have_attribute("aria-label", "LoRA 1")
    content = b"not really a LoRA, only bytes to store"
    row.get_by_label("Upload a .safetensors file").set_input_files(
        files=[{"name": "style.safetensors", "mimeType": "application/octet-stream", "buffer": content}]
    )
    expect(row.get_by_label("Path or URL")).to_have_value(re.compile(r"/files/.+/style\.safetensors"))
    expect(page.locator("#status")).to_have_text("Uploaded style.safetensors.")
    url = row.get_by_label("Path or URL").input_value()
    assert url.startswith(keyed_server.url) and httpx.get(url).content == content  # signed: the URL alone reads it
    # Generate waits for every upload: one finished first must not let a request go without the other's LoRA
    held: list[Route] = []
    page.route("**/rest/storage/upload/put/**", lambda route: held.append(route))
    page.get_by_role("button", name="Add LoRA").click()
    rows = page.locator(".lora-row")
    for i in (0, 1):
        rows.nth(i).get_by_label("Upload a .safetensors file").set_input_files(
            files=[{"name": f"l{i}.safetensors", "mimeType": "application/octet-stream", "buffer": content}]
        )
    for _ in range(80):
        if len(held) == 2:
            break
        page.wait_for_timeout(250)
    assert len(held) == 2
    expect(page.get_by_role("button", name="Generate")).to_be_disabled()
    held[0].continue_()
    expect(page.locator("#status")).to_contain_text("Uploaded l")
    expect(page.get_by_role("button", name="Generate")).to_be_disabled()
    held[1].continue_()
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()


def test_the_page_cannot_be_framed_by_another_site(keyed_server: Server) -> None:
    page_headers = httpx.get(keyed_server.url + "/").headers
    assert page_headers["content-security-policy"] == "frame-ancestors 'none'"
    assert page_headers["x-frame-options"] == "DENY"


def test_the_prompt_used_is_shown_when_expansion_changed_it(page: Page) -> None:
    """With prompt expansion on, the result's `prompt` is the expanded one the video was made from (here the
    server's answer is rewritten as an expanding server would send it)."""

    def expanded(route: Route) -> None:
        answer = route.fetch()  # the result: `/requests/{id}`, nothing after the id
        body = answer.json()
        route.fulfill(response=answer, json={**body, "prompt": body["prompt"] + ", golden hour, 35mm film"})

    page.route(re.compile(r"/requests/[^/?]+$"), expanded)
    page.get_by_label("API key").fill(KEY)
    fill_request(page, frames=81, steps=1)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_have_text("Done · seed 7", timeout=120_000)
    expect(page.locator("#prompt-used")).to_have_text(
        "Prompt used: a red fox walks through fresh snow, golden hour, 35mm film"
    )


def test_a_proxy_error_at_submit_is_not_called_a_refusal_and_old_video_urls_are_dropped(page: Page) -> None:
    """A 502 from a proxy may come after the server queued the request: "refused" would invite a second video.
    History entries of earlier versions held signed video URLs: dropped when the page loads."""
    old = [{"id": "r0", "prompt": "an old fox", "status": "done", "seed": 3, "video": "http://x/files/k/v.mp4?sig=s"}]
    page.evaluate(f"localStorage.setItem('wanserve.history', {json.dumps(json.dumps(old))})")
    page.reload()
    assert "/files/" not in page.evaluate("localStorage.getItem('wanserve.history')")
    expect(page.locator("#history li").first).to_contain_text("an old fox · done · seed 3")
    page.route("**/fal-ai/wan-22", lambda route: route.fulfill(status=502, body="bad gateway"))
    page.get_by_label("API key").fill(KEY)
    fill_request(page, 81, 1)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#status")).to_have_text(
        "No answer from the server (HTTP 502): the request may or may not be queued."
    )
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
