"""The report of a small real run, opened in headless Chromium with no network.

Chromium is Debian's ``chromium`` package, installed by ``scripts/ensure_chromium.sh`` (``make
test`` and ``.ci/run`` call it). Without it the tests skip with the reason, except where
``MMPIPE_REQUIRE_CHROMIUM=1`` (CI), where a missing browser fails them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmcore import graph, report, tables
from tests.conftest import demo_config
from tests.test_report import build, extend_run

# The flags the issue fixes, plus the ones that keep Chromium from reaching out or writing to $HOME.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-quic", "--disable-component-update", "--disable-sync"]


def _chromium() -> str | None:
    for c in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if c and os.access(c, os.X_OK):
            return c
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = _chromium()
    if exe is None:
        why = "Chromium not found (/usr/bin/chromium): run scripts/ensure_chromium.sh, which `make test` calls"
        if os.environ.get("MMPIPE_REQUIRE_CHROMIUM") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return exe


def _browse(exe: str, page: Path, tmp: Path, *action: str) -> str:
    profile = tmp / f"chromium-profile-{len(list(tmp.glob('chromium-profile-*')))}"
    cmd = [exe, *FLAGS, f"--user-data-dir={profile}", *action, page.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp)})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, synth_small, prefect_harness):
    """The real flow as far as it goes without training (minutes on CPU), the rest as artifacts."""
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("browser")
    cfg = demo_config(synth_small / "manifest.csv", tmp / "run")
    real = [s for s in graph.ORDER if graph.ORDER.index(s) <= graph.ORDER.index("split")]
    pipeline(cfg, until=real[-1])
    extend_run(cfg, "evaluate")
    return cfg, build(cfg.run_dir, cfg), real


def _body_attrs(dom: str) -> dict[str, str]:
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'([\w-]+)="([^"]*)"', body))


def test_every_section_renders_and_every_image_loads(chromium, real_run, tmp_path):
    cfg, path, real = real_run
    dom = _browse(chromium, path, tmp_path, "--dump-dom")
    for sid in report.SECTIONS:
        assert re.search(rf'<section id="{sid}" data-status="ok"', dom), sid
    attrs = _body_attrs(dom)  # set by the page's inline script after the load event
    n_img = path.read_text().count("<img ")
    assert int(attrs["data-images"]) == n_img > 30
    assert attrs["data-broken-images"] == "0"
    # Stages the real flow ran show their own stats.
    for s in real:
        st = tables.read_json(tables.StagePaths.of(cfg.run_dir, s).stats)
        assert f'data-key="{s}.n_kept" data-value="{st["n_kept"]}"' in dom


def test_a_broken_image_would_be_counted(chromium, real_run, tmp_path):
    page = tmp_path / "broken.html"
    text = real_run[1].read_text()
    page.write_text(text.replace("<main>", '<main><img src="data:image/png;base64,iVBORw0KGgo=" alt="broken">', 1))
    attrs = _body_attrs(_browse(chromium, page, tmp_path, "--dump-dom"))
    assert attrs["data-broken-images"] == "1"


def test_screenshot_is_saved_under_the_run(chromium, real_run, tmp_path):
    cfg, path, _ = real_run
    shot = cfg.run_dir / "report" / "screenshot.png"
    _browse(chromium, path, tmp_path, f"--screenshot={shot}", "--window-size=1280,4000")
    with Image.open(shot) as im:
        assert im.size == (1280, 4000)
        px = np.asarray(im.convert("L").resize((64, 200)))
    assert px.std() > 10  # not a blank page: the nav bar, tables and charts are drawn


def test_report_numbers_of_the_real_flow_equal_its_stats_and_the_run_is_fresh(real_run):
    from mmcore.stale import stale
    from tests.test_report import parse

    cfg, path, real = real_run
    page = parse(path)
    for s in real:
        st = tables.read_json(tables.StagePaths.of(cfg.run_dir, s).stats)
        for k in ("n_rows", "n_kept", "n_quarantined"):
            assert page.value(f"{s}.{k}") == st[k]
        for reason, n in st["reasons"].items():
            assert page.value(f"{s}.reasons.{reason}") == n
    # The digests the task layer records are the ones stale() recomputes.
    by = {r["stage"]: r["status"] for r in stale(cfg.run_dir, cfg)}
    assert all(by[s] == "fresh" for s in real), by
