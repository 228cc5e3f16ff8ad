"""The web page in a real browser (issue 17): Debian's Chromium, headless, driven by Selenium.

ana enters her key, teaches `<pip>` from the miniature sample subject's training
photos (a file that is no photo is flagged before anything is sent), waits for it to
be ready (trained by a `cluster.personalize` job through Ray's job API, on the shipped
`mini` model), asks about it with a held-out photo, `<pip>` completed from her
concepts, and reads the streamed answer. ben's page never shows `<pip>`. Every step
is a screenshot under runs/page/. Nothing here depends on what the model answers.
"""

import os
import re
from pathlib import Path

import httpx
import pytest

from tests.serve.upload_helpers import ROOT, SAMPLES, upload_app

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = ROOT / "runs" / "page"
# The mini recipe, shortened: the page is under test here, not the concept's accuracy.
RECIPE = {"from": str(ROOT / "examples" / "mini-recipe.yaml"), "epochs": 2, "hard_negatives": 0,
          "easy_negatives": 0, "positive_questions": 1, "attribute_questions": 2}
STATIC = ROOT / "serve" / "static"


def test_the_page_is_self_contained():
    """Nothing fetched from elsewhere at run time, and no build step: the files are what is served."""
    names = sorted(p.name for p in STATIC.iterdir())
    assert names == ["app.css", "app.js", "index.html"]
    for p in STATIC.iterdir():
        text = p.read_text()
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text), p.name
        assert not re.search(r"url\(\s*[\"']?(https?:)?//", text), p.name
        assert "innerHTML" not in text and "eval(" not in text, p.name  # text from the service stays text
    html = (STATIC / "index.html").read_text()
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    for target in re.findall(r'\bfor="([^"]+)"', html):  # every label names a real control
        assert target in ids, target
    for control in re.findall(r'<(?:input|textarea)\b[^>]*\bid="([^"]+)"', html):
        assert f'for="{control}"' in html, f"{control} has no label"


def browser(profile: Path, width=1280, height=1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), \
        "Debian's chromium and chromium-driver are missing: `make install` installs them (apt-get)"
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never downloads anything
    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with upload_app(tmp_path_factory.mktemp("page"), ("ana", "ben"), "mini",
                    {"min_batch": 1, "max_wait_s": 0, "recipe": RECIPE, "max_active_jobs": 1}) as a:
        yield a


