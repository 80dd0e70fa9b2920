"""The align report in a real browser (headless Chromium): every plot and table renders, and the page asks the network
for nothing. Skips where no Chromium is installed (`make browser` installs Debian's)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
QUIET = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-pings",
    "--window-size=1200,4200",
]


class Proxy:
    """A forward proxy on loopback that answers nothing and writes down the host of every request it is sent."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                target = self.path if self.command != "CONNECT" else f"//{self.path}"
                proxy.hosts.append(re.sub(r"^\w+:", "", target).lstrip("/").split("/")[0].split(":")[0])
                self.send_response(404)
                self.end_headers()

            do_GET = do_POST = do_HEAD = do_CONNECT = _any

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def flag(self) -> str:
        return f"--proxy-server=http://127.0.0.1:{self.server.server_address[1]}"


def serve(folder: Path) -> ThreadingHTTPServer:
    """The folder over HTTP on loopback (the browser reaches loopback directly, never through the proxy)."""

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def browse(url: str, proxy: Proxy, *extra: str) -> subprocess.CompletedProcess:
    assert BROWSER is not None
    command = [BROWSER, *QUIET, proxy.flag, *extra, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(BROWSER is None, reason="no Chromium here: `make browser` installs it (apt install chromium)")
def test_the_report_renders_every_part_and_asks_the_network_for_nothing(aligned_run, tmp_path) -> None:
    folder = aligned_run["folder"].path
    (tmp_path / "blank.html").write_text("<!DOCTYPE html><title>blank</title><p>blank</p>")
    shutil.copy(folder / "report.html", tmp_path / "report.html")
    site = serve(tmp_path)
    base = f"http://127.0.0.1:{site.server_address[1]}"
    try:
        own = Proxy()  # what the browser asks for by itself, on a page that asks for nothing
        browse(f"{base}/blank.html", own, "--dump-dom")
        proxy = Proxy()
        dom = browse(f"{base}/report.html", proxy, "--dump-dom").stdout
        shot = tmp_path / "report.png"
        browse(f"{base}/report.html", proxy, f"--screenshot={shot}")
    finally:
        site.shutdown()
    assert set(proxy.hosts) <= set(own.hosts), f"the report asked for {set(proxy.hosts) - set(own.hosts)}"
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:|url\(\s*["']?https?:|<script""", dom, re.I)
    for part in ("gate", "calibration"):
        figure = re.search(rf"<figure id=\"{part}\">(.*?)</figure>", dom, re.S)
        assert figure and figure.group(1).count("<path") > 10, f"the {part} plot did not render"
    sets = len(_sets(folder))
    assert dom.count("<table") == 4 + sets  # calibration, outcomes, utility, speed, then samples per set
    assert all(name in dom for name in ("target alone", "protected", "AUROC"))
    assert shot.stat().st_size > 50_000  # a page of plots and tables, not a blank one
    keep = os.environ.get("INFERALIGNER_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / "align_report.png")


def _sets(folder: Path) -> list[str]:
    import json

    return list(json.loads((folder / ".align" / "evaluation.json").read_text())["sets"])
