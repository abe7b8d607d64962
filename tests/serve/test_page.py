"""The draw-a-digit page in a real browser: Debian's chromium, headless, driven by Playwright.

The page is drawn on with pointer events as a person would, a photo is chosen with the file
input, and the page must show the right digit each time. The screenshot is saved with the
test's files (and into docs/ with RESSERVE_UPDATE_SCREENSHOTS=1). And pages of a web app served
elsewhere (a small server of the test's on the loopback) call the HTTP API as far as
``--cors-origins`` lets them, in the same browser.
"""

import http.server
import io
import json
import math
import os
import re
import shutil
import threading
import urllib.parse
from http.client import HTTPConnection
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton_http
from PIL import Image

from helpers import ServerProcess
from resserve.serve.package import SHIPPED_PACKAGE

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS = Path(__file__).resolve().parents[2] / "docs"

if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("no chromium here (Debian: apt install chromium); .ci/run installs it", allow_module_level=True)

STROKES = {  # digit -> strokes, each a list of points in [0,1]^2 of the drawing area
    1: [[(0.5, 0.15), (0.5, 0.85)]],
    0: [[(0.5 + 0.22 * math.sin(t / 24 * 2 * math.pi), 0.5 - 0.33 * math.cos(t / 24 * 2 * math.pi)) for t in range(25)]],
    7: [[(0.3, 0.2), (0.7, 0.2), (0.45, 0.85)]],
}


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "the browser test needs Debian's chromium (apt install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[str]:
    """The shipped package, a copy of it as its version 2, and one as a second model, "digits"."""
    packages = [str(SHIPPED_PACKAGE)]
    for name, version in (("resnet-mnist", "2"), ("digits", "1")):
        copy = tmp_path_factory.mktemp("page") / name
        shutil.copytree(SHIPPED_PACKAGE, copy)
        manifest = copy / "manifest.json"
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "name": name, "version": version}))
        packages.append(str(copy))
    return packages