def test_teach_and_chat_in_a_browser(app, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    with httpx.Client(base_url=app.url) as c:
        r = c.get("/")
        assert r.status_code == 200 and "default-src 'none'" in r.headers["content-security-policy"]
        assert c.get("/static/../serve/app.py").status_code == 404 and c.get("/static/nope.js").status_code == 404

    ana = browser(tmp_path / "ana", height=1100)
    try:
        wait = WebDriverWait(ana, 30)
        find = ana.find_element

        def shot(name):
            ana.execute_script("window.scrollTo(0, 0)")
            ana.save_screenshot(str(SHOTS / f"{name}.png"))

        ana.get(app.url)
        wait.until(lambda d: find(By.ID, "key").is_displayed())
        assert not find(By.ID, "app").is_displayed()  # nothing but the key form before a key
        shot("01-key")
        find(By.ID, "key").send_keys("yk-wrong" + Keys.ENTER)  # the keyboard alone
        wait.until(lambda d: "not valid" in find(By.ID, "key-error").text)
        find(By.ID, "key").clear()
        find(By.ID, "key").send_keys(app.keys["ana"] + Keys.ENTER)
        wait.until(lambda d: find(By.ID, "concepts").get_attribute("data-loaded") == "true")
        assert find(By.ID, "concepts-empty").is_displayed() and not find(By.ID, "key-section").is_displayed()
        shot("02-signed-in")

        train = sorted((SAMPLES / "train" / "pip").glob("*.png"))
        assert len(train) >= 3
        notes = tmp_path / "notes.txt"
        notes.write_text("not a photo")
        find(By.ID, "teach-name").send_keys("pip")
        find(By.ID, "teach-description").send_keys("my blue diamond")
        find(By.ID, "teach-photos").send_keys("\n".join(str(p) for p in [*train, notes]))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs li")) == len(train) + 1)
        wait.until(lambda d: "notes.txt" in find(By.ID, "teach-messages").text)
        assert len(ana.find_elements(By.CSS_SELECTOR, "#thumbs li.bad")) == 1
        shot("03-photos-checked")
        find(By.CSS_SELECTOR, "#thumbs li.bad button").click()
        wait.until(lambda d: f"{len(train)} photos ready" in find(By.ID, "teach-messages").text)
        find(By.ID, "teach-submit").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#concepts li[data-name="pip"]'))
        status = find(By.CSS_SELECTOR, '#concepts li[data-name="pip"]').get_attribute("data-status")
        assert status in ("queued", "training"), status
        WebDriverWait(ana, 120).until(lambda d: d.find_elements(
            By.CSS_SELECTOR, '#concepts li[data-name="pip"][data-status="training"] progress'))
        shot("04-training")
        WebDriverWait(ana, 420, poll_frequency=1).until(lambda d: d.find_elements(
            By.CSS_SELECTOR, '#concepts li[data-name="pip"][data-status="ready"]'))
        item = find(By.CSS_SELECTOR, '#concepts li[data-name="pip"]')
        assert "ready · v1" in item.text and "Shared with" not in item.text
        shot("05-ready")

        box = find(By.ID, "chat-input")
        box.click()
        box.send_keys("Is <pi")
        wait.until(lambda d: find(By.ID, "suggestions").is_displayed())
        assert [li.text for li in ana.find_elements(By.CSS_SELECTOR, "#suggestions li")] == ["<pip>"]
        assert box.get_attribute("aria-expanded") == "true"
        shot("06-completion")
        box.send_keys(Keys.TAB)
        assert box.get_attribute("value") == "Is <pip> "
        box.send_keys("in this photo? Answer yes or no.")
        held_out = SAMPLES / "test" / "pip" / "0.png"
        find(By.ID, "chat-photo").send_keys(str(held_out))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-photo-preview img"))
        box.send_keys(Keys.ENTER)
        WebDriverWait(ana, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#messages li[data-done]"))
        answer = find(By.CSS_SELECTOR, "#messages li[data-done]")
        assert answer.get_attribute("data-done") == "true", answer.text
        assert int(answer.get_attribute("data-chunks")) >= 1  # text arrived as streamed deltas
        assert answer.find_element(By.CSS_SELECTOR, ".text").text.strip()
        sent = ana.find_elements(By.CSS_SELECTOR, "#messages li.user")
        assert len(sent) == 1 and sent[0].find_elements(By.TAG_NAME, "img")
        shot("07-answer")

        ana.set_window_size(390, 844)  # a phone
        ana.execute_script("window.scrollTo(0, 0)")
        assert ana.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        shot("08-phone")
    finally:
        ana.quit()

    ben = browser(tmp_path / "ben")
    try:
        wait = WebDriverWait(ben, 30)
        ben.get(app.url)
        wait.until(lambda d: d.find_element(By.ID, "key").is_displayed())
        ben.find_element(By.ID, "key").send_keys(app.keys["ben"] + Keys.ENTER)
        wait.until(lambda d: d.find_element(By.ID, "concepts").get_attribute("data-loaded") == "true")
        assert ben.find_element(By.ID, "concepts-empty").is_displayed()
        box = ben.find_element(By.ID, "chat-input")
        box.send_keys("Is <pi")
        assert not ben.find_element(By.ID, "suggestions").is_displayed()
        assert "pip" not in ben.find_element(By.TAG_NAME, "main").text
        assert ben.find_elements(By.CSS_SELECTOR, '[data-name="pip"]') == []
        ben.save_screenshot(str(SHOTS / "09-other-tenant.png"))
    finally:
        ben.quit()
    with app.client("ben") as c:
        assert c.get("/v1/concepts/pip").status_code == 404
