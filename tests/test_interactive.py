"""Tests of ``interactive_modify``: a real headless Chromium drives the page end to end.

The browser tests need Chromium, its driver (Debian's ``chromium`` and ``chromium-driver``, installed
by ``scripts/system-deps.sh``) and the ``selenium`` package; they are skipped, saying which is
missing, elsewhere. The other tests talk to the server over plain HTTP.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from opendelta_dist.addressing import select_modules
from opendelta_dist.basemodel import DeltaBase
from opendelta_dist.deltas.lora import LoraModel
from opendelta_dist.errors import DeltaConfigError, InteractiveTimeoutError, UnsupportedModuleError
from opendelta_dist.interactive import TIMEOUT_ENV, exact_keys
from tests.models import build

LAYER = "bert.encoder.layer"


class Background:
    """A delta constructor running in a thread (it blocks until the page's submit)."""

    def __init__(self, make: Callable[[], DeltaBase], capsys: pytest.CaptureFixture[str]) -> None:
        self.result: DeltaBase | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(make,), daemon=True)
        self.thread.start()
        self.url = self._printed_url(capsys)
        self.port = int(self.url.rsplit(":", 1)[1].rstrip("/"))

    def _run(self, make: Callable[[], DeltaBase]) -> None:
        try:
            self.result = make()
        except BaseException as exc:
            self.error = exc

    def _printed_url(self, capsys: pytest.CaptureFixture[str]) -> str:
        out = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out += capsys.readouterr().out
            found = re.search(r"open (http://127\.0\.0\.1:\d+/) in a browser", out)
            if found:
                return found.group(1)
            if not self.thread.is_alive():
                raise AssertionError(f"the constructor returned without serving a page: {self.error!r}")
            time.sleep(0.02)
        raise AssertionError(f"no address printed within 30 s; printed: {out!r}")

    def join(self) -> DeltaBase:
        self.thread.join(30)
        assert not self.thread.is_alive(), "the constructor still waits after the submit"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url + "submit", data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def assert_port_closed(port: int) -> None:
    """Nothing listens on the port any more, and a new server can listen there."""
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


def modified(delta: DeltaBase) -> list[str]:
    return [op.module_name for op in delta._operations]


# ---------------------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip("needs Chromium and chromedriver on PATH (Debian packages chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e .[dev])")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    # tall enough that no row hides behind the fixed footer
    options.add_argument("--window-size=1280,3000")
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def node(driver: Any, path: str) -> Any:
    """The clickable name of the tree node drawn at ``path`` (labels joined by dots)."""
    return driver.find_element("css selector", f'.row[data-path="{path}"] .name')