class AppPage(http.server.BaseHTTPRequestHandler):
    """A web app's page elsewhere (its own server, as a dev server on :5173 is), empty."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<!doctype html><title>app</title>")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def app_port():
    """The port of a web app's server: the servers here let its pages, at http://localhost:PORT, call them.
    (A real server on the loopback: Chromium lets a page call a loopback address only from one.)"""
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), AppPage) as app:
        threading.Thread(target=app.serve_forever, daemon=True).start()
        yield app.server_address[1]
        app.shutdown()


@pytest.fixture(scope="module")
def page_server(models, app_port):
    with ServerProcess("--cors-origins", f"http://localhost:{app_port}", *models) as server:
        yield server


def draw(page, strokes) -> None:
    box = page.locator("#pad").bounding_box()
    for stroke in strokes:
        x, y = stroke[0]
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=4)
        page.mouse.up()


def png_of(pixels: np.ndarray) -> bytes:
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    return png.getvalue()


def shows(page, digit: int) -> None:
    """The page settles on ``digit``: the big answer and the highlighted bar agree."""
    page.wait_for_function(
        "d => document.getElementById('digit').textContent === d"
        " && document.querySelector('#bars li.best span').textContent === d"
        " && document.getElementById('status').textContent.startsWith(d + ',')", arg=str(digit), timeout=10_000)


def test_drawing_a_digit_shows_that_digit_with_bars_and_the_model_input(browser, page_server, tmp_path):
    page = browser.new_page(viewport={"width": 900, "height": 700})
    errors = []  # script errors, and resources that failed to load (the icon, say)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.goto(page_server.url + "/")
    for digit, strokes in STROKES.items():
        page.click("#clear")
        assert page.inner_text("#digit") == "–"
        assert not page.locator("#seen").is_visible()  # no model input yet: an empty square, no broken image
        draw(page, strokes)
        shows(page, digit)
        assert page.locator("#bars li").count() == 10
        assert page.get_attribute("#seen", "src").startswith("data:image/png;base64,")
        assert page.locator("#seen").is_visible()
        assert "ms in the server" in page.inner_text("#status")
    assert "resnet-mnist" in page.inner_text("#about")
    page.screenshot(path=tmp_path / "page.png")
    if os.environ.get("RESSERVE_UPDATE_SCREENSHOTS"):
        shutil.copy(tmp_path / "page.png", DOCS / "page.png")
    assert not errors


def test_the_model_chosen_reads_the_digit_again(browser, page_server):
    page = browser.new_page()
    page.goto(page_server.url + "/")
    page.wait_for_selector("#model-box", state="visible")  # several models served: a choice
    assert page.locator("#model option").all_inner_texts() == [
        "resnet-mnist (latest: v2)", "resnet-mnist v2", "resnet-mnist v1", "digits v1"]
    draw(page, STROKES[7])
    shows(page, 7)
    assert page.inner_text("#about").startswith("resnet-mnist v2")  # the server's default, first
    for chosen in ("resnet-mnist v1", "digits v1"):  # the same drawing, sent again to the model chosen
        page.select_option("#model", label=chosen)
        page.wait_for_function("c => document.getElementById('about').textContent.startsWith(c)", arg=chosen)
        shows(page, 7)


def test_a_model_unloaded_or_loaded_since_the_page_opened_is_taken_off_or_put_on_its_list(browser, page_server):
    """"digits" chosen, then unloaded: the next drawing is read by the server's default and the list
    loses it; loaded again, it is back on the list once the tab is shown again."""
    client = triton_http.InferenceServerClient(page_server.http_target)
    page = browser.new_page()
    page.goto(page_server.url + "/")
    page.wait_for_selector("#model-box", state="visible")
    page.select_option("#model", label="digits v1")
    draw(page, STROKES[1])
    shows(page, 1)
    assert page.inner_text("#about").startswith("digits v1")
    client.unload_model("digits")
    try:
        page.click("#clear")
        draw(page, STROKES[7])
        page.wait_for_function("() => document.getElementById('about').textContent.startsWith('resnet-mnist v2')")
        shows(page, 7)
        assert page.locator("#model option").all_inner_texts() == [
            "resnet-mnist (latest: v2)", "resnet-mnist v2", "resnet-mnist v1"]
        assert page.locator("#model option:checked").inner_text() == "resnet-mnist (latest: v2)"
    finally:
        client.load_model("digits")
    page.evaluate("document.dispatchEvent(new Event('visibilitychange'))")  # the tab shown again
    page.wait_for_function("() => document.querySelectorAll('#model option').length === 4")
    assert page.locator("#model option").all_inner_texts()[-1] == "digits v1"
    assert page.locator("#model option:checked").inner_text() == "resnet-mnist (latest: v2)"  # kept


def test_choosing_a_photo_of_a_digit_classifies_it(browser, page_server, mnist, tmp_path):
    photo = tmp_path / "photo.jpg"  # dark ink on a light background, larger than MNIST, as a photo is
    Image.fromarray(255 - mnist.test.images[1]).resize((224, 224), Image.BICUBIC).save(photo, quality=90)
    page = browser.new_page()
    page.goto(page_server.url + "/")
    page.set_input_files("#file", str(photo))
    shows(page, int(mnist.test.labels[1]))


def test_an_image_pasted_on_the_page_is_classified_and_text_is_not_taken_for_one(browser, page_server, mnist):
    page = browser.new_page()
    page.goto(page_server.url + "/")
    paste = """([bytes, type]) => {
        const data = new DataTransfer();
        data.items.add(new File([new Uint8Array(bytes)], "pasted", { type }));
        return document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, cancelable: true }));
    }"""
    assert page.evaluate(paste, [list(b"7"), "text/plain"])  # not an image: left to the page as it is
    assert page.inner_text("#status") == "Draw something to start."
    assert not page.evaluate(paste, [list(png_of(mnist.test.images[2])), "image/png"])  # taken: not pasted elsewhere
    shows(page, int(mnist.test.labels[2]))


def sent_for(browser, server, picture: Path, digit: int) -> bytes:
    """What a fresh page sends ``server`` for ``picture``, chosen with its file input, once it shows
    ``digit`` (a Playwright route sees each request's body as it goes)."""
    page, sent = browser.new_page(), []

    def on_the_way(route):
        sent.append(route.request.post_data_buffer)
        route.continue_()

    page.route(re.compile(r"/v1/classify(\?|$)"), on_the_way)
    page.goto(server.url + "/")
    page.set_input_files("#file", str(picture))
    shows(page, digit)
    (body,) = sent
    return body


def test_a_phone_sized_photo_is_sent_scaled_down_within_the_servers_limit_as_jpeg(browser, page_server, mnist,
                                                                                  tmp_path):
    photo = tmp_path / "phone.png"  # 3000x3000 with sensor noise: over the server's 4 MiB message limit
    ink = np.asarray(Image.fromarray(mnist.test.images[1]).resize((3000, 3000), Image.BICUBIC), dtype=np.float32)
    paper = 215 + np.random.default_rng(0).normal(0, 6, ink.shape)
    Image.fromarray(np.clip(paper - ink * 0.8, 0, 255).astype(np.uint8)).save(photo)
    assert photo.stat().st_size > 4 * 2**20
    body = sent_for(browser, page_server, photo, int(mnist.test.labels[1]))
    assert body[:3] == b"\xff\xd8\xff" and len(body) < 2**19  # JPEG: it was a PNG, of 1.2 MB
    assert Image.open(io.BytesIO(body)).size == (1024, 1024)


def test_a_large_drawing_with_transparency_is_sent_scaled_down_as_png(browser, page_server, mnist, tmp_path):
    drawing = tmp_path / "drawing.png"  # dark noisy ink on nothing: JPEG would have made the nothing black
    ink = np.asarray(Image.fromarray(mnist.test.images[4]).resize((2000, 2000), Image.BICUBIC)) > 80
    noise = np.random.default_rng(0).integers(0, 60, (2000, 2000, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([noise, np.where(ink, 255, 0).astype(np.uint8)]), mode="RGBA").save(drawing)
    assert drawing.stat().st_size > 2**20
    body = sent_for(browser, page_server, drawing, int(mnist.test.labels[4]))
    assert body[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(body)).mode == "RGBA"


def test_a_file_that_is_not_an_image_gets_the_servers_reason(browser, page_server, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a digit")
    page = browser.new_page()
    page.goto(page_server.url + "/")
    page.set_input_files("#file", str(text))
    page.wait_for_function("document.getElementById('status').classList.contains('error')")
    assert "bytes are not an image" in page.inner_text("#status")


def test_an_html_answer_from_a_proxy_in_front_is_named_by_its_status(browser, page_server, mnist, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(mnist.test.images[0]).save(photo)
    page = browser.new_page()
    # as an ingress with a small body limit answers: HTML, not the server's JSON
    page.route(re.compile(r"/v1/classify(\?|$)"), lambda route: route.fulfill(
        status=413, content_type="text/html", body="<html><body>413 Request Entity Too Large</body></html>"))
    page.goto(page_server.url + "/")
    page.set_input_files("#file", str(photo))
    page.wait_for_function("document.getElementById('status').classList.contains('error')")
    assert page.inner_text("#status").startswith("The server could not classify photo.png: HTTP 413")


def test_the_page_works_under_the_path_prefix_of_an_ingress_or_kubectl_proxy(browser, page_server):
    """An ingress that routes /digits/ to the server (taking the prefix off), as `kubectl proxy`
    gives a service's port a path of its own: the page asked for its script and style, and sent
    its drawings, to the host's root, where nothing answers."""
    page, outside = browser.new_page(), []

    def ingress(route) -> None:
        url = urllib.parse.urlsplit(route.request.url)
        if not url.path.startswith("/digits/"):
            outside.append(url.path)
            route.fulfill(status=404, content_type="text/html", body="<html><body>404 Not Found</body></html>")
            return
        route.fulfill(response=route.fetch(url=url._replace(path=url.path.removeprefix("/digits")).geturl()))

    page.route(f"{page_server.url}/**", ingress)
    page.goto(page_server.url + "/digits/")
    page.wait_for_selector("#model-box", state="visible")  # the models served, listed through the prefix
    draw(page, STROKES[7])
    shows(page, 7)
    assert outside == []


def test_a_server_that_wants_a_token_asks_for_one_and_then_answers(browser, tmp_path, models, app_port):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    app_origin = f"http://localhost:{app_port}"
    with ServerProcess("--token-file", str(tokens), "--cors-origins", app_origin, *models) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        draw(page, STROKES[7])
        page.wait_for_selector("#token-box", state="visible")
        assert "needs a bearer token" in page.inner_text("#status")
        page.keyboard.type("wrong")  # the token field has the focus
        page.keyboard.press("Enter")
        page.wait_for_function("document.getElementById('status').textContent.includes('refused this token')")
        # a token no request can carry was saved, the box hidden, and every drawing then failed in
        # fetch ("No answer from the server") with no box left to enter another: now it is not taken
        page.fill("#token", "caf\u00e9")
        page.keyboard.press("Enter")
        assert page.locator("#token-box").is_visible()
        assert page.evaluate("document.getElementById('token').validity.patternMismatch")
        assert page.evaluate("sessionStorage.getItem('resserve-token')") == "wrong"
        page.fill("#token", "s3cret")
        page.keyboard.press("Enter")
        shows(page, 7)  # the drawing is sent again with the token: no need to draw it again
        assert page.locator("#token-box").is_hidden()
        page.wait_for_selector("#model-box", state="visible")  # the models, listed once the token is given

        # a web app of an allowed origin sends the token too: the browser's preflight before it carries none
        infer = f"{server.url}/v2/models/resnet-mnist/infer"
        for token, status in (("s3cret", 200), ("wrong", 401)):
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
            assert fetched_from(browser, app_origin, infer, headers, BINARY_INFER)[0] == status


def fetched_from(browser, origin: str, url: str, headers: dict[str, str], body: bytes) -> list:
    """What a page of ``origin`` reads of a POST to ``url`` with fetch(): [status, its binary answer's
    Inference-Header-Content-Length, bytes], or [the error] where the browser keeps the answer from it."""
    page = browser.new_page()
    page.goto(f"{origin}/")
    return page.evaluate("""async ([url, headers, body]) => {
        try {
            const answer = await fetch(url, {method: "POST", headers, body: new Uint8Array(body)});
            return [answer.status, answer.headers.get("Inference-Header-Content-Length"),
                    (await answer.arrayBuffer()).byteLength];
        } catch (error) {
            return [String(error)];
        }
    }""", [url, headers, list(body)])


BINARY_INFER = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32",
                                       "data": [0.0] * 784}],
                           "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()


def test_a_web_app_of_an_allowed_origin_calls_the_api_and_others_cannot_read_it(browser, page_server, app_port,
                                                                                 mnist):
    infer, photo = f"{page_server.url}/v2/models/resnet-mnist/infer", png_of(mnist.test.images[0])
    allowed, other = f"http://localhost:{app_port}", f"http://127.0.0.1:{app_port}"
    assert f"; web pages of {allowed} may call it (CORS)" in "".join(page_server.lines)  # the server says so
    status, json_length, size = fetched_from(browser, allowed, infer, {"Content-Type": "application/json"},
                                             BINARY_INFER)
    assert status == 200 and size == int(json_length) + 10 * 4  # the binary probabilities' length, exposed
    assert fetched_from(browser, allowed, page_server.url + "/v1/classify", {"Content-Type": "image/png"},
                        photo)[0] == 200  # a type that is not a form's: the browser asked first (a preflight)
    assert fetched_from(browser, other, page_server.url + "/v1/classify",
                        {"Content-Type": "image/png"}, photo) == ["TypeError: Failed to fetch"]
    # what the browser saw: the answers name the origin they allow, which caches must keep apart, and a
    # preflight refused says why
    connection = HTTPConnection("127.0.0.1", page_server.http_port, timeout=10)
    connection.request("GET", "/v2/models/resnet-mnist", headers={"Origin": allowed})
    answer = connection.getresponse()
    assert (answer.status, answer.headers["Access-Control-Allow-Origin"], answer.headers["Vary"]) == (
        200, allowed, "Origin") and answer.read()
    connection.request("OPTIONS", "/v1/classify", headers={"Origin": other, "Access-Control-Request-Method": "POST"})
    answer = connection.getresponse()
    assert (answer.status, json.loads(answer.read())) == (
        403, {"error": f"CORS preflight request failed: origin '{other}' is not allowed"})


def test_a_page_elsewhere_cannot_have_a_browser_change_the_servers_settings(browser, page_server, app_port):
    """A POST with a text body is sent cross-origin without a preflight (only its answer is kept from
    the page): a site a developer visits could so have their browser change a local server."""
    connection = HTTPConnection("127.0.0.1", page_server.http_port, timeout=10)

    def verbose_level_after_a_post_from(origin: str) -> int:
        page = browser.new_page()
        page.goto(f"{origin}/")
        page.evaluate("""url => fetch(url, {method: "POST", mode: "no-cors", body: '{"log_verbose_level": 1}'})""",
                      page_server.url + "/v2/logging")
        connection.request("GET", "/v2/logging")
        return json.loads(connection.getresponse().read())["log_verbose_level"]

    assert verbose_level_after_a_post_from(f"http://127.0.0.1:{app_port}") == 0  # not allowed: was 1, it acted
    assert verbose_level_after_a_post_from(f"http://localhost:{app_port}") == 1  # --cors-origins allows this one
    connection.request("POST", "/v2/logging", body=b'{"log_verbose_level": 0}')  # as it was, for the other tests
    assert json.loads(connection.getresponse().read())["log_verbose_level"] == 0


def test_the_page_works_from_the_keyboard_and_fits_a_phone(browser, page_server):
    page = browser.new_page(viewport={"width": 390, "height": 844}, has_touch=True)
    page.goto(page_server.url + "/")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
    focused = []
    for _ in range(4):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id"))
    assert focused[:3] == ["pad", "clear", "file"]  # drawing area, Clear, choose a photo
    draw(page, STROKES[1])
    shows(page, 1)
    page.focus("#pad")
    page.keyboard.press("Escape")  # clears, as the Clear button does
    assert page.inner_text("#digit") == "–"
