"""The web page on big trees (issue 23): how long it takes to load, answer and open a node, and how many bytes
it transfers, against what the page used to download: ``GET /taxonomy`` (the whole tree) and
``POST /predict?node_scores=true`` (every node's score).

A flat head on a tiny backbone (untrained: only the page is measured) over each tree, served by uvicorn on
127.0.0.1, read by headless chromium (Debian's chromium + chromedriver, through Selenium). Times are wall
clock in the test process (page load: from the navigation to the first drawn tree); bytes are the
browser's own count (``transferSize`` of the document and every request, headers included).

    python benchmarks/page_load.py                                   # random trees of 10^3, 10^4, 10^5 nodes
    python benchmarks/page_load.py --trees random:50000 json:wordnet.json --out benchmarks/results/page_load.json

(``wordnet.json``: ``hiervision taxonomy build .../breeds/wordnet/class_hierarchy.txt --from wordnet --names
.../node_names.txt --out wordnet.json``, as ``benchmarks/scale.py`` builds it.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

BYTES = "return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))" \
        ".map(e => [e.name, e.transferSize])"


@contextlib.contextmanager
def serving(app) -> Iterator[int]:
    """``app`` served by uvicorn in a thread on a free 127.0.0.1 port (yielded) until the block ends."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def measure(spec: str, browser, image: Path) -> dict:
    import torch
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from hiervision.export import sidecar, torch_engine
    from hiervision.models import create_model
    from hiervision.runtime import Predictor
    from hiervision.serve import create_app
    from hiervision.serve.predictor import RuntimePredictor
    from scale import load_tree

    torch.manual_seed(0)
    tax = load_tree(spec)
    model = create_model("flat", tax, backbone="resnet20", backbone_kwargs={"width": 0.25}, in_chans=1,
                         image_size=16).eval()
    predictor = RuntimePredictor(Predictor(spec, sidecar=sidecar(model, {"in_chans": 1, "image_size": 16}),
                                           engine=torch_engine(model)))
    wait = WebDriverWait(browser, 120, poll_frequency=0.005)
    with serving(create_app(predictor, name=spec)) as port:
        base = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        whole = urllib.request.urlopen(f"{base}/taxonomy", timeout=120).read()
        taxonomy_s = time.perf_counter() - t0
        boundary = "hvpageload"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        scores = urllib.request.urlopen(urllib.request.Request(
            f"{base}/predict?node_scores=true", data=body, method="POST",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}), timeout=120).read()
        t0 = time.perf_counter()
        browser.get(base + "/")
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tree g.node"))
        load_s = time.perf_counter() - t0
        load_bytes = sum(size for _, size in browser.execute_script(BYTES))
        picker = browser.find_element(By.ID, "picker")
        browser.execute_script("arguments[0].style.display = 'block';", picker)
        t0 = time.perf_counter()
        picker.send_keys(str(image))
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state"))
        answer_s = time.perf_counter() - t0
        answer_bytes = sum(size for _, size in browser.execute_script(BYTES)) - load_bytes
        drawn = len(browser.find_elements(By.CSS_SELECTOR, "#tree g.node"))
        open_s = open_bytes = None
        closed = next(iter(browser.find_elements(By.CSS_SELECTOR, "#tree g.node.expandable:not(.open)")), None)
        if closed is not None:  # (a page that draws the whole tree has none)
            kids = f"#tree g.node[data-parent='{closed.get_attribute('data-id')}']"
            before = sum(size for _, size in browser.execute_script(BYTES))
            t0 = time.perf_counter()
            closed.click()
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, kids))
            open_s = round(time.perf_counter() - t0, 3)
            open_bytes = sum(size for _, size in browser.execute_script(BYTES)) - before
        urls = [url for url, _ in browser.execute_script(BYTES)]
    return {"tree": spec, "nodes": tax.num_nodes, "depth": tax.max_depth, "taxonomy_bytes": len(whole),
            "taxonomy_s": round(taxonomy_s, 3),
            "node_scores_bytes": len(scores), "load_s": round(load_s, 3), "load_bytes": load_bytes,
            "answer_s": round(answer_s, 3), "answer_bytes": answer_bytes, "open_s": open_s,
            "open_bytes": open_bytes, "drawn_nodes": drawn,
            "fetched_whole_taxonomy": any(u.split("?")[0].endswith("/taxonomy") for u in urls)}


def opened(r: dict) -> str:
    return "– | –" if r["open_s"] is None else f"{r['open_s']:.2f} s | {r['open_bytes'] / 1024:.1f} kB"


def render(rows: list[dict], argv: list[str]) -> str:
    head = ("| tree | nodes | page load | bytes | answer (upload → drawn) | bytes | open a node | bytes | nodes drawn "
            "| `GET /taxonomy` | `POST /predict?node_scores=true` |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['tree']} | {r['nodes']:,} | {r['load_s']:.2f} s | {r['load_bytes'] / 1024:.0f} kB "
                   f"| {r['answer_s']:.2f} s | {r['answer_bytes'] / 1024:.1f} kB | {opened(r)} | {r['drawn_nodes']} "
                   f"| {r['taxonomy_bytes'] / 1024:,.0f} kB in {r['taxonomy_s']:.2f} s "
                   f"| {r['node_scores_bytes'] / 1024:,.0f} kB |\n" for r in rows)
    return f"`python benchmarks/page_load.py {' '.join(argv)}`\n\n{head}{body}"


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", nargs="+", default=["random:1000", "random:10000", "random:100000"],
                   help="random:N or json:PATH (benchmarks/scale.py's tree specs)")
    p.add_argument("--static", type=Path, help="serve the page's files from this folder instead (e.g. an older "
                   "page: git show REV:src/hiervision/serve/static/app.js > DIR/app.js, same for the others)")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.static:
        import hiervision.serve.app

        hiervision.serve.app.STATIC = args.static.resolve()
    work = Path(tempfile.mkdtemp(prefix="hv-page-"))
    image = work / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)).save(image)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 f"--user-data-dir={work / 'profile'}", "--window-size=1280,1000"]:
        opts.add_argument(flag)
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        rows = []
        for spec in args.trees:
            rows.append(measure(spec, browser, image))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        browser.quit()
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps({"command": f"python benchmarks/page_load.py {' '.join(argv)}",
                                        "rows": rows}, indent=1) + "\n")
    print(render(rows, argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
