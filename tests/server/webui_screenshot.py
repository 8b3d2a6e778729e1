#!/usr/bin/env python3
"""Browser test + screenshot of the `sdctl serve` web UI.

Usage (from the repository root):
    /work/venv-server/bin/python tests/server/webui_screenshot.py \
        --sdctl target/debug/sdctl --out docs/img/webui.png

Starts `sdctl serve` on a free loopback port with the tiny fixture models, drives the page in
headless Chromium through Selenium on the project's trained tiny-fill model (models/tiny-fill:
prompt "red circle with sky blue background", 64x64, 20 steps, one ControlNet unit with its
outline.png and its ControlNet), clicks Generate, waits for the
gallery, checks that no error is shown, saves a screenshot and checks that the result is a 64x64
PNG. The server is always stopped. Exit status 0 on success, 1 with a message on any failure.
"""
import argparse
import base64
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
TINY_FILL = REPO / "models" / "tiny-fill"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
LISTEN_TIMEOUT_S = 60
PAGE_TIMEOUT_S = 30
GENERATE_TIMEOUT_S = 120


class TestFailure(Exception):
    pass


def png_size(data: bytes):
    """(width, height) from a PNG's IHDR chunk; raises TestFailure when it is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise TestFailure(f"gallery image is not a PNG (first bytes {data[:16]!r})")
    return struct.unpack(">II", data[16:24])


class Server:
    """`sdctl serve` child process with its stderr drained by a thread."""

    def __init__(self, sdctl, models_dir, controlnet_dir, lora_dir):
        self.cmd = [
            str(sdctl), "serve", "--listen", "127.0.0.1:0",
            "--models-dir", str(models_dir),
            "--controlnet-dir", str(controlnet_dir),
            "--lora-dir", str(lora_dir),
        ]
        self.lines = queue.Queue()
        self.tail = []
        self.proc = None

    def start(self):
        print("starting:", " ".join(self.cmd), flush=True)
        self.proc = subprocess.Popen(
            self.cmd, cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True,
        )
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            self.tail.append(line)
            del self.tail[:-40]
            self.lines.put(line)
        self.lines.put(None)

    def stderr_tail(self):
        return "\n".join(self.tail[-20:]) or "(no stderr output)"

    def wait_url(self, timeout_s):
        marker = "listening on http://"
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TestFailure(
                    f"server did not print 'listening on http://...' within {timeout_s} s; stderr:\n"
                    + self.stderr_tail())
            try:
                line = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=5)
                raise TestFailure(
                    f"server exited with status {self.proc.returncode} before listening; stderr:\n"
                    + self.stderr_tail())
            if marker in line:
                url = "http://" + line.split(marker, 1)[1].split()[0].rstrip("/")
                host = url.split("//", 1)[1].split(":")[0]
                if host not in ("127.0.0.1", "localhost"):
                    raise TestFailure(f"server is not on loopback: {line}")
                return url

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            print("server ignored SIGTERM for 15 s; killing it", file=sys.stderr)
            self.proc.kill()
            self.proc.wait(timeout=15)


def check_circle(png):
    """The image is what tiny-fill draws for the prompt: red inside the outline, sky blue
    outside (PIL, from the client venv)."""
    import io
    from PIL import Image
    img = Image.open(io.BytesIO(png)).convert("RGB")
    r, g, b = img.getpixel((32, 32))
    if not (r > 150 and g < 110 and b < 110):
        raise TestFailure(f"the centre is not red: {(r, g, b)}")
    r, g, b = img.getpixel((2, 2))
    if not (b > 150 and r < 170):
        raise TestFailure(f"the corner is not sky blue: {(r, g, b)}")


def make_driver(profile_dir):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1400,1500", f"--user-data-dir={profile_dir}"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def wait_for(desc, timeout_s, fn, poll_s=0.25):
    """Polls fn() until it returns a truthy value or timeout_s passes (then TestFailure)."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TestFailure(f"timed out after {timeout_s} s waiting for {desc}")
        time.sleep(poll_s)


