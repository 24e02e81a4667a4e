"""Headless Chromium through selenium and Debian's chromium-driver, for the site's browser test and for
`python tests/browser.py PAGE.html OUT.png` (how the README's screenshot is made)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path


def chromium():
    """A headless Chromium WebDriver that keeps the page's console log; None when chromium or chromedriver is
    missing."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                "--window-size=1400,1000", "--hide-scrollbars"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


if __name__ == "__main__":
    page, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    driver = chromium()
    if driver is None:
        sys.exit("chromium and chromium-driver are needed (apt-get install chromium chromium-driver)")
    try:
        driver.get(page.as_uri())
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1400, min(max(height, 600), 2400))
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
    print(f"wrote {out}")
