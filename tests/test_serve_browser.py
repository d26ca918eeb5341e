"""The web page in a real headless browser (Debian's chromium + chromedriver, driven by Selenium): upload a
real Fashion-MNIST image and check that the highlighted path and the probabilities shown equal the API's."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import pytest
import yaml
from PIL import Image

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FMNIST = Path(os.environ.get("HIERVISION_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)
if not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file():
    pytest.skip(f"real Fashion-MNIST not found in {FMNIST} (apt-get install dataset-fashion-mnist)",
                allow_module_level=True)
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from conftest import post_image, serving  # noqa: E402
from hiervision.cli import main  # noqa: E402
from hiervision.data.fashion_mnist import read_idx  # noqa: E402
from hiervision.serve import create_app, load_predictor  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny run trained on real Fashion-MNIST, served by uvicorn on a free 127.0.0.1 port."""
    d = tmp_path_factory.mktemp("browser")
    cfg = {"data": {"name": "fashion_mnist", "limit_train": 300, "limit_test": 50},
           "model": {"name": "flat", "backbone": "resnet20", "backbone_kwargs": {"width": 0.5}},
           "train": {"epochs": 1, "batch_size": 64, "amp": "none"}}
    (d / "fm.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(d / "fm.yaml"), "--out", str(d / "run"), "--quiet"]) == 0
    with serving(create_app(load_predictor(d / "run", top_k=3))) as port:
        yield f"http://127.0.0.1:{port}", d


@pytest.fixture
def browser():
    profile = tempfile.mkdtemp(prefix="hv-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1280,1000"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def pct(p: float) -> str:
    return f"{100 * p:.1f}%"


def test_page_shows_the_apis_answer(server, browser):
    base, d = server
    image = d / "fmnist-test-0.png"
    Image.fromarray(read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[0]).save(image)
    expected = post_image(base, image, "node_scores=true")
    n_nodes = len(json.load(urllib.request.urlopen(f"{base}/taxonomy", timeout=10))["nodes"])

    browser.get(base + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#tree g.node")) == n_nodes)
    picker = browser.find_element(By.ID, "picker")
    browser.execute_script("arguments[0].style.display = 'block';", picker)  # hidden behind the drop zone
    picker.send_keys(str(image))
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", \
        browser.find_element(By.ID, "status").text

    # the tree: exactly the API's path is highlighted, each with its probability
    highlighted = browser.find_elements(By.CSS_SELECTOR, "#tree g.node.on-path")
    ids = [int(g.get_attribute("data-id")) for g in highlighted]
    assert sorted(ids) == sorted(expected["path_ids"])
    shown = {int(g.get_attribute("data-id")): g.find_element(By.CSS_SELECTOR, "text.prob").text for g in highlighted}
    assert shown == {n: pct(p) for n, p in zip(expected["path_ids"], expected["node_probabilities"])}
    assert len(browser.find_elements(By.CSS_SELECTOR, "#tree path.edge.on-path")) == len(expected["path_ids"])
    # every other node shows its own score
    for g in browser.find_elements(By.CSS_SELECTOR, "#tree g.node:not(.on-path)"):
        n = int(g.get_attribute("data-id"))
        if n:
            assert g.find_element(By.CSS_SELECTOR, "text.prob").text == pct(expected["node_scores"][n])

    # the breadcrumb and the top-k table
    crumbs = browser.find_elements(By.CSS_SELECTOR, "#path li")
    assert [int(li.get_attribute("data-id")) for li in crumbs] == expected["path_ids"]
    assert [(li.find_element(By.CLASS_NAME, "name").text, li.find_element(By.CLASS_NAME, "prob").text)
            for li in crumbs] == [(name, pct(p)) for name, p in zip(expected["path"], expected["node_probabilities"])]
    assert browser.find_element(By.ID, "path-prob").text == "p = " + pct(expected["path_probability"])
    rows = browser.find_elements(By.CSS_SELECTOR, "#topk tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == [" › ".join(a["path"])
                                                                         for a in expected["top_k"]]
    assert [r.find_element(By.CSS_SELECTOR, ".bar b").text for r in rows] == [pct(a["probability"])
                                                                              for a in expected["top_k"]]
    if os.environ.get("HIERVISION_SCREENSHOT"):
        browser.save_screenshot(os.environ["HIERVISION_SCREENSHOT"])


def test_page_reports_a_bad_upload(server, browser, tmp_path):
    base, _ = server
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    browser.get(base + "/")
    picker = browser.find_element(By.ID, "picker")
    browser.execute_script("arguments[0].style.display = 'block';", picker)
    picker.send_keys(str(bad))
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error"
    assert "not an image" in browser.find_element(By.ID, "status").text


def upload(browser, path: Path) -> str:
    """Pick ``path`` in the page's file input; the page's final state (``done`` or ``error``)."""
    picker = browser.find_element(By.ID, "picker")
    browser.execute_script("arguments[0].style.display = 'block'; delete document.body.dataset.state;", picker)
    picker.send_keys(str(path))
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state"))
    return browser.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def fmnist_png(d: Path) -> Path:
    image = d / "fmnist-test-1.png"
    Image.fromarray(read_idx(FMNIST / "t10k-images-idx3-ubyte.gz")[1]).save(image)
    return image


def test_a_bad_upload_after_a_good_one_clears_the_previous_answer(server, browser, tmp_path):
    base, d = server
    browser.get(base + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tree g.node"))
    assert upload(browser, fmnist_png(d)) == "done"
    assert browser.find_element(By.ID, "answer").is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "#tree g.node.on-path")
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    assert upload(browser, bad) == "error"
    assert "not an image" in browser.find_element(By.ID, "status").text
    assert not browser.find_element(By.ID, "answer").is_displayed()  # no answer of the previous image beside it
    assert browser.find_elements(By.CSS_SELECTOR, "#path li, #topk tbody tr") == []
    assert browser.find_elements(By.CSS_SELECTOR, "#tree g.node.on-path, #tree path.edge.on-path") == []
    assert browser.find_elements(By.CSS_SELECTOR, "#tree g.node[data-prob]") == []  # no stale probabilities


def test_docs_render_offline_from_local_files(server, browser):
    """Swagger UI comes from the server itself (the fastapi-offline package's files): the browser has no
    network beyond 127.0.0.1, so a CDN reference would leave the page blank."""
    pytest.importorskip("fastapi_offline")
    base, _ = server
    browser.get(base + "/docs")
    title = WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"))
    assert "hiervision" in title[0].text
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {e.text.replace("\u200b", "") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/predict", "/taxonomy", "/health"} <= paths
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(base) for url in loaded), loaded


def test_page_fits_a_360_px_screen(server, browser):
    base, d = server
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 360, "height": 740, "deviceScaleFactor": 2, "mobile": True})
    browser.get(base + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tree g.node"))
    assert upload(browser, fmnist_png(d)) == "done"
    width, view = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    # too wide a page either scrolls sideways or (mobile) widens the layout viewport past the screen
    assert view == 360 and width <= view, f"page {width} px wide, layout viewport {view} px, screen 360 px"
    for card in browser.find_elements(By.CSS_SELECTOR, ".card"):  # every card inside the screen
        left, right = browser.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                             "return [r.left, r.right]", card)
        assert 0 <= left and right <= view