def error_text(driver):
    """Text of the page's error box when it is shown, else None."""
    return driver.execute_script(
        "const e = document.getElementById('error');"
        "const t = document.getElementById('error_text');"
        "return e && !e.hidden ? ((t && t.textContent.trim()) || e.textContent.trim() || '(empty error box)') : null;")


def set_number(driver, elem_id, value):
    el = driver.find_element("id", elem_id)
    el.clear()
    el.send_keys(str(value))
    got = el.get_attribute("value")
    if got != str(value):
        raise TestFailure(f"#{elem_id}: typed {value!r}, input holds {got!r}")


def option_texts(select_el):
    return [o.get_attribute("value") for o in select_el.find_elements("css selector", "option")]


def run_browser(url, out_path):
    from selenium.webdriver.support.ui import Select

    profile = tempfile.mkdtemp(prefix="webui-chromium-")
    driver = None
    try:
        driver = make_driver(profile)
        driver.set_page_load_timeout(PAGE_TIMEOUT_S)
        driver.set_script_timeout(PAGE_TIMEOUT_S)
        driver.get(url + "/")
        for elem_id in ("prompt", "negative_prompt", "steps", "cfg_scale", "width", "height", "seed",
                        "sampler", "scheduler", "generate", "interrupt", "progress", "gallery",
                        "add_unit", "model", "tab_txt2img", "tab_img2img"):
            if not driver.find_elements("id", elem_id):
                raise TestFailure(f"page has no #{elem_id}")

        # Lists filled from the API.
        sampler = driver.find_element("id", "sampler")
        wait_for("the sampler list", PAGE_TIMEOUT_S,
                 lambda: len(option_texts(sampler)) > 1 or error_text(driver))
        model = driver.find_element("id", "model")
        wait_for("the model list", PAGE_TIMEOUT_S,
                 lambda: (model.is_enabled() and any(v.split(" [")[0] == "tiny-fill" for v in option_texts(model)))
                 or error_text(driver))
        if error_text(driver):
            raise TestFailure(f"error shown after loading the page: {error_text(driver)}")
        if sampler.get_attribute("value") != "Euler a":
            raise TestFailure(f"default sampler is {sampler.get_attribute('value')!r}, want 'Euler a'")
        defaults = {k: driver.find_element("id", k).get_attribute("value")
                    for k in ("steps", "cfg_scale", "width", "height", "seed")}
        want = {"steps": "20", "cfg_scale": "7", "width": "512", "height": "512", "seed": "-1"}
        if defaults != want:
            raise TestFailure(f"page defaults {defaults}, want {want}")

        # Settings.
        prompt = driver.find_element("id", "prompt")
        prompt.clear()
        prompt.send_keys("red circle with sky blue background")
        set_number(driver, "width", 64)
        set_number(driver, "height", 64)
        set_number(driver, "seed", 1)

        # One ControlNet unit: the outline and tiny-fill's ControlNet.
        driver.find_element("id", "add_unit").click()
        units = driver.find_elements("css selector", ".cn-unit")
        if len(units) != 1:
            raise TestFailure(f"expected 1 ControlNet unit after #add_unit, found {len(units)}")
        unit = units[0]
        control = TINY_FILL / "outline.png"
        unit.find_element("css selector", ".cn-image").send_keys(str(control))
        wait_for("the control image thumbnail", PAGE_TIMEOUT_S,
                 lambda: unit.find_element("css selector", ".cn-thumb").is_displayed())
        cn_model = unit.find_element("css selector", ".cn-model")
        wanted = wait_for("tiny-fill-controlnet in the ControlNet model list", PAGE_TIMEOUT_S,
                          lambda: next((v for v in option_texts(cn_model)
                                        if v.split(" [")[0] == "tiny-fill-controlnet"), None))
        Select(cn_model).select_by_value(wanted)
        if not unit.find_element("css selector", ".cn-enabled").is_selected():
            unit.find_element("css selector", ".cn-enabled").click()

        # Generate and wait for the gallery.
        t0 = time.monotonic()
        driver.find_element("id", "generate").click()
        wait_for("a gallery image (or an error)", GENERATE_TIMEOUT_S,
                 lambda: driver.find_elements("css selector", "#gallery img") or error_text(driver),
                 poll_s=0.5)
        err = error_text(driver)
        if err:
            raise TestFailure(f"the page shows an error: {err}")
        # Let the post-generation UI settle (progress bar hidden, buttons re-enabled).
        wait_for("the Generate button to be re-enabled", PAGE_TIMEOUT_S,
                 lambda: driver.find_element("id", "generate").is_enabled())
        print(f"generated in {time.monotonic() - t0:.1f} s", flush=True)
        err = error_text(driver)
        if err:
            raise TestFailure(f"the page shows an error: {err}")

        driver.execute_script("window.scrollTo(0, 0);")
        time.sleep(0.3)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if not driver.save_screenshot(str(out_path)):
            raise TestFailure(f"could not save the screenshot to {out_path}")
        print(f"screenshot: {out_path}", flush=True)

        src = driver.find_element("css selector", "#gallery img").get_attribute("src") or ""
        prefix = "data:image/png;base64,"
        if not src.startswith(prefix):
            raise TestFailure(f"gallery image src is not a PNG data URL: {src[:60]!r}")
        size = png_size(base64.b64decode(src[len(prefix):]))
        if size != (64, 64):
            raise TestFailure(f"gallery image is {size[0]}x{size[1]}, want 64x64")
        info = driver.find_element("id", "infotext").text
        if "Steps: 20" not in info or "ControlNet 0" not in info:
            raise TestFailure(f"infotext under the image lacks 'Steps: 20' or the unit: {info!r}")
        check_circle(base64.b64decode(src[len(prefix):]))

        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        for e in severe:
            print("browser console:", e.get("message"), file=sys.stderr)
        if any("Uncaught" in (e.get("message") or "") for e in severe):
            raise TestFailure("the page threw a JavaScript exception (see browser console above)")
    finally:
        if driver is not None:
            try:
                driver.quit()
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                print(f"warning: driver.quit failed: {e}", file=sys.stderr)
        shutil.rmtree(profile, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdctl", required=True, help="path to the sdctl binary")
    ap.add_argument("--out", required=True, help="where to write the screenshot PNG")
    args = ap.parse_args()

    sdctl = Path(args.sdctl).resolve()
    out = Path(args.out).resolve()
    if not sdctl.is_file() or not os.access(sdctl, os.X_OK):
        print(f"FAIL: --sdctl {args.sdctl}: not an executable file", file=sys.stderr)
        return 1
    for p in (CHROMIUM, CHROMEDRIVER):
        if not os.access(p, os.X_OK):
            print(f"FAIL: {p} is missing (apt install chromium chromium-driver)", file=sys.stderr)
            return 1

    tmp = Path(tempfile.mkdtemp(prefix="webui-test-"))
    server = None
    try:
        models, cn = tmp / "models", tmp / "controlnet"
        models.mkdir()
        cn.mkdir()
        (models / "tiny-fill").symlink_to(TINY_FILL, target_is_directory=True)
        (cn / "tiny-fill-controlnet").symlink_to(TINY_FILL / "controlnet", target_is_directory=True)
        server = Server(sdctl, models, cn, FIXTURES / "loras")
        server.start()
        url = server.wait_url(LISTEN_TIMEOUT_S)
        print(f"server: {url}", flush=True)
        run_browser(url, out)
    except TestFailure as e:
        print(f"FAIL: {e}", file=sys.stderr)
        if server is not None and "stderr:" not in str(e):
            print("server stderr (tail):\n" + server.stderr_tail(), file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - any other failure is a failed test, with its cause
        print(f"FAIL: {type(e).__name__}: {e}", file=sys.stderr)
        if server is not None:
            print("server stderr (tail):\n" + server.stderr_tail(), file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
