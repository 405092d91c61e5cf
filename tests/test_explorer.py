"""The trace explorer page (issue 23): its embedded data and self-containment for every wiring,
the `python -m stackformer explore` command, and the page in a real headless browser
(Debian's chromium + chromedriver through Selenium; skipped when either is missing): no
console errors (and the check catches an injected one), the block slider changes the grids,
hover shows a cell's value, and a screenshot matches what the data says it must show."""
import io
import json
import os
import re
import shutil

import numpy as np
import pytest

import stackformer as sf
from stackformer.__main__ import main as cli_main
from conftest import WIRINGS_AND_MODA, small_config, perturbed as conftest_perturbed


def perturbed(cfg, seed=0, scale=0.3):
    """Weights away from init, so attention is far from uniform (cells differ visibly)."""
    return conftest_perturbed(cfg, seed=seed, scale=scale, rng_seed=seed + 1)


def embedded(path):
    page = open(path, encoding="utf-8").read()
    blob = re.search(r'<script type="application/json" id="sf-data">(.*?)</script>', page, re.S).group(1)
    return page, json.loads(blob)


@pytest.mark.parametrize("wiring", list(WIRINGS_AND_MODA))
def test_page_data_every_wiring(wiring, tmp_path):
    cfg = small_config(n_layers=3, **WIRINGS_AND_MODA[wiring])
    m = perturbed(cfg, scale=0.05)
    x = np.random.default_rng(0).integers(0, 50, size=(2, 6))
    _, cache = m.run_with_cache(x)
    path = cache.to_html(str(tmp_path / "page.html"))
    page, data = embedded(path)
    # self-contained: nothing fetched from anywhere
    for bad in ("http://", "https://", "<link", "@import", " src=", "fetch("):
        assert bad not in page, bad
    assert data["T"] == 6 and data["H"] == cfg.n_heads and len(data["blocks"]) == cfg.n_layers
    for b in data["blocks"]:
        np.testing.assert_allclose(b["patterns"], cache[f"blocks.{b['index']}.attn.hook_pattern"][0], atol=6e-5)
        assert b["depth_cols"] == cache[f"blocks.{b['index']}.attn.hook_pattern"].shape[-1] - 6
        assert ("depth_mass" in b) == cfg.moda
        if cfg.moda:
            assert len(b["depth_labels"]) == b["depth_cols"]
    assert [r["name"] for r in data["reads"]] == list(cache.hook_sources)
    assert (len(data["reads"]) > 0) == (cfg.residual != "plain")
    assert [r["stream"] for r in data["lens"]] == [r.stream for r in cache.logit_lens().rows]
    assert data["tokens"] == [str(int(t)) for t in x[0]]  # not byte-level: ids


def test_encoder_and_embedding_pages(tmp_path):
    m = sf.Model(small_config(causal=False), seed=0)
    _, cache = m.run_with_cache(np.arange(5))
    _, data = embedded(cache.to_html(str(tmp_path / "enc.html")))
    assert all(r["loss"] is None for r in data["lens"])  # no next-token loss for an encoder
    _, data = embedded(sf.Model(small_config(), seed=0).run_with_cache(np.arange(5))[1].to_html(str(tmp_path / "dec.html")))
    assert all(r["loss"] is not None for r in data["lens"])
    emb = np.zeros((1, 4, 32), dtype=np.float32)
    _, data = embedded(m.run_with_cache(emb)[1].to_html(str(tmp_path / "emb.html")))
    assert data["tokens"] == ["#0", "#1", "#2", "#3"]
    _, long = sf.Model(small_config(max_seq_len=300), seed=0).run_with_cache(np.zeros(257, dtype=np.int64))
    with pytest.raises(ValueError, match="at most 256 positions"):
        long.to_html(str(tmp_path / "long.html"))


def test_script_end_in_labels_is_escaped(tmp_path):
    m = sf.Model(small_config(), seed=0)
    _, cache = m.run_with_cache(np.arange(3))
    path = cache.to_html(str(tmp_path / "p.html"), title="<b>t</b>", text=["</script><i>", "b", "c"])
    page, data = embedded(path)
    assert data["tokens"][0] == "</script><i>" and "<title>&lt;b&gt;t&lt;/b&gt;</title>" in page
    with pytest.raises(ValueError, match="2 token labels for 3 positions"):
        cache.to_html(str(tmp_path / "q.html"), text=["a", "b"])
    with pytest.raises(TypeError, match="path"):
        cache.to_html(3)


