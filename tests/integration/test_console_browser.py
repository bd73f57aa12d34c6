"""The console in a real Chromium (Debian's ``chromium``, driven by Playwright without
any browser download) against a real stack: open a run and watch it progress live,
resume a suspension through the generated form (errors field by field), fork with an
edited output and land on the new run, diff two runs, submit a plan, use it by keyboard
and in a narrow window, and load a run of 10,000 events (paged, never all at once).

Screenshots of each main page are kept in ``artifacts/console/`` (gitignored). Every
wait is Playwright's bounded ``expect`` on what the page shows: no sleeps."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from console_support import (  # noqa: F401
    APPROVAL,
    EXAMPLES,
    ROOT,
    Console,
    console_fixture,
    fork_request,
)
from waiting import having, until  # type: ignore[import-not-found]

from loom_cli.app import load_run_request
from loom_core.contracts import ForeachStep, Plan, RunRequest, ToolStep

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("LOOM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "artifacts" / "console"
WAIT_MS = 15_000  # the bound of every wait on the page

if not Path(CHROMIUM).exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM}: install Debian's `chromium` (make install does, as "
        "root) or set LOOM_CHROMIUM to a Chromium binary",
        allow_module_level=True,
    )

from playwright.async_api import ConsoleMessage, Page, async_playwright, expect  # noqa: E402

expect.set_options(timeout=WAIT_MS)  # every wait on the page has this bound


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM)
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(WAIT_MS)
        tab = await context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        tab.on("console", lambda msg: errors.append(msg.text) if is_error(msg) else None)
        yield tab
        await browser.close()
        assert not errors, f"the page logged errors: {errors}"


def is_error(msg: ConsoleMessage) -> bool:
    """A console error, apart from the refusals the tests ask for (409, 422): Chromium
    logs every non-2xx answer, and a wrong answer to a form is one."""
    if msg.type != "error":
        return False
    return not any(f"status of {code}" in msg.text for code in (409, 422))


async def shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def status_of(page: Page):  # noqa: ANN201 - a Playwright locator
    return page.locator("h1 .badge")


async def submit_example(c: Console, name: str) -> str:
    return (await c.client.submit(load_run_request(EXAMPLES / name, [], None))).run_id


async def test_watch_a_run_progress_live(console: Console, page: Page) -> None:
    await page.goto(console.url + "#/runs")
    await expect(page.locator("h1")).to_have_text("Runs")
    await expect(page.locator("#runs tbody")).to_contain_text("No runs match.")  # loaded
    run_id = await submit_example(console, "wait-event.yaml")
    # the list is live: the new run appears without a reload
    row = page.locator(f'tr[data-run="{run_id}"]')
    await expect(row).to_be_visible(timeout=WAIT_MS)
    await shot(page, "runs-list")

    await row.get_by_role("link", name=run_id).click()
    await expect(status_of(page)).to_have_text("running", timeout=WAIT_MS)
    await expect(page.locator('#timeline tr[data-step="paid"]')).to_contain_text("event")
    await console.client.signal("payment", "A-17", {"amount": 12})
    # the page follows the run's events: it ends without a reload
    await expect(status_of(page)).to_have_text("completed", timeout=WAIT_MS)
    await expect(page.locator('#timeline tr[data-step="receipt"]')).to_contain_text("succeeded")
    await shot(page, "run-timeline")

    for tab, marker in (("Events", "#events"), ("Calls", "#panel h2"), ("Trace", "#trace")):
        await page.get_by_role("tab", name=tab).click()
        await expect(page.locator(marker)).to_be_visible()
    await page.locator("#trace tbody button").first.click()
    await expect(page.locator("#panel h3")).to_contain_text("wait-for-payment")
    await shot(page, "run-trace")


async def test_resume_through_the_generated_form(console: Console, page: Page) -> None:
    run_id = await submit_example(console, "approval.yaml")
    await until(console.client, run_id, having("step_suspended"))
    await page.goto(console.url + "#/runs")  # what waits for people comes first
    await page.locator("#waiting").get_by_role("link", name=run_id).click()
    form = page.locator("form[data-suspension]")
    await expect(form).to_contain_text("Waiting for a person: manager")
    await expect(form).to_contain_text("Pay this invoice?")
    # what is absent is left out, never shown as the word "null"
    await expect(page.locator('section[aria-label="Run"]')).not_to_contain_text("null")

    await form.get_by_label("approved (required)").check()
    await form.get_by_label("note").fill("x" * 300)  # the schema allows 200
    await form.get_by_role("button", name="Resume").click()
    note_error = form.locator('[id$="-note-err"]')
    await expect(note_error).to_contain_text("$.note", timeout=WAIT_MS)
    await expect(form.get_by_label("note")).to_be_focused()  # the first wrong field
    await shot(page, "resume-form-errors")
    assert await status_of(page).inner_text() == "suspended"

    await form.get_by_label("note").fill("fine")
    await form.get_by_role("button", name="Resume").click()
    await expect(status_of(page)).to_have_text("completed", timeout=WAIT_MS)
    await expect(page.locator("form[data-suspension]")).to_have_count(0)
    records = await console.client.events(run_id)
    resumed = [r.event for r in records if r.kind == "step_resumed"]
    assert resumed[0].data == {"approved": True, "note": "fine"}


async def test_fork_with_an_edit_opens_the_new_run_then_diff(console: Console, page: Page) -> None:
    origin = (await console.client.submit(fork_request())).run_id
    await console.client.wait(origin, timeout=10)
    await page.goto(console.url + f"#/run/{origin}")
    await expect(status_of(page)).to_have_text("completed")
    await page.get_by_role("button", name="Replay").click()
    await expect(page.locator("#replay-result")).to_contain_text("Replay identical")
    await page.get_by_role("tab", name="Events").click()
    await page.get_by_role("button", name="State after event 4").click()
    await expect(page.get_by_role("tab", name="State")).to_have_attribute("aria-selected", "true")
    await expect(page.locator("#panel")).to_contain_text("State just after event 4 of")
    await page.get_by_role("button", name="Fork…").click()
    dialog = page.get_by_role("dialog")
    await dialog.get_by_label("Re-run from step").select_option("b")
    await dialog.get_by_label("Edit the recorded output of").select_option("a")
    output = dialog.get_by_label("New output (JSON)")
    await expect(output).to_have_value('{\n  "result": 2\n}')  # the recorded one, to edit
    await output.fill('{"result": 5}')
    await shot(page, "fork-dialog")
    await dialog.get_by_role("button", name="Fork and open").click()

    await expect(page).not_to_have_url(f"{console.url}#/run/{origin}", timeout=WAIT_MS)
    forked = page.url.split("#/run/", 1)[1]
    await expect(status_of(page)).to_have_text("completed", timeout=WAIT_MS)
    await expect(page.locator(".facts")).to_contain_text(f"Fork of{origin} from b")
    await page.get_by_text("Output", exact=True).click()
    await expect(page.locator("details pre").first).to_contain_text('"b": 50')

    await page.goto(console.url + f"#/diff?a={origin}&b={forked}")
    row = page.locator('#diff tr[data-step="b"]').first
    await expect(row).to_contain_text("20")
    await expect(row).to_contain_text("50")
    await expect(page.locator('#diff tr[data-step="a"]').first).to_contain_text("5")
    await shot(page, "diff")


async def test_submit_validates_every_problem_then_runs(console: Console, page: Page) -> None:
    await page.goto(console.url + "#/submit")
    text = page.get_by_label("Plan or run file (YAML or JSON)")
    await text.fill((EXAMPLES / "invalid-plan.yaml").read_text())
    await page.get_by_role("button", name="Validate").click()
    issues = page.locator("#plan-issues li")
    await expect(issues.first).to_contain_text("$.plan", timeout=WAIT_MS)
    assert await issues.count() >= 3
    await shot(page, "submit-problems")

    await page.locator("#plan-file").set_input_files(str(EXAMPLES / "approval.yaml"))
    await expect(text).to_have_value(APPROVAL)
    await page.get_by_role("button", name="Validate").click()
    await expect(page.locator("#plan-issues")).to_contain_text("Valid: approval with 3 step(s)")
    await page.get_by_role("button", name="Run", exact=True).click()
    await expect(page.locator("form[data-suspension]")).to_be_visible(timeout=WAIT_MS)


async def test_keyboard_and_a_narrow_window(console: Console, page: Page) -> None:
    run_id = await submit_example(console, "parallel.yaml")
    await console.client.wait(run_id, timeout=10)
    await page.set_viewport_size({"width": 380, "height": 800})
    await page.goto(console.url + f"#/run/{run_id}")
    await expect(status_of(page)).to_have_text("completed")
    # branches are grouped under their parallel step
    branch = page.locator("#timeline tr.group", has_text="profile ▸ branch name")
    await expect(branch).to_be_visible()
    await page.get_by_role("tab", name="Timeline").focus()
    await page.keyboard.press("ArrowRight")
    await expect(page.get_by_role("tab", name="Events")).to_be_focused()
    await expect(page.get_by_role("tab", name="Events")).to_have_attribute("aria-selected", "true")
    await expect(page.locator("#events")).to_be_visible()
    await page.get_by_label("Only events of kind").fill("tool_call_requested")
    await page.get_by_label("Only events of kind").press("Enter")
    kinds = page.locator("#events tbody tr td:nth-child(2)")
    await expect(kinds).to_have_count(5)  # the five tool steps of parallel.yaml
    assert set(await kinds.all_inner_texts()) == {"tool_call_requested"}
    # nothing wider than the window but the tables, which scroll inside their box
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 380, width
    await page.get_by_role("tab", name="State").click()
    await page.locator("#state-at").fill("3")
    await expect(page.locator("#panel")).to_contain_text("State just after event 3")
    await shot(page, "run-narrow")


@pytest.mark.timeout(300)  # 10,000 events to record first, on a shared machine
async def test_a_run_of_10000_events_loads_a_page_at_a_time(console: Console, page: Page) -> None:
    items = 1428  # seven events per element and seven more: 10,003 events
    plan = Plan(name="ten-thousand", steps=[ForeachStep(
        id="each", items=list(range(items)), concurrency=64,
        do=[ToolStep(id="t", tool="noop", input={})],
    )])  # fmt: skip
    run_id = (await console.client.submit(RunRequest(plan=plan))).run_id
    records = await console.client.wait(run_id, timeout=120)
    assert len(records) >= 10_000

    cpu = time.process_time()  # the console runs in this process
    started = time.perf_counter()
    await page.goto(console.url + f"#/run/{run_id}")
    await expect(status_of(page)).to_have_text("completed", timeout=60_000)
    await expect(page.locator("#timeline tbody tr").first).to_be_visible(timeout=60_000)
    first_load_s = time.perf_counter() - started
    first_cpu_s = time.process_time() - cpu
    assert await page.locator("#timeline tbody tr[data-step]").count() <= 200  # one page

    started = time.perf_counter()
    await page.reload()
    await expect(page.locator("#timeline tbody tr").first).to_be_visible(timeout=60_000)
    reload_s = time.perf_counter() - started

    await page.get_by_role("tab", name="Events").click()
    await expect(page.locator("#events tbody tr").last).to_contain_text(str(len(records)))
    assert await page.locator("#events tbody tr").count() == 100  # the newest page only
    await shot(page, "run-10000-events")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    measured = {
        "events": len(records), "first_load_s": round(first_load_s, 3),
        "first_load_console_cpu_s": round(first_cpu_s, 3), "reload_s": round(reload_s, 3),
    }  # fmt: skip
    (ARTIFACTS / "page-load-10000.json").write_text(json.dumps(measured, indent=2))
    print(f"page load of a {len(records)}-event run: {measured}")
