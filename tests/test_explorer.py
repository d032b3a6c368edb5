"""The Explorer in a real browser: headless Chromium (Debian's; scripts/setup.sh installs it)
driven by Playwright, against a real `mtkit serve` of a model trained on the demo corpus, and the
saved page of `mtkit explore` opened from a file with the network cut off. What the page shows
must be what `mtkit translate` writes and what /v1/explain answers."""

import json
import shutil

import pytest

from tests.helpers import Server, translated

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install playwright")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium "
                                                          "(scripts/setup.sh does, as root on Debian)")]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(trained):
    s = Server(trained)
    yield s
    s.stop()


@pytest.fixture
def page(browser, tmp_path):
    """A fresh page; at the end, no error on its console (and a screenshot in tmp_path)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    p = context.new_page()
    p.errors = []
    p.on("console", lambda m: p.errors.append(m.text) if m.type == "error" else None)
    p.on("pageerror", lambda e: p.errors.append(str(e)))
    yield p
    p.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
    errors = [e for e in p.errors if "Failed to load resource" not in e]  # a 4xx the page itself reports
    context.close()
    assert errors == []


def shown(page, version: int) -> int:
    """Wait until the page has drawn an answer newer than `version`; returns the new version."""
    page.wait_for_function(f"document.body.dataset.version > {version} && document.body.dataset.state === 'ready'",
                           timeout=60_000)
    return int(page.get_attribute("body", "data-version"))


def ask(page, text: str, version: int) -> int:
    page.fill("#text", text)
    return shown(page, version)


@pytest.fixture(scope="module")
def sentence(demo_dir) -> str:
    return (demo_dir / "test.en").read_text(encoding="utf-8").splitlines()[5]


def test_a_sentence_typed_shows_its_search_and_mtkit_translates_translation(page, server, sentence, cli, tmp_path,
                                                                             trained):
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('about').textContent.includes('parameters')")
    assert not page.is_visible("#target-field")  # one target language: no "Into" choice
    version = ask(page, sentence, 0)
    assert page.inner_text("#beam-translation") == translated(cli, tmp_path, trained, [sentence], "--beam", "5")[0]
    assert page.inner_text("#greedy-translation") == translated(cli, tmp_path, trained, [sentence], "--greedy")[0]
    data = page.evaluate("data")
    beam_nodes = page.locator("#beam-tree g.node").count()
    assert beam_nodes == len(data["beam"]["tree"]) > 10
    assert page.locator("#finished tbody tr").count() == 5
    out, src = len(data["beam"]["hypotheses"][0]["pieces"]), len(data["source"]["pieces"])
    assert page.locator("#cross td").count() == out * src
    assert page.locator("#decoder td.masked").count() == out * (out - 1) // 2  # the future, masked
    assert page.locator("#src-pieces .piece").count() == src
    # the step slider shows the search as it was after each step
    page.fill("#step", "1")
    page.dispatch_event("#step", "input")
    assert page.locator("#beam-tree g.node").count() == sum(n["step"] <= 1 for n in data["beam"]["tree"])
    page.click("#step-on")
    assert page.locator("#beam-tree g.node").count() == sum(n["step"] <= 2 for n in data["beam"]["tree"])
    page.focus("#beam-tree g.node.finished, #beam-tree g.node.kept >> nth=0")  # the keyboard reads a node's numbers
    assert "total log-probability" in page.inner_text("#beam-tree-info")
    # beam size 1: greedy search, and the tree and the translation change with it
    page.fill("#beam", "1")
    version = shown(page, version)
    assert page.inner_text("#beam-translation") == translated(cli, tmp_path, trained, [sentence], "--greedy")[0]
    assert page.locator("#finished tbody tr").count() == 1
    assert page.locator("#beam-tree g.node").count() != beam_nodes
    assert page.evaluate("data.settings.beam_size") == 1


def test_hovering_a_subword_lights_what_it_attended_to(page, server, sentence):
    page.goto(server.url + "/")
    ask(page, sentence, 0)
    data = page.evaluate("data")
    row = 1
    heads = data["attention"]["cross"][0]  # layer 1, the mean of its heads: the page's default
    mean = [sum(h[row][j] for h in heads) / len(heads) for j in range(len(heads[0][row]))]
    strongest = max(range(len(mean)), key=mean.__getitem__)
    page.hover(f"#cross th[data-row='{row}']")
    lit = page.eval_on_selector_all("#cross thead th.lit", "ths => ths.map(t => Number(t.dataset.col))")
    assert lit == [strongest]
    assert page.eval_on_selector_all("#src-pieces .piece.lit", "cs => cs.map(c => Number(c.dataset.index))") == [strongest]
    # and the reverse: a source subword lights the output subwords that looked at it
    page.hover(f"#cross thead th[data-col='{strongest}']")
    column = [sum(h[i][strongest] for h in heads) / len(heads) for i in range(len(heads[0]))]
    assert page.eval_on_selector_all("#cross tbody th.lit", "ths => ths.map(t => Number(t.dataset.row))") == \
           [max(range(len(column)), key=column.__getitem__)]
    # the keyboard reaches it too: a focused subword does what a hovered one does (the pointer moved
    # off first: a header that the redrawn tables put under it would take the hover after the focus)
    page.mouse.move(0, 0)
    page.select_option("#head", "0")
    page.focus("#encoder th[data-row='0']")
    weights = page.evaluate("data.attention.encoder[0][0][0]")
    assert page.eval_on_selector_all("#encoder thead th.lit", "ths => ths.map(t => Number(t.dataset.col))") == \
           [max(range(len(weights)), key=weights.__getitem__)]


def test_what_if_scores_the_models_translation_as_the_search_did(page, server, sentence):
    page.goto(server.url + "/")
    version = ask(page, sentence, 0)
    best = page.evaluate("data.beam.hypotheses[0]")
    page.fill("#whatif-text", best["text"])
    page.press("#whatif-text", "Enter")
    version = shown(page, version)
    assert page.get_attribute("#whatif-summary", "data-score") == f"{best['score']:.4f}"
    assert page.locator("#whatif-table tbody tr").count() == len(best["pieces"])
    page.fill("#whatif-text", "Zorblax quib.")
    page.click("#whatif-go")
    shown(page, version)
    assert "parts from the model's choice at subword" in page.inner_text("#whatif-summary")
    assert page.locator("#whatif-table tr.parts").count() >= 1


def test_bad_input_gets_a_clear_answer_on_the_page(page, server, sentence):
    page.goto(server.url + "/")
    version = ask(page, sentence, 0)
    for control, value, said in (("#text", "   ", "Type a sentence"), ("#beam", "0", "Beam size: a whole number"),
                                 ("#beam", "17", "Beam size: a whole number"), ("#alpha", "-1", "Length penalty")):
        page.fill(control, value)
        page.wait_for_function("document.body.dataset.state === 'error'")
        assert said in page.inner_text("#error") and page.is_visible("#error")
        page.fill("#text", sentence), page.fill("#beam", "5"), page.fill("#alpha", "0.6")
        version = shown(page, version)
    page.fill("#whatif-text", "la " * 200)
    page.click("#whatif-go")
    page.wait_for_function("document.body.dataset.state === 'error'")
    assert "translation: the what-if translation has" in page.inner_text("#error")
    page.fill("#whatif-text", "")
    page.fill("#text", " ".join([sentence] * 40))  # longer than the model's positions: cut, and said
    shown(page, version)
    assert "only its first" in page.inner_text("#warnings")


def test_a_server_that_went_away_is_said(page, trained, sentence):
    s = Server(trained)
    page.goto(s.url + "/")
    version = ask(page, sentence, 0)
    assert s.stop() == 0
    page.fill("#text", sentence + " Again.")
    page.wait_for_function("document.body.dataset.state === 'error'", timeout=30_000)
    assert "does not answer" in page.inner_text("#error")
    assert int(page.get_attribute("body", "data-version")) == version  # the last answer stays drawn


def test_the_saved_page_works_from_a_file_with_no_network(page, cli, trained, sentence, tmp_path):
    html = tmp_path / "explore.html"
    code, out, err = cli("explore", trained, sentence, "-o", html, "--beam", "3", "--whatif", "A dog.")
    assert code == 0, err
    asked = []
    page.route("**/*", lambda route: (asked.append(route.request.url), route.abort()
                                      if not route.request.url.startswith("file:") else route.continue_()))
    page.goto(html.as_uri())
    shown(page, 0)
    assert [u for u in asked if not u.startswith("file:")] == []
    assert page.inner_text("#beam-translation") == translated(cli, tmp_path, trained, [sentence], "--beam", "3")[0]
    assert all(page.is_disabled(c) for c in ("#text", "#beam", "#alpha", "#whatif-text", "#whatif-go"))
    assert page.locator("#beam-tree g.node").count() > 5 and page.locator("#whatif-table tbody tr").count() > 1
    page.select_option("#layer", "1")  # what needs no model still works
    page.hover("#cross th[data-row='0']")
    assert page.locator("#cross thead th.lit").count() == 1


def test_every_control_has_a_label(page, server):
    page.goto(server.url + "/")
    unlabeled = page.evaluate("""[...document.querySelectorAll('input, select, textarea, button')]
        .filter(c => !(c.labels && c.labels.length) && !c.getAttribute('aria-label') && !c.textContent.trim())
        .map(c => c.id)""")
    assert unlabeled == []
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "text"  # the first stop is the sentence


def test_the_commands_of_docs_explorer_md(trained, cli, tmp_path):
    """docs/explorer.md's block, run: its `mtkit serve` (on a free port), its `mtkit explore` (in
    tmp_path) and its curl line against that server."""
    import shlex
    import subprocess

    from tests.conftest import REPO
    from tests.helpers import blocks, commands

    (block,) = [body for mark, lang, body in blocks(REPO / "docs" / "explorer.md") if lang == "bash"]
    lines = commands(block)
    serve, explore, curl = (next(line for line in lines if line.startswith(start))
                            for start in ("mtkit serve", "mtkit explore", "curl "))
    s = Server(trained, *shlex.split(serve)[3:])
    try:
        argv = [str(trained) if a == "runs/demo" else str(tmp_path / a) if a.endswith(".html") else a
                for a in shlex.split(explore)[1:]]
        code, out, err = cli(*argv)
        assert code == 0, err
        assert "explorer -> " in out + err and (tmp_path / "explorer.html").stat().st_size > 10_000
        answer = json.loads(subprocess.run(shlex.split(curl.replace("localhost:8000", s.url.removeprefix("http://"))),
                                           capture_output=True, text=True, timeout=60, check=True).stdout)
        assert answer["settings"]["beam_size"] == 3 and answer["whatif"]["text"] == "Draka ko vet."
        assert answer["beam"]["translation"] == s.translate(["The dog follows the cat."], beam_size=3)[1]["translations"][0]
    finally:
        assert s.stop() == 0


def test_a_model_of_several_target_languages_offers_the_choice(page, multi_run, three_way):
    from mtkit.translate import Translator

    _, workdir = multi_run
    line = (three_way / "test.en").read_text(encoding="utf-8").splitlines()[2]
    translator = Translator.load(workdir)
    s = Server(workdir)
    try:
        page.goto(s.url + "/")
        page.wait_for_function("!document.getElementById('target-field').hidden")
        assert page.eval_on_selector_all("#target option", "os => os.map(o => o.value)") == ["sv", "vs"]
        version = ask(page, line, 0)
        assert page.inner_text("#beam-translation") == translator.translate([line], "sv")[0]
        assert page.evaluate("data.source.pieces.slice(0, 2)") == ["▁", "<2sv>"]
        page.select_option("#target", "vs")
        shown(page, version)
        assert page.inner_text("#beam-translation") == translator.translate([line], "vs")[0]
    finally:
        assert s.stop() == 0
