"""The hub's web pages in a real headless Chromium (Debian's), driven by Playwright: the card's
tables, a working branch selector, file sizes and download links. A screenshot is written to
$QUANTPUB_SCREENSHOTS (default: the test's temp dir) for a person to look at."""

from __future__ import annotations

import os
import shutil
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from conftest import FIXTURES, HUB_TOKEN
from test_hub_trees import api_and_git_agree  # noqa: F401 - autouse: the API and git serve the same trees

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = "quantpub/tulu-7b-GPTQ"
BRANCH = "gptq-4bit-32g-actorder_True"


@pytest.fixture
def hub(tmp_path, local_hub_online):
    from quantpub.hub import HubConfig, start_in_thread
    from quantpub.hub.auth import Users

    server, _ = start_in_thread(HubConfig(tmp_path / "hub", users=Users.from_tokens({HUB_TOKEN: "quantpub"})))
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def published(hub, tmp_path):
    """The golden Tulu GPTQ card on main (links made site-relative, as `quantpub run` renders them for
    its hub), a variant branch with an LFS file, and a card that tries to run a script."""
    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    api.create_repo(REPO)
    card = (FIXTURES / "cards" / "tulu-7b" / "GPTQ.md").read_text().replace("https://huggingface.co/", "/")
    card += "\n<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">\n"
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=REPO)
    for branch in (BRANCH, "gptq-8bit-128g-actorder_False"):
        api.create_branch(REPO, branch=branch)
    weights = os.urandom(1_234_567)
    api.upload_file(path_or_fileobj=weights, path_in_repo="model.safetensors", repo_id=REPO, revision=BRANCH)
    return weights


