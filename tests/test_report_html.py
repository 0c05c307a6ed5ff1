"""report.html: self-contained, escaped, complete; and opened in a real headless browser
(Debian's Chromium driven by Selenium through the system chromedriver), which must show
the run's key numbers without a console error. The browser is mandatory in CI."""

import copy
import json
import os
import re
import shutil
import sys
from html import escape
from pathlib import Path

import pytest
from test_cli import TINY

from testbed.cli import main
from testbed.report import pct
from testbed.report_html import run_page

HOSTILE = "<img src=x onerror=alert(1)> & \"q\" 'r'"
"""An attack label is free text: it must reach the page as text, never as markup."""

RUN = (
    TINY.replace("[report]\nplots = false", "[report]\nplots = true").replace(
        "[federation]", "[evaluation]\nrepeats = 2\n[federation]"
    )
    + f"""
[[attacks]]
name = "fgsm"
label = {json.dumps(HOSTILE)}
params = {{ eps = 0.03 }}
"""
)
CHROMIUM = ("chromium", "/usr/bin/chromium")
CHROMEDRIVER = ("chromedriver", "/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    scenario = tmp / "tiny.toml"
    scenario.write_text(RUN)
    out = tmp / "run"
    assert main(["run", str(scenario), "--out", str(out), "--no-progress"]) == 0
    return out


def key_numbers(metrics):
    """The strings the page must show: clean ACC and every attack's AASR, as the report
    formats them (mean ± std over seeds)."""
    summ = metrics["tasks"]["synthetic"]["summary"]
    acc = summ["acc_mean"]
    out = {"clean ACC": pct(acc["mean"], acc["std"], acc["n"])}
    for label, a in summ["attacks"].items():
        out[f"AASR {label}"] = pct(a["aasr"]["mean"], a["aasr"]["std"], a["aasr"]["n"])
    return out


def test_report_html_is_self_contained_and_complete(run_dir):
    html = (run_dir / "report.html").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # no network: every image inline, no external script, style or link
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    sources = re.findall(r'<img src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/") for s in sources)
    # every figure of the folder, and three images (clean, adversarial, perturbation) per
    # attack and seed
    assert len(metrics["plots"]) >= 2
    for plot in metrics["plots"]:
        assert f"<figcaption>{plot}</figcaption>" in html
    n_examples = len(metrics["seeds"]) * len(metrics["tasks"]["synthetic"]["repeats"][0]["attacks"])
    assert len(sources) == len(metrics["plots"]) + 3 * n_examples
    # the tables of report.md, the privacy, the scenario, the rounds
    titles = (
        "clean accuracy per client", "attacks, mean ± std", "privacy spent (paper_dp)",
        "robust accuracy per client", "clients per seed", "per-round records",
    )  # fmt: skip
    for title in titles:
        assert title in html
    assert "Resolved scenario (scenario.json)" in html and "&quot;noise_multiplier&quot;" in html
    for text in key_numbers(metrics).values():
        assert text in html
    # each client's test images per class, the floor its clean ACC is read against
    task = metrics["tasks"]["synthetic"]
    classes = task["dataset"]["classes"]
    for c in task["repeats"][0]["clients"]:
        per_class = ", ".join(
            f"{k} {n}" for k, n in zip(classes, c["test_label_counts"], strict=True)
        )
        assert f"<td>{c['test']} ({escape(per_class)})</td>" in html
        floor = 100 * max(c["test_label_counts"]) / c["test"]
        assert f"<td>{floor:.2f}%" in html  # the class floor column


def test_user_strings_are_escaped(run_dir):
    html = (run_dir / "report.html").read_text()
    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; &quot;q&quot; &#x27;r&#x27;" in html


def test_testbed_report_writes_it_for_old_runs(run_dir, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    (old / "report.html").unlink()
    assert main(["report", str(old)]) == 0
    assert "report.html" in capsys.readouterr().err
    page = (old / "report.html").read_text()
    assert page == (run_dir / "report.html").read_text().replace("folder run", "folder old")


def test_metrics_no_table_knows_get_a_generic_table(run_dir):
    """New metrics (as an explanation's under attacks[label]["explain"] will be) show up
    without a change to the page; a key no module knows stands in for them here."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    m = copy.deepcopy(metrics)
    task = m["tasks"]["synthetic"]
    for r in task["repeats"]:
        r["attacks"]["PGD-3"]["probe"] = {"saliency": {"spearman": 0.25, "top_k": 0.5}}
        r["future_block"] = {"score": 3}
        r["attacks"][HOSTILE]["new_rate"] = 0.125
    task["summary"]["attacks"]["PGD-3"]["probe"] = {
        "saliency": {"auroc": {"mean": 0.75, "std": 0.01, "n": 2}}
    }
    html = run_page(run_dir, m)
    assert "synthetic: probe per attack and seed" in html
    assert "<td>probe.saliency.spearman</td><td>0.25</td><td>0.25</td>" in html
    assert "<td>probe.saliency.auroc</td><td>0.75 ± 0.01</td>" in html
    assert "synthetic: future_block per seed" in html
    # plain values share one table: no table per key
    assert f"<td>{escape(HOSTILE)}</td><td>new_rate</td><td>0.125</td>" in html
    assert html.count("new_rate per attack") == 0


# --------------------------------------------------------------------------------------
# In a real browser
# --------------------------------------------------------------------------------------


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _find(names) -> str | None:
    for name in names:
        path = shutil.which(name) or (name if Path(name).is_file() else None)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Selenium and the system chromedriver. Missing, it fails
    in CI (CI=true, where .ci/run installs it) and skips elsewhere."""
    chromium, driver_path = _find(CHROMIUM), _find(CHROMEDRIVER)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if webdriver is None or chromium is None or driver_path is None:
        msg = (
            f"headless browser not found (selenium {'ok' if webdriver else 'missing'}, "
            f"chromium {chromium}, chromedriver {driver_path}); "
            "apt-get install chromium chromium-driver"
        )
        if _in_ci():
            pytest.fail(msg + ": it is mandatory in CI")
        pytest.skip(msg)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def test_the_page_renders_in_chromium_with_the_runs_numbers(run_dir, browser):
    from selenium.webdriver.common.by import By

    metrics = json.loads((run_dir / "metrics.json").read_text())
    browser.get((run_dir / "report.html").resolve().as_uri())
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    text = browser.find_element(By.TAG_NAME, "body").text
    numbers = key_numbers(metrics)
    assert len(numbers) == 3  # clean ACC, PGD-3 and the hostile label's FGSM
    for name, value in numbers.items():
        assert value in text, name
    # the cards at the top carry the same numbers
    cards = browser.find_elements(By.CSS_SELECTOR, ".card[data-metric=acc] .v")
    assert cards[0].text == numbers["clean ACC"]
    # the hostile label is shown as text (an injected <img> would have run its onerror)
    assert HOSTILE in text
    assert browser.execute_script("return document.querySelectorAll('img[src=x]').length") == 0
    # every image decoded
    broken = browser.execute_script(
        "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
        ".map(i => i.alt)"
    )
    assert broken == []
    assert browser.execute_script("return document.images.length") >= len(metrics["plots"])

    # clicking a header sorts its table: the per-client table by clean ACC
    table = browser.find_element(
        By.XPATH, "//h3[contains(., 'clients per seed')]/following::table[1]"
    )
    header = table.find_element(By.XPATH, ".//th[normalize-space()='clean ACC']")

    names = [th.text.strip() for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    nth = names.index("clean ACC") + 1

    def column() -> list[float]:
        cells = table.find_elements(By.CSS_SELECTOR, f"tbody tr td:nth-child({nth})")
        return [float(c.text.rstrip("%")) for c in cells]

    header.click()
    assert header.get_attribute("aria-sort") == "ascending"
    assert column() == sorted(column())
    header.click()
    assert header.get_attribute("aria-sort") == "descending"
    assert column() == sorted(column(), reverse=True)
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


@pytest.mark.parametrize("broken", ["raises", "cannot be imported"])
def test_a_broken_page_costs_the_page_not_the_run(tmp_path, monkeypatch, capsys, broken):
    if broken == "raises":

        def fail(*_):
            raise RuntimeError("page bug")

        monkeypatch.setattr("testbed.report_html.write_run_html", fail)
    else:  # as when the installed code changes under a long run
        monkeypatch.setitem(sys.modules, "testbed.report_html", None)
    scenario = tmp_path / "s.toml"
    scenario.write_text(TINY)
    out = tmp_path / "run"
    assert main(["run", str(scenario), "--out", str(out), "--no-progress"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "report.html not written: "
        + ("RuntimeError" if broken == "raises" else "ModuleNotFoundError")
        in err
    )
    assert (out / "metrics.json").is_file() and (out / "report.md").is_file()
    assert not (out / "report.html").exists()
