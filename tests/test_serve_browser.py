"""The web page in a real headless browser (Debian's chromium + chromedriver, driven by Selenium): upload a
real Fashion-MNIST image and check that the highlighted path and the probabilities shown equal the API's."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
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


def test_small_tree_nodes_close_and_open_on_a_click(server, browser):
    base, _ = server
    tax = json.load(urllib.request.urlopen(f"{base}/taxonomy", timeout=10))
    inner = next(n["id"] for n in tax["nodes"] if n["parent"] == 0)
    kids = {n["id"] for n in tax["nodes"] if n["parent"] == inner}
    under = f"#tree g.node[data-parent='{inner}']"
    browser.get(base + "/")
    WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#tree g.node")) ==
                                     len(tax["nodes"]))
    assert {int(g.get_attribute("data-id")) for g in browser.find_elements(By.CSS_SELECTOR, under)} == kids
    click(browser, f"#tree g.node[data-id='{inner}']", lambda b: not b.find_elements(By.CSS_SELECTOR, under))
    assert browser.find_element(By.ID, "tree-note").is_displayed()  # some classes are hidden now
    click(browser, f"#tree g.node[data-id='{inner}']",
          lambda b: {int(g.get_attribute("data-id")) for g in b.find_elements(By.CSS_SELECTOR, under)} == kids)
    assert not browser.find_element(By.ID, "tree-note").is_displayed()


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


def test_the_page_has_its_own_icon(server):
    base, _ = server
    page = urllib.request.urlopen(base + "/", timeout=10).read().decode()
    assert '<link rel="icon" href="/static/favicon.svg"' in page
    icon = urllib.request.urlopen(base + "/static/favicon.svg", timeout=10)
    assert icon.status == 200 and icon.read().startswith(b"<svg")


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
    fits_360_px(browser, base, fmnist_png(d))


def fits_360_px(browser, base: str, image: Path) -> None:
    """The page with an answer on a 360 px phone: nothing wider than the screen (a wide tree scrolls in its card)."""
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 360, "height": 740, "deviceScaleFactor": 2, "mobile": True})
    browser.get(base + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tree g.node"))
    assert upload(browser, image) == "done"
    width, view = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    # too wide a page either scrolls sideways or (mobile) widens the layout viewport past the screen
    assert view == 360 and width <= view, f"page {width} px wide, layout viewport {view} px, screen 360 px"
    for card in browser.find_elements(By.CSS_SELECTOR, ".card"):  # every card inside the screen
        left, right = browser.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                             "return [r.left, r.right]", card)
        assert 0 <= left and right <= view
    in_view(browser, predicted_leaf(browser))  # the answer in view, though the tree is wider than the screen
    wrap = browser.find_element(By.ID, "tree-wrap")
    if browser.execute_script("return arguments[0].scrollLeft", wrap) > 0:  # scrolled: a cue says so
        assert "more-left" in wrap.get_attribute("class")


def predicted_leaf(browser):
    """The tree's box of the predicted path's last node."""
    last = browser.find_elements(By.CSS_SELECTOR, "#path li")[-1].get_attribute("data-id")
    return browser.find_element(By.CSS_SELECTOR, f"#tree g.node[data-id='{last}']")


def in_view(browser, element) -> None:
    """``element``'s box lies inside the browser's viewport (no scrolling needed to see it)."""
    left, top, right, bottom, width, height = browser.execute_script(
        "const r = arguments[0].getBoundingClientRect(); "
        "return [r.left, r.top, r.right, r.bottom, window.innerWidth, window.innerHeight]", element)
    assert 0 <= left and right <= width and 0 <= top and bottom <= height, \
        f"box at x {left:.0f}..{right:.0f}, y {top:.0f}..{bottom:.0f}; viewport {width} x {height}"


# ----------------------------------------------------------------------------- answer options
def post_fields(base: str, image: Path, **fields: str) -> dict:
    """``POST base/predict?node_scores=true`` with one image and the form ``fields``: its record."""
    boundary = "hvpage"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
             for k, v in fields.items()]
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{image.name}\"\r\n"
                 "Content-Type: image/png\r\n\r\n".encode() + image.read_bytes() + b"\r\n")
    req = urllib.request.Request(f"{base}/predict?node_scores=true", method="POST",
                                 data=b"".join(parts) + f"--{boundary}--\r\n".encode(),
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return json.load(urllib.request.urlopen(req, timeout=30))["results"][0]


def ids(browser, selector: str) -> list[int]:
    return [int(e.get_attribute("data-id")) for e in browser.find_elements(By.CSS_SELECTOR, selector)]


def test_page_sends_thresholds_and_filter_and_shows_where_the_answer_stopped(server, browser):
    base, d = server
    image = fmnist_png(d)
    tax = json.load(urllib.request.urlopen(f"{base}/taxonomy", timeout=10))
    goods = next(n["id"] for n in tax["nodes"] if n["name"] == "Goods")
    expected = post_fields(base, image, min_prob="0.99", within="Goods")
    roll = expected["rollup"]

    browser.get(base + "/")
    WebDriverWait(browser, 30).until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#tree g.node")) ==
                                     len(tax["nodes"]))
    # the header counts end classes and nodes apart; the filter suggests the tree's node names
    assert browser.find_element(By.ID, "model").text.startswith("10 classes · 18 nodes · depth 3")
    names = {o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#node-names option")}
    assert {"Goods", "Shoes", "Ankle boot"} <= names
    browser.find_element(By.ID, "min-prob").send_keys("0.99")
    browser.find_element(By.ID, "within").send_keys("Goods")
    assert upload(browser, image) == "done", browser.find_element(By.ID, "status").text

    # the answer lies inside the filtered subtree, and the page says it was restricted
    path = [int(li.get_attribute("data-id")) for li in browser.find_elements(By.CSS_SELECTOR, "#path li")]
    assert path == expected["path_ids"] and path[0] == goods
    on_path = {int(g.get_attribute("data-id")) for g in browser.find_elements(By.CSS_SELECTOR, "#tree g.node.on-path")}
    assert on_path == set(path)
    assert "within Goods (4 classes)" in browser.find_element(By.ID, "allowed").text
    # the roll-up: the sentence, each node against its threshold, the stop marked in the list and the tree
    why = browser.find_element(By.ID, "why").text
    assert why == roll["why"] and why.startswith(("stopped at ", "reached "))
    steps = browser.find_elements(By.CSS_SELECTOR, "#trace li")
    assert [li.find_element(By.CLASS_NAME, "name").text for li in steps] == expected["path"]
    assert [li.find_element(By.CLASS_NAME, "prob").text for li in steps] == [pct(s["probability"])
                                                                             for s in roll["trace"]]
    assert [li.find_element(By.CLASS_NAME, "cmp").text for li in steps] == \
        [("≥ " if s["met"] else "< ") + pct(s["threshold"]) for s in roll["trace"]]
    stop = roll["path_ids"][-1]  # Goods has all the mass once restricted to it: the answer is at least Goods
    short = [path[roll["depth"]]] if roll["stopped"] else []
    assert ids(browser, "#trace li.answer-node") == ids(browser, "#tree g.node.answer-node") == [stop]
    assert ids(browser, "#trace li.fell-short") == ids(browser, "#tree g.node.fell-short") == short
    assert browser.find_element(By.ID, "rollup-node").text.startswith(roll["node"])
    if os.environ.get("HIERVISION_SCREENSHOT"):
        browser.save_screenshot(os.environ["HIERVISION_SCREENSHOT"].replace(".png", "-rollup.png"))


@pytest.mark.parametrize("field,value,words", [
    ("min-prob", "1.5", "min_prob: a probability threshold must lie in [0, 1], got '1.5'"),
    ("min-prob-at", "9=0.5", "min_prob_at: level 9 does not exist; this tree's levels are 1..3"),
    ("within", "Nope", "within: not in the tree: 'Nope'"),
])
def test_page_shows_the_servers_one_line_for_a_bad_option(server, browser, field, value, words):
    base, d = server
    browser.get(base + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tree g.node"))
    browser.find_element(By.ID, field).send_keys(value)
    assert upload(browser, fmnist_png(d)) == "error"
    assert browser.find_element(By.ID, "status").text == words
    assert not browser.find_element(By.ID, "answer").is_displayed()


# ----------------------------------------------------------------------------- a big tree, read lazily
BIG = 50_000  # nodes
PAGE = 30  # children per "+ N more" page (app.js)


def wide_random_tree(num_nodes: int, root_children: int = 40, seed: int = 0):
    """A random tree (as benchmarks/scale.py draws them: every inner node 2–12 children, leaves at many
    depths) whose root has ``root_children`` children, more than one page of the page's."""
    import numpy as np

    from hiervision import Taxonomy

    rng = np.random.default_rng(seed)
    parents, open_nodes = [-1] + [0] * root_children, list(range(1, root_children + 1))
    while len(parents) < num_nodes:
        v = open_nodes.pop(int(rng.integers(len(open_nodes))))
        k = int(rng.integers(2, 13))
        open_nodes.extend(range(len(parents), len(parents) + k))
        parents.extend([v] * k)
    return Taxonomy(["root"] + [f"c{i}" for i in range(1, len(parents))], parents)


