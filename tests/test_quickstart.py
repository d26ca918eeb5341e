"""The README's "Your own images" section, end to end, as a new user runs it: real Fashion-MNIST PNGs in nested
class folders, then exactly its five commands (train with a tiny budget added), the served page in chromium."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import FMNIST, free_port, post_image
from hiervision.cli import main

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
IMAGES = 240  # the first training images of Fashion-MNIST, all 10 classes
# the README's example names → this test's folders (its tree is Fashion-MNIST's, not the README's animals)
EXAMPLE_SUBFOLDER, SUBFOLDER = "Animals/Dogs", "Clothes/Tops"
BUDGET = ["--set", "train.epochs=1", "--set", "model.backbone_kwargs={width: 0.25}", "--set", "train.amp=none"]

pytestmark = pytest.mark.slow
if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
    pytest.skip(f"real Fashion-MNIST not found in {FMNIST} (apt-get install dataset-fashion-mnist)",
                allow_module_level=True)
pytest.importorskip("onnxruntime")
pytest.importorskip("uvicorn")


def readme_commands() -> list[list[str]]:
    """The five ``hiervision`` commands of the README's "Your own images" section (its second block; the first
    starts from a pretrained encoder, tests/test_recipe_encoder.py runs that recipe), as argument lists."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Your own images\n", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[1]
    return [shlex.split(line.split("#")[0])[1:] for line in block.splitlines() if line.strip()]


def write_photos(root: Path) -> None:
    """Real Fashion-MNIST PNGs in nested class folders (Clothes/Tops/Shirt/12.png); '/' in a name becomes ' or '."""
    from hiervision.data.fashion_mnist import load_fashion_mnist

    ds = load_fashion_mnist(FMNIST, "train")
    tax = ds.taxonomy
    for i in range(IMAGES):
        image, target = ds[i]
        folder = root.joinpath(*(tax.names[n].replace("/", " or ") for n in tax.path(int(target))))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0] * 255).round().byte().numpy(), "L").save(folder / f"{i}.png")


def page_path_ids(base: str, image: Path) -> list[int]:
    """Upload ``image`` on the served page in headless chromium; the node ids it highlights."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    profile = tempfile.mkdtemp(prefix="hv-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(30)
        driver.get(base + "/")
        picker = driver.find_element(By.ID, "picker")
        driver.execute_script("arguments[0].style.display = 'block';", picker)  # hidden behind the drop zone
        picker.send_keys(str(image))
        wait = WebDriverWait(driver, 30)
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
        assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done"
        return [int(g.get_attribute("data-id")) for g in driver.find_elements(By.CSS_SELECTOR, "#tree g.node.on-path")]
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_readme_your_own_images(tmp_path, capsys):
    photos, run = tmp_path / "my-photos", tmp_path / "runs" / "mine"
    write_photos(photos)

    def as_here(args: list[str]) -> list[str]:
        """The README's example paths (``my-photos/...``, ``runs/mine/...``) as this test's folders."""
        def one(a: str) -> str:
            a = a.replace("my-photos/" + EXAMPLE_SUBFOLDER, "my-photos/" + SUBFOLDER)
            for example, here in (("my-photos", photos), ("runs/mine", run)):
                if a == example or a.startswith(example + "/"):
                    return str(here) + a[len(example):]
            return a

        return [one(a) for a in args]

    commands = readme_commands()
    assert [c[0] for c in commands] == ["train", "evaluate", "predict", "export", "serve"]
    train_cmd, evaluate_cmd, predict_cmd, export_cmd, serve_cmd = (as_here(c) for c in commands)

    # 1. train, with a tiny budget: the tree, size and channels come from the folder; one closing screen
    assert main([*train_cmd, *BUDGET, "--quiet"]) == 0
    screen = capsys.readouterr().out
    cfg = (run / "config.yaml").read_text()
    assert "name: folder" in cfg and "channels: 1" in cfg and "image_size: 28" in cfg
    assert "path accuracy" in screen and f"run: {run}" in screen
    for cmd in (evaluate_cmd, export_cmd):  # the screen's next commands are the README's
        assert "hiervision " + " ".join(cmd) in screen
    assert f"hiervision serve {run / 'model.onnx'}" in screen

    # 2. evaluate --report
    assert main(evaluate_cmd) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert len(metrics["level_accuracy"]) == 3 and (run / "report" / "index.html").is_file()

    # 3. predict a sub-folder: one record per image, each a whole path of the folders' tree
    assert main(predict_cmd) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    tops = sorted((photos / SUBFOLDER).rglob("*.png"))
    assert sorted(r["file"] for r in records) == sorted(map(str, tops))
    assert all(len(r["path"]) == 3 and r["path"][0] in ("Clothes", "Goods") for r in records)

    # 4. export
    assert main(export_cmd) == 0
    assert (run / "model.onnx").is_file() and (run / "model.json").is_file()

    # 5. serve the .onnx (a real process, as typed), ask the API and, where chromium is, the page
    port = free_port()
    serve_args = [a if a != "8000" else str(port) for a in serve_cmd]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen([sys.executable, "-m", "hiervision", *serve_args], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if json.load(urllib.request.urlopen(f"{base}/health", timeout=2)).get("status"):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                time.sleep(0.1)
        answer = post_image(base, tops[0])
        by_file = {r["file"]: r for r in records}
        assert answer["path"] == by_file[str(tops[0])]["path"]  # ONNX served = PyTorch predicted
        if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
            assert sorted(page_path_ids(base, tops[0])) == sorted(answer["path_ids"])
    finally:
        server.terminate()
        server.wait(10)
