"""The playground and the API docs in a real browser: Debian's headless Chromium driven by selenium against a real
`vitmerge serve` (API key on), on a machine with no network: every request the pages make stays on the server.

The server serves a copy of the session's small routed-EMR store, or of ``$VITMERGE_BROWSER_STORE`` when set (e.g. the
store `make run` made, to take README's screenshot of the demo bundle: docs/playground.png)."""

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from server_helpers import LiveServer, headless_chromium

pytestmark = pytest.mark.slow  # a live server and a browser (~30 s)

KEY = "k3y"
HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
TOP_K = 3
#: what /v1/models will answer once bundles carry their agreement figures (the page renders them when present)
AGREEMENT = [
    {
        "task": "mnist",
        "split": "test",
        "images": 50,
        "top1_given": 0.98,
        "top1_routed": 0.96,
        "kl_given": 0.0,
        "kl_routed": 0.01234,
    },
    {
        "task": "solar",
        "split": "calibration",
        "images": 20,
        "top1_given": None,
        "top1_routed": None,
        "kl_given": None,
        "kl_routed": 0.5,
    },
]


@pytest.fixture(scope="module")
def live(server_store_template, test_zoo_dir, tmp_path_factory):
    """`vitmerge serve` on a copy of the template store with an API key; its example images written."""
    store = tmp_path_factory.mktemp("browser") / "store"
    shutil.copytree(os.environ.get("VITMERGE_BROWSER_STORE") or server_store_template, store)
    shutil.rmtree(store / "examples", ignore_errors=True)  # the server writes them anew
    server = LiveServer(store, test_zoo_dir, ["--watch-interval", "0"], env={"VITMERGE_API_KEY": KEY})
    try:
        server.wait_ready()
        deadline = time.monotonic() + 60
        while len(list((store / "examples").glob("*.png"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)  # written right after the model is ready, as `make run` does
        yield server
    finally:
        server.terminate()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = headless_chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def _cards(driver, n: int, state: str):
    """The result cards once all ``n`` are in ``state`` (done / error)."""
    from selenium.webdriver.common.by import By

    def ready(d):
        cards = d.find_elements(By.CSS_SELECTOR, "#results .card")
        return cards if len(cards) == n and all(c.get_attribute("data-state") == state for c in cards) else False

    return _wait(driver, ready)


def _bars(card, kind: str) -> list[tuple[str, float]]:
    from selenium.webdriver.common.by import By

    rows = card.find_elements(By.CSS_SELECTOR, f".bars.{kind} .bar-row")
    return [(r.get_attribute("data-label"), float(r.get_attribute("data-p"))) for r in rows]


def _only_this_server(driver, origin: str) -> None:
    """Every resource the page loaded came from ``origin``; no script error in the console."""
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(u.startswith(origin + "/") or u.startswith("blob:") for u in loaded), loaded
    errors = [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE"
        and "Failed to load resource: the server responded with a status of 401" not in e["message"]
    ]
    assert not errors, errors


def _screenshot(driver, path: Path) -> Path:
    """The whole page as a PNG (the window grown to the page's height first)."""
    width = driver.get_window_size()["width"]
    height = driver.execute_script(
        "return Math.ceil(document.body.getBoundingClientRect().height) + window.outerHeight - window.innerHeight"
    )
    driver.set_window_size(width, height)  # the page's height + the window's own frame
    assert driver.save_screenshot(str(path))
    return path


def test_the_playground_shows_what_the_api_answers_for_the_demo_examples(live, browser, tmp_path):
    from selenium.webdriver.common.by import By

    examples = sorted((live.store / "examples").glob("*.png"))
    api = httpx.Client(base_url=live.url, timeout=60)
    tasks = api.get("/v1/tasks").json()
    assert {p.stem for p in examples} == {t["name"] for t in tasks["tasks"]}
    classes = {t["name"]: t["classes"] for t in tasks["tasks"]}
    version = tasks["model_version"]
    method = next(v["method"] for v in api.get("/v1/models").json()["versions"] if v["version"] == version)
    browser.get(live.url + "/")
    _wait(browser, lambda d: d.find_element(By.ID, "served").text.startswith(f"serving {version} ({method})"))
    browser.find_element(By.ID, "top-k").clear()
    browser.find_element(By.ID, "top-k").send_keys(str(TOP_K))

    # no key yet: each image shows the API's own JSON error message
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in examples))
    refused = api.post("/v1/classify", files={"image": ("x.png", examples[0].read_bytes())})
    error = refused.json()["error"]
    assert refused.status_code == 401
    for card in _cards(browser, len(examples), "error"):
        assert card.find_element(By.CSS_SELECTOR, ".error-message").text == f"401 {error['code']}: {error['message']}"

    # with the key: the task and class the page shows are /v1/classify's for the same file
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    browser.find_element(By.ID, "run").click()
    cards = _cards(browser, len(examples), "done")
    for card in cards:
        path = live.store / "examples" / card.get_attribute("data-file")
        body = api.post(
            "/v1/classify",
            files={"image": (path.name, path.read_bytes())},
            data={"top_k": str(TOP_K)},
            headers={"x-api-key": KEY},
        ).json()
        pred = body["predictions"][0]
        assert card.find_element(By.CSS_SELECTOR, ".task-name").text == pred["task"]["name"]
        assert card.find_element(By.CSS_SELECTOR, ".class-label").text == pred["class"]["label"]
        router = _bars(card, "router")
        assert [name for name, _ in router] == [t["name"] for t in tasks["tasks"]]  # a bar per task
        assert dict(router) == pytest.approx(pred["task"]["probabilities"], abs=1e-4)
        assert [label for label, _ in _bars(card, "classes")] == [c["label"] for c in pred["top_k"]]
        assert len(pred["top_k"]) == min(TOP_K, len(classes[pred["task"]["name"]]))
        assert card.find_element(By.CSS_SELECTOR, ".version").text == body["model_version"] == version
        assert card.find_element(By.CSS_SELECTOR, ".method").text == method
        legend = card.find_element(By.CSS_SELECTOR, ".legend").text
        assert all(f"{part} " in legend for part in ("decode", "queue", "inference")) and " ms" in legend
    _only_this_server(browser, live.url)
    shot = _screenshot(browser, tmp_path / "playground.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"\nscreenshot: {shot}")


def test_the_tasks_tab_lists_tasks_versions_and_agreement_figures(live, browser):
    from selenium.webdriver.common.by import By

    browser.get(live.url + "/")
    browser.find_element(By.ID, "tab-models").click()
    tasks = httpx.get(live.url + "/v1/tasks").json()["tasks"]
    rows = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#tasks-table tr[data-task]"))
    assert [r.get_attribute("data-task") for r in rows] == [t["name"] for t in tasks]
    assert f"{len(tasks[0]['classes'])}: {', '.join(tasks[0]['classes'])}" in rows[0].text
    models = httpx.get(live.url + "/v1/models").json()
    rows = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#versions-table tr[data-version]"))
    assert [r.get_attribute("data-version") for r in rows] == [v["version"] for v in models["versions"]]
    served = browser.find_element(By.CSS_SELECTOR, f'#versions-table tr[data-version="{models["serving"]}"]').text
    method = next(v["method"] for v in models["versions"] if v["version"] == models["serving"])
    assert method in served and "serving, CURRENT" in served
    first = models["versions"][0]["version"]
    # a bundle with agreement figures (the /v1/models field the bundles are getting): one row per task and split
    browser.execute_script(
        """const real = window.fetch, agreement = arguments[0];
        window.fetch = async (url, init) => {
          const response = await real(url, init);
          if (!String(url).endsWith("v1/models")) return response;
          const body = await response.json();
          body.versions[0].agreement = agreement;
          return new Response(JSON.stringify(body), {status: 200, headers: {"content-type": "application/json"}});
        };""",
        AGREEMENT,
    )
    browser.find_element(By.ID, "refresh").click()
    table = _wait(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-agreement="{first}"] table tr[data-task]')
    )
    cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in table]
    assert cells == [
        ["mnist", "test", "50", "98.0%", "96.0%", "0.0000", "0.0123"],
        ["solar", "calibration", "20", "–", "–", "–", "0.5000"],
    ]


def test_the_api_docs_render_offline(live, browser):
    from selenium.webdriver.common.by import By

    spec = httpx.get(live.url + "/openapi.json").json()
    operations = sum(1 for item in spec["paths"].values() for method in item if method in HTTP_METHODS)
    browser.get(live.url + "/docs")
    blocks = _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) == operations)
    assert blocks and "/v1/classify" in browser.find_element(By.ID, "swagger-ui").text
    _only_this_server(browser, live.url)
    browser.get(live.url + "/redoc")
    _wait(browser, lambda d: "/v1/classify" in d.find_element(By.TAG_NAME, "body").text)
    _only_this_server(browser, live.url)