def message(driver: Any) -> str:
    return driver.find_element("id", "message").text


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_modules_chosen_in_a_real_browser_build_the_delta(
    browser: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    job = Background(lambda: LoraModel(build("bert"), interactive_modify=True), capsys)
    browser.get(job.url)
    assert "LoraModel" in browser.find_element("tag name", "h1").text
    assert node(browser, f"{LAYER}.0-1").text == "0-1"  # the two identical layers are one node

    # an empty submit is refused by the page, and Python keeps waiting
    browser.find_element("id", "submit").click()
    wait_for(lambda: "Nothing is selected" in message(browser), "the empty-submit message")
    assert job.thread.is_alive()

    # a module under the folded run: selected in every layer
    node(browser, f"{LAYER}.0-1.intermediate.dense").click()
    assert node(browser, f"{LAYER}.0-1.intermediate.dense").get_attribute("aria-checked") == "true"
    # expand the run, then select query and value of layer 1 only
    browser.find_element("css selector", f'.row[data-path="{LAYER}.0-1"] button.split').click()
    for layer in ("0", "1"):
        assert node(browser, f"{LAYER}.{layer}.intermediate.dense").get_attribute("aria-checked") == "true"
    node(browser, f"{LAYER}.1.attention.self.query").click()
    node(browser, f"{LAYER}.1.attention.self.value").click()
    assert node(browser, f"{LAYER}.0.attention.self.query").get_attribute("aria-checked") == "false"
    # folded again, the run's query is selected in some of its layers
    browser.find_element("css selector", f'.row[data-path="{LAYER}.0-1"] button.split').click()
    assert node(browser, f"{LAYER}.0-1.attention.self.query").get_attribute("aria-checked") == "mixed"

    browser.find_element("id", "submit").click()
    wait_for(lambda: message(browser).startswith("Done: 4 modules"), "the page to say it is done")
    delta = job.join()

    chosen = [
        f"{LAYER}.0.intermediate.dense",
        f"{LAYER}.1.attention.self.query",
        f"{LAYER}.1.attention.self.value",
        f"{LAYER}.1.intermediate.dense",
    ]
    assert modified(delta) == chosen
    assert delta.config.modified_modules == chosen
    assert_port_closed(job.port)

    # the saved config holds the names: loading needs no page
    delta.save_finetuned(tmp_path)
    loaded = LoraModel.from_finetuned(tmp_path, build("bert"))
    assert modified(loaded) == chosen
    assert "interactive_modify" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------ plain HTTP


def test_the_server_checks_a_submit_and_the_method_checks_the_modules(capsys: pytest.CaptureFixture[str]) -> None:
    job = Background(lambda: LoraModel(build("bert"), interactive_modify=True), capsys)
    with urllib.request.urlopen(job.url, timeout=10) as response:
        assert "<title>LoraModel: choose the modules to modify</title>" in response.read().decode()
    # bound to 127.0.0.1 only: another loopback address of this machine reaches nothing
    with pytest.raises(OSError), socket.create_connection(("127.0.0.2", job.port), timeout=2):
        pass

    status, body = post(job.url, {"names": []})
    assert status == 400 and body["error"].startswith("nothing is selected")
    status, body = post(job.url, {"names": ["bert.encoder.layer.7.output"]})
    assert status == 400 and "no modules named ['bert.encoder.layer.7.output']" in body["error"]
    assert post(job.url, b"names=x", {"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    assert post(job.url, {"names": ["bert.pooler.dense"]}, {"Origin": "http://evil.example"})[0] == 403
    assert post(job.url, {"names": ["bert.pooler.dense"]}, {"Host": "evil.example"})[0] == 403
    assert job.thread.is_alive()

    # an attention block is no linear layer: LoRA's own error, as with modified_modules
    assert post(job.url, {"names": [f"{LAYER}.0.attention"]}) == (200, {"count": 1})
    with pytest.raises(UnsupportedModuleError, match="LoRA modifies linear layers"):
        job.join()
    assert_port_closed(job.port)


def test_a_timeout_gives_a_clear_error_and_closes_the_server(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TIMEOUT_ENV, "0.5")
    job = Background(lambda: LoraModel(build("bert"), interactive_modify=True), capsys)
    with pytest.raises(InteractiveTimeoutError, match=rf"within 0\.5 s.*{TIMEOUT_ENV}"):
        job.join()
    assert_port_closed(job.port)
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(DeltaConfigError, match=f"{TIMEOUT_ENV}='soon' is not a positive number"):
        LoraModel(build("bert"), interactive_modify=True)


def test_a_busy_port_gives_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DeltaConfigError, match=rf"port {port} on 127\.0\.0\.1 is in use.*interactive_modify=True"):
            LoraModel(build("bert"), interactive_modify=port)


@pytest.mark.parametrize("value", ["8888", 70000, -1])
def test_interactive_modify_must_be_true_or_a_port(value: Any) -> None:
    with pytest.raises(DeltaConfigError, match="interactive_modify"):
        LoraModel(build("bert"), interactive_modify=value)


def test_interactive_modify_with_modified_modules_is_refused() -> None:
    with pytest.raises(DeltaConfigError, match="without modified_modules"):
        LoraModel(build("bert"), modified_modules=["query"], interactive_modify=True)


def test_exact_keys_select_only_the_named_modules() -> None:
    inner = nn.Sequential(nn.Linear(2, 2))
    model = nn.Sequential(nn.Linear(2, 2), inner)  # "0" is also the tail of "1.0"
    keys = exact_keys(model, ["0", "1.0", "1"])
    assert keys == ["[r]^0", "1.0", "1"]
    assert select_modules(model, keys[:1]) == ["0"]
    assert [select_modules(model, [k]) for k in keys] == [["0"], ["1.0"], ["1"]]
    bert = build("bert")
    assert exact_keys(bert, [f"{LAYER}.0.attention.self.query"]) == [f"{LAYER}.0.attention.self.query"]