def test_explore_command(tmp_path, capsys):
    out = tmp_path / "e.html"
    assert cli_main(["explore", "--out", str(out), "--layers", "2", "--d-model", "32", "--heads", "2",
                     "--residual", "attnres_full", "--moda", "--text", "a b\n"]) == 0
    assert "wrote" in capsys.readouterr().out
    page, data = embedded(out)
    assert data["tokens"] == ["a", "\u2423", "b", "\\n"] and data["moda"] and len(data["blocks"]) == 2
    ck = tmp_path / "m.safetensors"
    sf.Model(sf.Config(vocab_size=256, d_model=32, n_heads=2, n_layers=3, max_seq_len=64)).save(str(ck))
    assert cli_main(["explore", "--out", str(out), "--load", str(ck), "--text", "hi"]) == 0
    assert len(embedded(out)[1]["blocks"]) == 3
    with pytest.raises(SystemExit):
        cli_main(["explore", "--out", str(out), "--text", "x" * 300])
    with pytest.raises(SystemExit):
        cli_main(["explore", "--out", str(out), "--heads", "5"])  # d_model 64 not divisible
    assert "n_heads" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# the page in a real browser
# ------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
W, H_PX = 1100, 900


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM or not DRIVER:
        pytest.skip("no chromium/chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--window-size={W},{H_PX}", "--force-device-scale-factor=1", "--hide-scrollbars"):
        opts.add_argument(a)
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(DRIVER), options=opts)  # no Selenium Manager download
    yield d
    d.quit()


