"""The console served by ``vsphere-av serve`` (issue 14): the dashboard in a real browser,
scan jobs run by the controller.

Real parts: the bundled simulator, the real controller threads with the API thread that
``app.start_controller`` starts for ``[api] listen = "127.0.0.1:0"``, the real engine
(EICAR quarantined from a guest), real SQLite state, and Debian's chromium driven through
chromedriver by selenium (headless, a fresh profile, no network but loopback). The
overview's screenshot is kept in the test's tmp dir and copied to build/ for people.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from conftest import SimulatorFactory, settings_for
from controller_support import EICAR, running_controller, wait_for

from vsphere_av.api.tokens import TokenStore
from vsphere_av.app import App

VM0, VM1 = "DC0_C0_RP0_VM0", "DC0_C0_RP0_VM1"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
BUILD = Path(__file__).resolve().parents[2] / "build"
API = '[api]\nlisten = "127.0.0.1:0"\n'


def tokens_for(state: Path) -> dict[str, str]:
    with TokenStore(state_dir=state) as store:
        return {role: store.create(name=f"{role}-person", role=role, actor="tester")
                for role in ("security_admin", "auditor")}


def test_scan_jobs_through_the_api_are_run_by_the_controller(vcsim_factory: SimulatorFactory,
                                                             tmp_path: Path) -> None:
    sim = vcsim_factory()
    state = tmp_path / "state"
    settings = settings_for(sim, state, toml=API)
    tokens = tokens_for(state)
    with running_controller(settings) as rt:
        assert rt.api is not None
        assert rt.api.url.startswith("http://127.0.0.1:")
        headers = {"Authorization": f"Bearer {tokens['security_admin']}"}
        with httpx.Client(base_url=rt.api.url, timeout=30) as client:
            def listed() -> Any:
                # the first scans may write their VM before the full inventory sync lands
                vms = client.get("/api/v1/vms", headers=headers).json()["vms"]
                return vms if {v["name"] for v in vms} >= {VM0, VM1} else None

            vms = wait_for(listed, what="the controller's inventory in the state store")
            assert {v["name"] for v in vms} >= {VM0, VM1}
            queued = client.post("/api/v1/scans", json={"vms": [VM1]}, headers=headers)
            assert queued.status_code == 202, queued.text
            assert queued.json()["controller_running"] is True
            (job,) = queued.json()["jobs"]

            def finished() -> Any:
                doc = client.get(f"/api/v1/scans/{job['id']}", headers=headers).json()
                return doc if doc["state"] == "finished" else None

            doc = wait_for(finished, timeout=60, what="the scan job to finish")
            assert doc["scan"]["status"] == "clean"
            assert doc["scan"]["vm_name"] == VM1
    # stopped with the controller: nothing listens any more
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{rt.api.url}/health", timeout=5)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("chromium and chromium-driver are missing: make test installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def total_row(driver: Any) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#fleet-totals tr.total")


def log_in(driver: Any, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, 10).until(ec.url_to_be(url + "/login"))
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "login-button").click()
    WebDriverWait(driver, 10).until(ec.presence_of_element_located((By.ID, "fleet-totals")))


def test_dashboard_in_chromium(vcsim_factory: SimulatorFactory, tmp_path: Path,
                               browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    started = time.monotonic()
    sim = vcsim_factory()
    for name in ("invoice.exe", "payload.bin"):
        target = sim.guest_root / VM0 / "home" / "alice" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(EICAR)
    state = tmp_path / "state"
    settings = settings_for(sim, state, toml=API)
    with App(settings) as app:
        assert app.scan(names=[VM0, VM1]).exit_code() == 1
        items = {Path(i["path"]).name: i["id"] for i in app.quarantine_list()}
    assert set(items) == {"invoice.exe", "payload.bin"}
    tokens = tokens_for(state)
    wait = WebDriverWait(browser, 30)

    with running_controller(settings) as rt:
        url = rt.api.url
        # -- a security admin: the fleet, live, then a restore
        log_in(browser, url, tokens["security_admin"])
        assert "security_admin-person" in browser.find_element(By.ID, "who").text
        # the counts are those of the API (the controller rescans at start: the page
        # follows it live), over every VM
        headers = {"Authorization": f"Bearer {tokens['auditor']}"}

        def agree(driver: Any) -> bool:
            vms = httpx.get(f"{url}/api/v1/vms", headers=headers, timeout=30).json()["vms"]
            total = driver.find_element(By.CSS_SELECTOR, "#fleet-totals tr.total")
            shown = {c.get_attribute("data-state"): int(c.text)
                     for c in total.find_elements(By.TAG_NAME, "td")}
            return len(vms) == 2 and shown == {s: sum(1 for v in vms if v["state"] == s)
                                               for s in shown}

        wait.until(agree, "the overview's counts never matched the API's")
        hosts = {r.get_attribute("data-host") for r in browser.find_elements(
            By.CSS_SELECTOR, "#fleet-totals tr[data-host]")}
        assert len(hosts) in (1, 2)
        assert all(h.startswith("DC0_C0_H") for h in hosts)
        (cluster,) = browser.find_elements(By.CSS_SELECTOR, "#fleet-totals tr.cluster")
        assert cluster.get_attribute("data-cluster") == "DC0_C0"     # the simulator's cluster
        assert cluster.find_element(By.CSS_SELECTOR, "td[data-state=protected]").text == \
            total_row(browser).find_element(By.CSS_SELECTOR, "td[data-state=protected]").text
        rows = browser.find_elements(By.CSS_SELECTOR, "#vms tbody tr")
        assert {r.find_element(By.TAG_NAME, "a").text for r in rows} >= {VM0, VM1}
        wait.until(ec.text_to_be_present_in_element((By.ID, "live-state"), "live"),
                   "the event stream never opened")
        # an audited change shows up live on the overview through the event stream
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/api/v1/scans", json={"vms": [VM1]}, headers={
                "Authorization": f"Bearer {tokens['security_admin']}"}).status_code == 202
        wait.until(ec.text_to_be_present_in_element((By.ID, "recent-events"), "api.scan.request"),
                   "the audited change never reached the overview")
        shot = tmp_path / "console-overview.png"
        assert browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        BUILD.mkdir(exist_ok=True)
        shutil.copyfile(shot, BUILD / "console-overview.png")

        # the VM page with its detections
        browser.find_element(By.LINK_TEXT, VM0).click()
        wait.until(ec.presence_of_element_located((By.ID, "vm-detections")))
        assert browser.find_element(By.ID, "vm-state").text in ("infected", "protected")
        assert "invoice.exe" in browser.find_element(By.ID, "vm-detections").text

        browser.find_element(By.ID, "nav-quarantine").click()
        button = wait.until(ec.element_to_be_clickable(
            (By.CSS_SELECTOR, f"button.restore[data-id='{items['invoice.exe']}']")))
        button.click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "message"), "restored"),
                   "the restore did not report back")
        restored = sim.guest_root / VM0 / "home" / "alice" / "invoice.exe"
        assert restored.read_bytes() == EICAR

        # the audit page: intact, the restore with the token's name as actor
        browser.find_element(By.ID, "nav-audit").click()
        verify = wait.until(ec.presence_of_element_located((By.ID, "verify")))
        assert "intact" in verify.text
        first = browser.find_element(By.CSS_SELECTOR, "#audit tbody tr").text
        assert "api:security_admin-person" in first

        # -- an auditor: read only, and the server refuses a restore all the same
        browser.find_element(By.ID, "logout").click()
        wait.until(ec.url_to_be(url + "/login"))
        log_in(browser, url, tokens["auditor"])
        browser.get(url + "/quarantine")
        table = wait.until(ec.presence_of_element_located((By.ID, "quarantine")))
        assert "read only" in table.text
        assert not browser.find_elements(By.CSS_SELECTOR, "button.restore")
        status = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(`/api/v1/quarantine/${arguments[0]}/restore`, {method: 'POST',"
            " credentials: 'same-origin', headers: {'X-Requested-With': 'vsphere-av'}})"
            ".then((r) => done(r.status), (e) => done(String(e)));", items["payload.bin"])
        assert status == 403
        assert not (sim.guest_root / VM0 / "home" / "alice" / "payload.bin").exists()
    print(f"dashboard browser test: {time.monotonic() - started:.1f}s")