@pytest.fixture(scope="module")
def big_server():
    """A flat head on a tiny backbone over a random tree of ~50,000 nodes (untrained: only the page is tested)."""
    import torch

    from hiervision.export import sidecar, torch_engine
    from hiervision.models import create_model
    from hiervision.runtime import Predictor
    from hiervision.serve.predictor import RuntimePredictor

    torch.manual_seed(0)
    tax = wide_random_tree(BIG)
    model = create_model("flat", tax, backbone="resnet20", backbone_kwargs={"width": 0.25}, in_chans=1,
                         image_size=16).eval()
    runtime = Predictor("big", sidecar=sidecar(model, {"in_chans": 1, "image_size": 16}), engine=torch_engine(model))
    predictor = RuntimePredictor(runtime)
    with serving(create_app(predictor, name="random tree")) as port:
        yield f"http://127.0.0.1:{port}", predictor.tree


def drawn(browser, selector: str = "#tree g.node") -> dict[int, tuple[int, str]]:
    """id → (parent, probability shown or '') of every node drawn."""
    return {int(g.get_attribute("data-id")): (int(g.get_attribute("data-parent")),
                                              "".join(t.text for t in g.find_elements(By.CSS_SELECTOR, "text.prob")))
            for g in browser.find_elements(By.CSS_SELECTOR, selector)}