def console_errors(driver):
    """Browser console entries at level SEVERE (uncaught exceptions, console.error)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    cfg = sf.Config(vocab_size=256, d_model=32, n_heads=2, n_layers=3, max_seq_len=64,
                    residual="attnres_block", attnres_block_size=2, moda=True)
    _, cache = perturbed(cfg, seed=3).run_with_cache(b"hello, world")
    path = str(tmp_path_factory.mktemp("explorer") / "page.html")
    cache.to_html(path)
    return path, cache


def load(driver, path):
    driver.get_log("browser")  # drop earlier pages' entries
    driver.get("file://" + os.path.abspath(path))
    assert driver.execute_script("return window.sfExplorer !== undefined && window.sfExplorer.ready") is True


def test_browser_loads_without_console_errors(browser, page):
    path, cache = page
    load(browser, path)
    assert console_errors(browser) == []
    grids = browser.find_elements("css selector", "canvas.attn-grid")
    assert len(grids) == 2 and [g.get_attribute("data-block") for g in grids] == ["0", "0"]
    assert len(browser.find_elements("css selector", "#tokens .tok")) == 12
    assert browser.find_element("id", "moda-section").is_displayed()
    assert browser.find_element("id", "reads-section").is_displayed()
    rows = browser.find_elements("css selector", "#lens tr")
    assert len(rows) == 1 + len(cache.logit_lens().rows)


def test_injected_js_error_is_caught(browser, page, tmp_path):
    """The console check is not vacuous: a page with a script error fails it."""
    path, _ = page
    bad = tmp_path / "bad.html"
    html = open(path, encoding="utf-8").read()
    # break the page's own script: the first call it makes goes to an undefined function
    html = html.replace("renderTokens();\n  if (D.moda)", "renderTokenz();\n  if (D.moda)", 1)
    bad.write_text(html, encoding="utf-8")
    browser.get_log("browser")
    browser.get("file://" + str(bad))
    errs = console_errors(browser)
    assert errs and any("renderTokenz" in e for e in errs), errs
    assert browser.execute_script("return window.sfExplorer === undefined") is True


def test_slider_changes_the_grids(browser, page):
    from selenium.webdriver.common.keys import Keys
    path, _ = page
    load(browser, path)
    grid = lambda: browser.execute_script(  # noqa: E731
        "return document.querySelector('canvas.attn-grid').toDataURL()")
    before, label0 = grid(), browser.find_element("id", "block-label").text
    slider = browser.find_element("id", "block")
    slider.send_keys(Keys.ARROW_RIGHT)  # a real key press on the range input
    assert slider.get_attribute("value") == "1"
    after = grid()
    assert after != before
    assert browser.find_element("id", "block-label").text != label0
    assert browser.find_element("css selector", "canvas.attn-grid").get_attribute("data-block") == "1"
    # block 1 under MoDA has depth columns: the canvas is wider than block 0's
    widths = browser.execute_script("return document.querySelector('canvas.attn-grid').width")
    slider.send_keys(Keys.ARROW_LEFT)
    assert browser.execute_script("return document.querySelector('canvas.attn-grid').width") < widths
    assert grid() == before  # back to block 0: the same pixels
    assert console_errors(browser) == []


def test_hover_shows_the_cell_value(browser, page):
    from selenium.webdriver.common.action_chains import ActionChains
    path, cache = page
    load(browser, path)
    P = cache["blocks.0.attn.hook_pattern"][0, 1]      # head 1
    t, u = 7, 3
    cv = browser.find_elements("css selector", "canvas.attn-grid")[1]
    s = browser.execute_script("return window.sfExplorer.cellSize(arguments[0])", P.shape[1])
    w, h = cv.size["width"], cv.size["height"]
    ActionChains(browser).move_to_element_with_offset(
        cv, int(-w / 2 + 1 + (u + 0.5) * s), int(-h / 2 + 1 + (t + 0.5) * s)).perform()
    info = browser.find_element("id", "info").text
    assert f"query {t} " in info and f"key {u} " in info and f"{P[t, u]:.4f}" in info, info
    tokens = browser.find_elements("css selector", "#tokens .tok")
    assert "hl" in tokens[t].get_attribute("class") and "hl" in tokens[u].get_attribute("class")
    ActionChains(browser).move_to_element(tokens[2]).perform()
    assert "hl" in tokens[2].get_attribute("class") and "hl" not in tokens[t].get_attribute("class")
    assert "query 2 " in browser.find_element("id", "info").text


def test_screenshot_matches_the_data(browser, page):
    """Expectations: the screenshot is the viewport's size; head 0's grid area is not blank: its
    share of visibly coloured pixels is the pattern's share of cells with p > 0.04;
    the cell holding block 0 head 0's largest probability has exactly the colour the page's
    scale gives it (white -> rgb(8, 48, 107), linear) and is darker than a cell with a smaller
    value, and a masked (future) cell is white."""
    Image = pytest.importorskip("PIL.Image")
    path, cache = page
    load(browser, path)
    png = browser.get_screenshot_as_png()
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    vw, vh = browser.execute_script("return [window.innerWidth, window.innerHeight]")
    assert img.shape[:2] == (vh, vw)
    box = browser.execute_script(
        "const c = document.querySelector('canvas.attn-grid'), r = c.getBoundingClientRect();"
        "return [r.left + c.clientLeft, r.top + c.clientTop, c.width, c.height];")
    x0, y0, cw, ch = (int(round(v)) for v in box)
    assert y0 + ch <= vh and x0 + cw <= vw, "grid not inside the viewport"
    area = img[y0:y0 + ch, x0:x0 + cw]
    P = cache["blocks.0.attn.hook_pattern"][0, 0]
    T = P.shape[0]
    s = browser.execute_script("return window.sfExplorer.cellSize(arguments[0])", P.shape[1])
    assert (cw, ch) == (s * P.shape[1], s * T)
    # the red channel of a cell is 255 - 247 p: cells with p > 0.04 are clearly not white, and
    # the screenshot's share of such pixels is the data's share of such cells
    dark = (area[..., 0] < 245).mean()
    assert dark > 0.1 and abs(dark - (P > 10 / 247).mean()) < 0.03, (dark, (P > 10 / 247).mean())

    def pixel(t, u):
        return img[y0 + int((t + 0.5) * s), x0 + int((u + 0.5) * s)]

    t_hi, u_hi = np.unravel_index(np.argmax(P[1:]), P[1:].shape)   # skip row 0 (p = 1 exactly)
    t_hi += 1
    want = np.round(255 + (np.array([8, 48, 107]) - 255) * P[t_hi, u_hi])
    assert np.abs(pixel(t_hi, u_hi) - want).max() <= 3, (pixel(t_hi, u_hi), want)
    row = P[t_hi, : t_hi + 1]
    u_lo = int(np.argmin(row))
    assert row[u_lo] < P[t_hi, u_hi] - 0.05
    assert pixel(t_hi, u_hi).sum() < pixel(t_hi, u_lo).sum()   # larger value, darker cell
    assert (pixel(0, T - 1) >= 252).all()                       # masked future key: white
