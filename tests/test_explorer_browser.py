"""The explorer in a real JupyterLab, driven by headless Chromium (Debian's chromium +
chromedriver, installed by `make browser`): the widget renders and reacts to a change."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium + chromium-driver (`make browser`)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    shutil.copy(ROOT / "notebooks" / "05_explorer.ipynb", tmp_path / "explorer.ipynb")  # never touch the committed one
    port = _free_port()
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.token=",
         "--ServerApp.password=", f"--ServerApp.root_dir={tmp_path}", "--allow-root",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/lab/tree/explorer.ipynb"
    proc.terminate()
    proc.wait(timeout=30)


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1900,2400"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def _click_menu(driver, wait, menu: str, item: str):
    from selenium.webdriver.common.by import By

    wait.until(lambda d: any(e.text == menu for e in d.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel")))
    next(e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel") if e.text == menu).click()
    wait.until(lambda d: any(e.text == item for e in d.find_elements(By.CSS_SELECTOR, ".lm-Menu-itemLabel")))
    next(e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-itemLabel") if e.text == item).click()


def test_explorer_renders_and_reacts(lab, tmp_path):
    """Run the notebook: four explorers render (tiny-llava, SmolLM2 KV, multi-image KV, trained MoD);
    switching the method changes the view and its controls; a bad parameter shows one red line."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = _browser()
    try:
        wait = WebDriverWait(driver, 300, ignored_exceptions=[StaleElementReferenceException])
        driver.get(lab)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']")
                   or d.find_elements(By.CSS_SELECTOR, ".jp-Toolbar-kernelName"))
        time.sleep(2)  # let the kernel settle before running
        _click_menu(driver, wait, "Run", "Run All Cells")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".mmlab-explorer .mmlab-answer")) == 4)
        first = driver.find_elements(By.CSS_SELECTOR, ".mmlab-explorer")[0]

        def img_src(d):
            for _ in range(20):  # the output image is replaced while we read it: read again
                try:
                    imgs = first.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output img")
                    return imgs[0].get_attribute("src") if imgs else None
                except StaleElementReferenceException:
                    time.sleep(0.1)
            raise AssertionError("the explorer's output image never settled")

        def select(i):
            return Select(first.find_elements(By.CSS_SELECTOR, "select")[i])

        wait.until(img_src)
        assert len(select(1).options) > 1 and select(1).first_selected_option.text == "mean"  # populated, labelled
        before = img_src(driver)
        select(0).select_by_visible_text("mod")  # Mixture-of-Depths view: routed tokens, router, schedule
        wait.until(lambda d: img_src(d) not in (None, before))
        before = img_src(driver)
        select(0).select_by_visible_text("rtn")  # quantization view: a module chooser appears
        wait.until(lambda d: img_src(d) not in (None, before))
        wait.until(lambda d: "self_attn.q_proj" in [o.text for o in select(2).options])
        params = first.find_elements(By.CSS_SELECTOR, "input[type='text']")[0]
        params.send_keys("nonsense=1", Keys.ENTER)
        wait.until(lambda d: "has no parameter nonsense" in first.find_element(By.CSS_SELECTOR, ".mmlab-error").text)
        wait.until(lambda d: img_src(d) is None)  # the stale view is cleared
        kv = driver.find_elements(By.CSS_SELECTOR, ".mmlab-explorer")[1]
        assert len(kv.find_elements(By.CSS_SELECTOR, ".mmlab-kv-text span")) > 100  # SmolLM2 prompt, token by token
        select(0).select_by_visible_text("divprune")
        wait.until(lambda d: img_src(d) is not None and not first.find_element(By.CSS_SELECTOR, ".mmlab-error").text)
        time.sleep(1)
        update = os.environ.get("MMLAB_UPDATE_SCREENSHOT")
        shot = ROOT / "figures" / "explorer.png" if update else tmp_path / "explorer.png"
        first.screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
