"""Screenshot a report.html in headless Chromium (the browser test's set-up), as a PNG
quantised to 256 colours: `python scripts/screenshot_report.py RUN/report.html OUT.png`.
docs/report-html-quickstart.png was made so from `testbed run scenarios/quickstart.toml`.
Needs selenium (the test extra) and Debian's chromium + chromium-driver."""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("html", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--max-height", type=int, default=4000, help="cut the page here (pixels)")
    p.add_argument("--scale", type=float, default=0.75, help="shrink the image by this factor")
    args = p.parse_args()

    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={args.width},1000", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.get(args.html.resolve().as_uri())
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(args.width, min(height, args.max_height))
        png = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    img = Image.open(io.BytesIO(png)).convert("RGB")
    if args.scale != 1:
        img = img.resize((round(img.width * args.scale), round(img.height * args.scale)),
                         Image.Resampling.LANCZOS)  # fmt: skip
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(args.png, optimize=True)
    print(f"{args.png}: {img.width}x{img.height}, {args.png.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