@pytest.mark.slow
def test_repo_page_card_tables_and_branch_selector_in_chromium(hub, published, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[test]'")
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: run scripts/install-test-tools.sh")
    shots = Path(os.environ.get("QUANTPUB_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=FLAGS, viewport={"width": 1280,
                                                                                            "height": 1400})
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{hub.url}/")
            assert page.locator("#repo-list a").all_inner_texts() == [REPO]
            page.click(f"#repo-list a:text('{REPO}')")
            page.wait_for_url(f"{hub.url}/{REPO}")
            assert page.locator("#repo-name").inner_text() == "tulu-7b-GPTQ"
            table = page.locator("#card table").first
            headers = table.locator("thead th").all_inner_texts()
            assert headers[:4] == ["Branch", "Bits", "GS", "Act Order"]
            rows = table.locator("tbody tr")
            assert rows.count() == 6
            assert rows.nth(1).locator("td").first.inner_text() == BRANCH
            assert "git clone --single-branch --branch" in page.locator("#card").inner_text()
            assert page.evaluate("window.__pwned") is None  # the card's script and handler were removed
            assert page.locator("#card script").count() == 0
            options = page.locator("#branch-select option").all_inner_texts()
            assert options == ["gptq-4bit-32g-actorder_True", "gptq-8bit-128g-actorder_False", "main"]
            page.screenshot(path=str(shots / "hub-repo-page.png"), full_page=False)
            table.screenshot(path=str(shots / "hub-card-table.png"))

            page.select_option("#branch-select", label=BRANCH)  # the selector navigates to that branch
            page.wait_for_url(f"{hub.url}/{REPO}/tree/{BRANCH}")
            row = page.locator('#files tr.file[data-path="model.safetensors"]')
            assert row.locator("td.num").inner_text() == "1.2 MB"
            assert row.locator("td.num").get_attribute("data-bytes") == str(len(published))
            href = row.locator("a.download").get_attribute("href")
            assert href == f"/{REPO}/resolve/{BRANCH}/model.safetensors"
            assert page.locator("#branch-select").input_value().endswith(f"/tree/{BRANCH}")
            page.screenshot(path=str(shots / "hub-tree-page.png"), full_page=False)

            page.click("#card table tbody tr:nth-child(1) td a")  # the card's own link to a branch
            page.wait_for_url(f"{hub.url}/{REPO}/tree/main")
            assert page.locator('#files tr.file[data-path="README.md"]').count() == 1
            page.goto(f"{hub.url}/{REPO}/commits/{BRANCH}")
            assert page.locator("#commits li").count() == 3
            page.click("a:text('quantpub')")
            assert page.locator("#repo-list a").all_inner_texts() == [REPO]
            page.goto(f"{hub.url}/quantpub/nope")
            assert page.locator("#error").inner_text().startswith("Repository Not Found")
            assert errors == []
        finally:
            browser.close()
    with urllib.request.urlopen(f"{hub.url}{href}") as resp:
        assert resp.read() == published
    with urllib.request.urlopen(f"{hub.url}/api/models/{REPO}") as resp:
        assert resp.headers["Content-Type"] == "application/json"  # the API keeps answering JSON


def test_model_index_is_an_evaluation_table_and_card_tables_scroll():
    from quantpub.hub.cards import evaluation_results, render_card

    card = render_card((FIXTURES / "cards" / "tulu-7b" / "GPTQ-evaluated.md").read_text())
    assert "model-index" not in card.meta and card.meta["base_model"] == "allenai/tulu-7b"
    assert len(card.results) == 12 and card.results[0] == {
        "model": "tulu-7b", "task": "text-generation", "dataset": "wikitext-2-raw-v1 test",
        "metric": "perplexity (main)", "value": "10.4602", "verified": False}
    assert card.html.count('<div class="table-scroll"><table>') == card.html.count("<table>") >= 3
    # a model-index of the wrong shape is skipped, never an error; nested metadata stays out of the box
    assert evaluation_results("x") == evaluation_results([1, {"results": "x"}, {"results": [{"metrics": [
        {"name": "m"}, {"value": [1]}, {"value": True}]}]}]) == []
    odd = render_card("---\nmodel-index: {a: 1}\nwidget: [{text: hi}]\nlicense: mit\ntags: [a, 2]\n---\nbody\n")
    assert odd.meta == {"license": "mit", "tags": ["a", 2]} and odd.results == []


@pytest.mark.slow
def test_evaluation_results_and_a_wide_table_that_scrolls_inside_the_page_in_chromium(hub, tmp_path):
    from playwright.sync_api import sync_playwright

    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    api.create_repo(REPO)
    card = (FIXTURES / "cards" / "tulu-7b" / "GPTQ-evaluated.md").read_text().replace("https://huggingface.co/", "/")
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=REPO)
    shots = Path(os.environ.get("QUANTPUB_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 1400})
            page.goto(f"{hub.url}/{REPO}")
            evals = page.locator("#evaluation-results table")
            assert evals.locator("thead th").all_inner_texts() == ["Metric", "Value", "Dataset", "Task"]
            assert evals.locator("tbody tr").count() == 12
            assert evals.locator("tbody tr").first.locator("td").all_inner_texts() == [
                "perplexity (main)", "10.4602", "wikitext-2-raw-v1 test", "text-generation"]
            box = page.locator("dl.meta").inner_text()
            assert "model-index" not in box and "{'name'" not in box and "allenai/tulu-7b" in box
            page.screenshot(path=str(shots / "hub-evaluation-results.png"))

            sizes = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            assert sizes[0] <= sizes[1], f"the page itself scrolls sideways: {sizes}"
            wide = page.locator("#card .table-scroll").filter(has=page.locator("th", has_text="KLD")).first
            overflow = wide.evaluate("el => [el.scrollWidth, el.clientWidth, getComputedStyle(el).overflowX]")
            assert overflow[0] > overflow[1] and overflow[2] == "auto", overflow
            last = wide.locator("thead th").last
            assert last.inner_text() == "Memory"
            wide.scroll_into_view_if_needed()

            def shown() -> bool:  # the last column lies within the scroll box
                cell, frame = last.bounding_box(), wide.bounding_box()
                return cell["x"] + cell["width"] <= frame["x"] + frame["width"] + 1

            assert not shown()
            page.screenshot(path=str(shots / "hub-wide-table-before-scroll.png"))
            wide.evaluate("el => { el.scrollLeft = el.scrollWidth; }")
            assert shown()
            page.screenshot(path=str(shots / "hub-wide-table-scrolled.png"))
        finally:
            browser.close()
