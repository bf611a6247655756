"""The HTML report (`benchmarks.report`) in a real browser: headless Debian Chromium driven by Selenium.

Run by ``make browser-test`` (which installs the Debian packages ``chromium`` and ``chromium-driver``
when missing) and by ``.ci/run``; ``make test`` leaves it out (marker ``browser``) because it needs
those system packages. Checks: the page loads with no console error, the table has one row per cell,
sorting by a column orders its values both ways, a column filter keeps only matching rows, every
figure and overlay image loads; a screenshot is saved (``results/browser/report.png``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from benchmarks import report, store, visualize
from benchmarks import run as runner

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = ROOT / "results" / "browser" / "report.png"
FAST = ["model=embedded", "task=shapes", "n_samples=4", "batch_size=4", "latency.n_samples=1", "latency.warmup=0",
        "latency.decode_tokens=2", "progress=false"]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> report.Report:
    """A small sweep on the embedded model (3 methods), its overlays and its report."""
    results = tmp_path_factory.mktemp("results")
    for method, budgets in (("fastv", "[null,36,18]"), ("visionzip", "[36,18]"), ("random", "[36]")):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*FAST, f"results_dir={results}", f"method={method}",
                                                           f"budgets={budgets}"])
        runner.run(cfg)
    visualize.main([f"results_dir={results}", "samples=2"])
    return report.build(results)


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, DRIVER) if shutil.which(p) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: `make browser-test` installs the Debian packages chromium "
                    "and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_window_size(1400, 1000)
    yield driver
    driver.quit()


def _loaded(driver, page: report.Report):
    """Open the report from disk and wait until DataTables has drawn the table."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.index.resolve().as_uri())
    WebDriverWait(driver, 30).until(
        lambda d: d.execute_script(f"return !!document.querySelector('#{report.TABLE_ID}.dataTable')"))
    return driver


def _column(driver, name: str) -> list[str]:
    """The visible cells of the column headed ``name``, top to bottom."""
    return driver.execute_script("""
        const t = document.getElementById(arguments[0]);
        const heads = [...t.querySelectorAll('thead tr:first-child th')].map(th => th.innerText.trim());
        const i = heads.findIndex(h => h === arguments[1]);
        if (i < 0) return null;
        return [...t.querySelectorAll('tbody tr')].map(r => r.children[i].innerText.trim());
    """, report.TABLE_ID, name)


def _rows(driver) -> int:
    return driver.execute_script(f"return document.querySelectorAll('#{report.TABLE_ID} tbody tr').length")


def test_report_page_in_chromium(page, browser):
    driver = _loaded(browser, page)
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], f"console errors: {errors}"
    n_cells = len(list(store.cell_folders(page.index.parents[1])))
    assert n_cells == page.rows == 6 and _rows(driver) == n_cells  # one row per cell

    # sorting: the header's sort arrow orders the column ascending, then descending (the cells are in
    # method order, so their FLOPs are not sorted to begin with)
    from selenium.webdriver.common.by import By

    assert [float(v) for v in _column(driver, "tflops_prefill")] != sorted(
        float(v) for v in _column(driver, "tflops_prefill"))
    header = driver.execute_script(f"""
        return [...document.querySelectorAll('#{report.TABLE_ID} thead tr:first-child th')]
            .find(th => th.innerText.trim() === 'tflops_prefill');""")
    assert header is not None, "no tflops_prefill header"
    from selenium.webdriver.support.ui import WebDriverWait

    for descending in (False, True):
        header.find_element(By.CSS_SELECTOR, ".dt-column-order").click()
        # DataTables redraws after the click event returns: wait for the header to show the new order
        want = "dt-ordering-desc" if descending else "dt-ordering-asc"
        WebDriverWait(driver, 10).until(lambda d, want=want: want in header.get_attribute("class"))
        values = [float(v) for v in _column(driver, "tflops_prefill")]
        assert values == sorted(values, reverse=descending) and len(values) == n_cells

    # filtering on the method column keeps only that method's cells
    box = driver.execute_script(f"""
        const t = document.getElementById('{report.TABLE_ID}');
        const heads = [...t.querySelectorAll('thead tr:first-child th')].map(th => th.innerText.trim());
        const i = heads.findIndex(h => h === 'method');
        return t.querySelectorAll('tfoot input')[i] || null;""")
    assert box is not None, "no filter box on the method column"
    box.send_keys("visionzip")
    WebDriverWait(driver, 10).until(lambda d: _rows(d) < n_cells)  # the filter applies on the input event
    assert _column(driver, "method") == ["visionzip", "visionzip"]
    box.clear()
    box.send_keys("\b")  # an edit event: the filter is lifted
    WebDriverWait(driver, 10).until(lambda d: _rows(d) == n_cells)

    # every figure and overlay image decoded
    broken = driver.execute_script(
        "return [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
    images = driver.execute_script("return document.images.length")
    assert broken == [] and images == len(page.plots) + len(page.overlays) and page.overlays
    # each row's config link reaches that cell's resolved config
    target = driver.execute_script(f"""
        const a = document.querySelector('#{report.TABLE_ID} tbody a');
        return document.querySelector(a.getAttribute('href')).querySelector('pre').textContent;""")
    assert "method:" in target and "budget" in target
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.save_screenshot(str(SCREENSHOT)) and SCREENSHOT.stat().st_size > 10_000
