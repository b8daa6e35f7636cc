"""The pages for people (no model needed): the playground at / and the offline API docs; the switch that turns
the playground off; the ready message. The browser drives them in test_browser.py."""

import re
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urljoin, urlsplit

import pytest
from fastapi.testclient import TestClient

from server.eval.examples import ready_message
from server.http.app import create_app
from server.http.routes.pages import PLAYGROUND_DIR
from server.http.settings import ServerSettings

PAGES = ("/", "/docs", "/redoc", "/docs/oauth2-redirect")
#: an absolute or protocol-relative URL (a CDN's, a font service's): none in what the server returns
EXTERNAL = re.compile(r"https?://|[\"'(=]\s*//", re.I)


class _Links(HTMLParser):
    """Every ``src`` and ``href`` attribute of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]


def _links(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.links


def _client(tmp_path: Path, **settings) -> TestClient:
    """The app without its lifespan (no model loads): the pages and their assets need none."""
    return TestClient(create_app(ServerSettings(store=tmp_path / "store", watch_interval_s=0, **settings)))


def test_every_page_links_only_to_this_server_and_every_asset_is_served(tmp_path):
    client = _client(tmp_path)
    assets = set()
    for page in PAGES:
        r = client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), page
        assert not EXTERNAL.search(r.text), (page, EXTERNAL.findall(r.text))
        links = _links(r.text)
        assert page == "/docs/oauth2-redirect" or links, page
        for link in links:
            url = urlsplit(link)
            assert url.scheme == "" and url.netloc == "", (page, link)  # relative or same-origin
            assets.add(urljoin(f"http://testserver{page}", link))
    assert {"http://testserver/static/swagger-ui-bundle.js", "http://testserver/static/playground.js"} <= assets
    for asset in assets:
        r = client.get(asset)
        assert r.status_code == 200 and r.content, asset
    for name in ("playground.js", "playground.css"):
        text = (PLAYGROUND_DIR / name).read_text()
        assert not EXTERNAL.search(text), name
    assert "javascript" in client.get("/static/playground.js").headers["content-type"]


def test_the_docs_take_swagger_ui_and_redoc_from_the_pinned_package_and_switch_off_the_validator(tmp_path):
    client = _client(tmp_path)
    docs = client.get("/docs").text
    assert '"validatorUrl": null' in docs and "url: '/openapi.json'" in docs
    bundle = client.get("/static/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and "SwaggerUIBundle" in bundle.text
    redoc = client.get("/static/redoc.standalone.js")
    assert "Redoc" in redoc.text and "javascript" in redoc.headers["content-type"]
    assert "cdn.redoc.ly" not in redoc.text and "static/favicon.png" in redoc.text  # its logo: our favicon
    assert client.get("/openapi.json").json()["info"]["title"] == "vitmerge"


@pytest.mark.parametrize("path", ["/static/app.py", "/static/..%2Fapp.py", "/static/", "/static/playground.html"])
def test_static_serves_only_its_listed_files(tmp_path, path):
    r = _client(tmp_path).get(path)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text


def test_the_playground_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("VITMERGE_PLAYGROUND", "false")
    assert ServerSettings().playground is False
    monkeypatch.setenv("VITMERGE_PLAYGROUND", "true")
    assert ServerSettings().playground is True
    off = _client(tmp_path, playground=False)
    for path in ("/", "/static/playground.js", "/static/playground.css"):
        r = off.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
    assert off.get("/docs").status_code == 200 and off.get("/static/swagger-ui.css").status_code == 200
    assert not {"/", "/docs", "/redoc", "/static/{name}"} & set(off.get("/openapi.json").json()["paths"])


def test_the_playground_is_read_only():
    """It only reads (tasks, versions) and classifies: no admin route, no other method than GET and POST classify."""
    script = (PLAYGROUND_DIR / "playground.js").read_text()
    assert set(re.findall(r'api\("([^"]+)"', script)) == {"v1/tasks", "v1/models", "v1/classify"}
    assert re.findall(r'method: "([A-Z]+)"', script) == ["POST"] and "/merge" not in script
    assert script.count("fetch(") == 1  # every request goes through api()


def test_the_ready_message_points_to_the_playground():
    engine = SimpleNamespace(version="v3", method="emr_routed", tasks=["mnist", "solar"], device="cpu")
    on = ready_message(engine, "http://127.0.0.1:8000", {})  # type: ignore[arg-type]
    assert re.search(r"playground.*: http://127\.0\.0\.1:8000/$", on, re.M) and "/docs" in on
    off = ready_message(engine, "http://127.0.0.1:8000", {}, playground=False)  # type: ignore[arg-type]
    assert "playground" not in off and "/docs" in off
