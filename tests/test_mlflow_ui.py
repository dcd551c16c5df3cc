"""The operator's view in a real browser: MLflow's UI on a finished run, in headless Chromium.

A small federation runs in this process against an ``mlflow server`` on 127.0.0.1 (artifacts
proxied through it, as in the multi-user setup); Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium, then open the run page and a plot. Screenshots stay in the test's tmp
folder (``run-page.png``, ``plot.png``). Under CI (``CI=true``) a missing browser fails the
test; elsewhere it is skipped with the command that installs it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import ci_helpers
import pytest
from test_run_records import small_run_config

from experiments.inprocess import run_inprocess
from fl_server.launch.mlflow_server import start_mlflow
from fl_server.report import PLOTS

INSTALL = "apt-get install -y chromium chromium-driver"
#: Seconds a page may take to show what is looked for (the UI loads its scripts first).
PAGE_TIMEOUT = 90


def _browser() -> tuple[str, str]:
    """Paths of chromium and chromedriver; fail under CI, else skip, when one is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [
        name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path
    ]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        ci_helpers.missing(f"browser test needs {', '.join(missing)}: {INSTALL}")
    assert chromium and driver
    return chromium, driver


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_run_page_shows_the_factory_table_and_a_plot(tmp_path: Path) -> None:
    chromium, chromedriver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with start_mlflow(tmp_path / "mlflow", port=None) as server:
        uri = server.info["uri"]
        summary = run_inprocess(small_run_config(tmp_path, "ui", f"tracking.uri={uri}"), quiet=True)
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=uri).get_run(summary["mlflow_run_id"])
        page = f"{uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"

        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--window-size=1440,1100"):  # fmt: skip
            options.add_argument(arg)
        browser = webdriver.Chrome(service=Service(chromedriver), options=options)
        try:
            wait = WebDriverWait(browser, PAGE_TIMEOUT)
            browser.get(page)

            def show_more(driver):
                """MLflow folds a long description after a few lines: unfold it."""
                for button in driver.find_elements(By.XPATH, "//*[text()='Show more']"):
                    button.click()
                    return True
                return False

            wait.until(show_more)

            def factory_table(driver):
                for table in driver.find_elements(By.TAG_NAME, "table"):
                    text = table.text
                    if "factory_000" in text and "EUR" in text and "%" in text:
                        return table
                return False

            table = wait.until(factory_table)
            rows = table.find_elements(By.TAG_NAME, "tr")
            assert len(rows) == 1 + 3  # header and one row per factory
            browser.save_screenshot(str(tmp_path / "run-page.png"))

            plot = next(iter(PLOTS))
            browser.get(f"{page}/artifacts/plots/{plot}.png")

            def rendered_plot(driver):
                """The preview of the PNG, loaded (the UI shows it from a blob: URL)."""
                for image in driver.find_elements(By.TAG_NAME, "img"):
                    width = driver.execute_script(
                        "return arguments[0].complete && arguments[0].naturalWidth", image
                    )
                    if width and int(width) >= 600:  # the plot, not an icon
                        return image
                return False

            wait.until(rendered_plot)
            browser.save_screenshot(str(tmp_path / "plot.png"))
        finally:
            browser.quit()
    for name in ("run-page.png", "plot.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