def click(browser, selector: str, until) -> None:
    """Click the tree element ``selector`` and wait for ``until(browser)`` (the tree is redrawn after each)."""
    browser.find_element(By.CSS_SELECTOR, selector).click()
    WebDriverWait(browser, 30).until(until)


@pytest.fixture
def noise_png(tmp_path) -> Path:
    image = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)).save(image)
    return image


@pytest.mark.slow
def test_big_tree_page_shows_the_answer_and_expands_without_fetching_the_tree(big_server, browser, noise_png):
    base, tree = big_server
    browser.get(base + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tree g.more"))
    root_kids = list(tree.children[0])
    assert set(drawn(browser)) == {0, *root_kids[:PAGE]}  # the top level, one page of it
    assert browser.find_element(By.CSS_SELECTOR, "#tree g.more").text == f"+ {len(root_kids) - PAGE} more"

    expected = post_image(base, noise_png, "siblings=6")
    assert upload(browser, noise_png) == "done", browser.find_element(By.ID, "status").text
    in_view(browser, predicted_leaf(browser))
    # "+ N more" under the root says how much probability the children not drawn hold together
    rest = 1 - sum(s["probability"] for s in expected["siblings"][0]["nodes"])
    assert browser.find_element(By.CSS_SELECTOR, "#tree g.more[data-parent='0']").text.endswith(
        f"{pct(max(rest, 0))} together")
    nodes = drawn(browser)
    assert len(nodes) < 300  # the neighbourhood of the answer, not 50,000 nodes
    # the predicted path, highlighted, with its probabilities; the breadcrumb
    on_path = [int(g.get_attribute("data-id")) for g in browser.find_elements(By.CSS_SELECTOR, "#tree g.node.on-path")]
    assert sorted(on_path) == sorted(expected["path_ids"])
    assert [nodes[n][1] for n in expected["path_ids"]] == [pct(p) for p in expected["node_probabilities"]]
    assert [int(li.get_attribute("data-id")) for li in browser.find_elements(By.CSS_SELECTOR, "#path li")] == \
        expected["path_ids"]
    # the most probable siblings at each level, under their parent, with their probabilities
    for level in expected["siblings"]:
        for s in level["nodes"]:
            assert nodes[s["id"]] == (level["parent"], pct(s["probability"]))
        assert len(level["nodes"]) == min(6, level["num_children"])
    # the top-k alternatives: in the table, and their paths drawn in the tree
    rows = browser.find_elements(By.CSS_SELECTOR, "#topk tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == [" › ".join(a["path"])
                                                                         for a in expected["top_k"]]
    for alt in expected["top_k"]:
        assert [nodes[n][0] for n in alt["path_ids"]] == [0, *alt["path_ids"][:-1]]

    # a closed node opens on a click (its first page of children, from the server) and closes again
    closed = next(s["id"] for level in expected["siblings"] for s in level["nodes"]
                  if s["num_children"] and s["id"] not in expected["path_ids"]
                  and not any(s["id"] in a["path_ids"] for a in expected["top_k"]))
    kids = f"#tree g.node[data-parent='{closed}']"
    assert not browser.find_elements(By.CSS_SELECTOR, kids)
    click(browser, f"#tree g.node[data-id='{closed}']", lambda b: b.find_elements(By.CSS_SELECTOR, kids))
    assert [int(g.get_attribute("data-id")) for g in browser.find_elements(By.CSS_SELECTOR, kids)] == \
        list(tree.children[closed][:PAGE])
    in_view(browser, browser.find_elements(By.CSS_SELECTOR, kids)[-1])  # what a click opened comes into view
    # every drawn node says its probability: the answer carries each node's at or above 0.1 %, the rest say "< 0.1%"
    above = post_image(base, noise_png, "siblings=6&scores_above=0.001")["scores_above"]
    known = {**{str(s["id"]): s["probability"] for level in expected["siblings"] for s in level["nodes"]}, **above}
    for n, (_, shown) in drawn(browser).items():
        if n:
            assert shown == (pct(known[str(n)]) if str(n) in known else "< 0.1%"), (n, shown)
    click(browser, f"#tree g.node[data-id='{closed}']", lambda b: not b.find_elements(By.CSS_SELECTOR, kids))
    # a path node closes and opens again (its siblings kept); "+ N more" lists more of the root's children
    first = expected["path_ids"][0]
    under = f"#tree g.node[data-parent='{first}']"
    before = len(browser.find_elements(By.CSS_SELECTOR, under))
    click(browser, f"#tree g.node[data-id='{first}']", lambda b: not b.find_elements(By.CSS_SELECTOR, under))
    click(browser, f"#tree g.node[data-id='{first}']", lambda b: len(b.find_elements(By.CSS_SELECTOR, under)) == before)
    top = "#tree g.node[data-parent='0']"
    shown = len(browser.find_elements(By.CSS_SELECTOR, top))
    click(browser, "#tree g.more[data-parent='0']", lambda b: len(b.find_elements(By.CSS_SELECTOR, top)) > shown)
    listed = {int(g.get_attribute("data-id")) for g in browser.find_elements(By.CSS_SELECTOR, top)}
    assert listed <= set(root_kids) and len(listed) < len(root_kids)
    # now some drawn children are only known to be below 0.1 %: the rest is a range, each of them at 0 to 0.1 %
    below = [n for n in listed if str(n) not in known]
    high = 1 - sum(known[str(n)] for n in listed if str(n) in known)
    low = max(high - 0.001 * len(below), 0)
    rest = pct(high) if pct(low) == pct(high) else f"{100 * low:.1f}–{pct(high)}"
    assert below and browser.find_element(By.CSS_SELECTOR, "#tree g.more[data-parent='0']").text.endswith(
        f"{rest} together")

    # the whole tree was never fetched; nothing came from outside the server
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(url.startswith(base) for url in loaded), loaded
    assert not [url for url in loaded if url.split("?")[0].endswith("/taxonomy")], loaded
    if os.environ.get("HIERVISION_SCREENSHOT"):
        browser.save_screenshot(os.environ["HIERVISION_SCREENSHOT"].replace(".png", "-big.png"))


@pytest.mark.slow
def test_big_tree_page_fits_a_360_px_screen(big_server, browser, noise_png):
    fits_360_px(browser, big_server[0], noise_png)


@pytest.mark.slow
def test_page_load_benchmark_measures_the_lazy_page(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import page_load

    assert page_load.main(["--trees", "random:5000", "--out", str(tmp_path / "page.json")]) == 0
    row = json.loads((tmp_path / "page.json").read_text())["rows"][0]
    assert abs(row["nodes"] - 5000) <= 1 and not row["fetched_whole_taxonomy"] and row["open_s"] > 0
    assert row["load_bytes"] < row["taxonomy_bytes"] and row["answer_bytes"] < row["node_scores_bytes"]
    assert "| random:5000 | 5,000 |" in capsys.readouterr().out


def test_page_says_an_unknown_kind_for_a_novelty_heads_inner_answer(browser, tmp_path):
    import torch

    from hiervision.data.fashion_mnist import fashion_mnist_taxonomy
    from hiervision.export import sidecar, torch_engine
    from hiervision.models import create_model
    from hiervision.runtime import Predictor
    from hiervision.serve.predictor import RuntimePredictor

    torch.manual_seed(0)  # untrained, its novel classes biased up: every answer is "novel under" an inner node
    model = create_model("hnd", fashion_mnist_taxonomy(), backbone="resnet20", backbone_kwargs={"width": 0.25},
                         in_chans=1, image_size=28, novel_bias=50.0).eval()
    runtime = Predictor("hnd", sidecar=sidecar(model, {"in_chans": 1, "image_size": 28}), engine=torch_engine(model))
    with serving(create_app(RuntimePredictor(runtime), name="hnd")) as port:
        base = f"http://127.0.0.1:{port}"
        image = fmnist_png(tmp_path)
        expected = post_fields(base, image)
        assert expected["novel"] is True
        browser.get(base + "/")
        assert upload(browser, image) == "done"
        shown = browser.find_element(By.ID, "novel")
        assert shown.is_displayed()
        assert shown.text == f"An unknown kind of {expected['path'][-1]} ({expected['under']})"
