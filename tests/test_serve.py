"""``imgrag serve``: the page's server side on scripted models (one writer per thread, the review answered by
clicks, what the page may show), and the page itself in a real browser (Selenium + Debian's chromium and
chromium-driver) on the tiny profile, continuing a thread that the terminal chat started."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from agent.chat import ChatSession
from agent.runner import Runner, open_checkpointer
from agent.thread_lock import thread_writer
from imgrag.errors import UserError
from imgrag.settings import load_settings
from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeVerdict, MemoryStore, ScriptedJudge
from tests.ports import ServerDidNotStart, start_server, stop

REPO = Path(__file__).resolve().parent.parent
NO_CRADLE = FakeVerdict(False, ["a wooden cradle", "a retriever"], "no cradle")


@pytest.fixture
def settings(tmp_path: Path):
    settings = load_settings("default", environ={"IMGRAG_HOME": str(tmp_path / "home")})
    settings.generation.seed = 4
    return settings


def fake_runner(settings, tmp_path: Path) -> Runner:
    """A runner on scripted models whose store holds two pictures (ref-cradle, ref-retriever)."""
    models = {"generator": FakeGenerator(), "judge": ScriptedJudge([NO_CRADLE]), "embedder": FakeEmbedder()}
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    return Runner(settings, manager=FakeManager(models), reference_store=MemoryStore(refs),
                  checkpointer=open_checkpointer(settings.threads_db))


# ----- one writer per thread -----

def test_a_thread_busy_in_another_process_is_neither_written_nor_closed(settings, tmp_path: Path) -> None:
    runner = fake_runner(settings, tmp_path)
    first = ChatSession(runner, planner="fixed", rounds=1)
    first.send("a retriever and a cradle")
    thread = first.thread_id
    other = ChatSession(runner, planner="fixed", rounds=1)
    assert other.open(thread)["requests"] == ["a retriever and a cradle"]
    # Another process runs a request on the thread: it holds the writer lock (a separate open file here).
    with thread_writer(settings.threads_db, thread):
        with pytest.raises(UserError, match=f"thread {thread} is busy"):
            other.send("make the cradle wooden")
        with pytest.raises(UserError, match="is busy"):
            other.undo()
        # A thread whose request runs elsewhere looks unfinished but is not cut off: it is left alone.
        runner.graph().update_state({"configurable": {"thread_id": thread}}, {"stop_reason": None}, as_node="tools")
        assert runner.graph().get_state({"configurable": {"thread_id": thread}}).next
        assert other.settle_cut_off() is None
    assert other.settle_cut_off() is not None  # once nobody holds it, an unfinished request is closed
    result = other.send("make the cradle wooden")
    assert result["prompt"] == "a retriever and a cradle; make the cradle wooden"


# ----- the page's server side -----

needs_gradio = pytest.mark.skipif(importlib.util.find_spec("gradio") is None,
                                  reason="the web extra is not installed (pip install 'imgrag[web]')")


def drain(stream) -> tuple[list[dict], tuple[str, object]]:
    items = list(stream)
    return [item for kind, item in items if kind == "event"], items[-1]


@needs_gradio
def test_a_request_streams_events_and_the_review_is_answered_by_clicks(settings, tmp_path: Path) -> None:
    from agent.frontends.web import WebChat, fresh_page

    web = WebChat(settings, planner="fixed", rounds=2, runner=fake_runner(settings, tmp_path))
    page = fresh_page(web.rounds)
    page["approve"] = True
    events, last = drain(web.stream(page, lambda session: session.send("a retriever and a cradle")))
    assert last == ("paused", None) and page["thread_id"].startswith("chat-")
    assert [e["tool"] for e in events if e["event"] == "tool_end"] == ["generate", "critique", "retrieve"]
    view = web.thread_view(page)
    assert view["review"]["proposed"] == ["ref-cradle", "ref-retriever"]
    assert [value for _, value in view["review"]["choices"]] == ["ref-cradle", "ref-retriever"]
    assert "the judge misses: a wooden cradle, a retriever" in view["rounds"]
    # The pictures of the run folder go to the page as paths; store pictures as thumbnails opened here.
    (path, caption), = view["candidates"]
    assert Path(path).is_relative_to(Path(settings.output_dir).resolve()) and caption.startswith("c0 · the judge")
    assert all(isinstance(image, Image.Image) for image, _ in view["references"])
    assert [caption.split(" ")[0] for _, caption in view["references"]] == ["#1", "#2"]

    # Unchecking reference 2 and pressing the button: the redraw uses exactly the checked one.
    answer = {"reference_ids": ["ref-cradle"], "references": {}}
    events, (kind, result) = drain(web.stream(page, lambda session: session.answer_pending(), answer))
    assert kind == "result" and result["status"] == "budget_exhausted"
    assert result["candidates"][1]["reference_ids"] == ["ref-cradle"]
    assert web.thread_view(page)["review"] is None
    web.write_report(result)
    assert "report.html" in web.thread_view(page)["report"]
    history = web.history(page)
    assert history[0] == {"role": "user", "content": "a retriever and a cradle"}
    assert any(isinstance(m["content"], dict) and m["content"]["path"].endswith(".png") for m in history)


@needs_gradio
def test_stop_ends_the_running_request_and_keeps_the_thread(settings, tmp_path: Path) -> None:
    from agent.frontends.web import WebChat, fresh_page

    web = WebChat(settings, planner="fixed", rounds=3, runner=fake_runner(settings, tmp_path))
    page = fresh_page(web.rounds)
    seen = []
    for kind, item in web.stream(page, lambda session: session.send("a retriever and a cradle")):
        seen.append((kind, item))
        if kind == "event" and item["event"] == "tool_end" and item["tool"] == "critique":
            web.stop(page)  # the Stop button, pressed while the agent works
    kind, result = seen[-1]
    assert kind == "result" and result["stopped"] and result["final_candidate"] == "c0"
    assert web.running == {} and web.thread_view(page)["header"].count("1 request(s)") == 1
    assert "Stopped: the thread keeps everything" in web.result_messages(result)[0]["content"]


@needs_gradio
def test_stop_in_one_tab_stops_only_that_tabs_request(settings, tmp_path: Path) -> None:
    """Two tabs, each with a request running at once on the shared runner: Stop in tab A ends A's request (reported
    as stopped); B's goes on to its end."""
    from agent.frontends.web import WebChat, fresh_page

    gate, a_drawing = threading.Event(), threading.Event()

    class GatedGenerator(FakeGenerator):
        """Tab A's redraw waits at the gate: A's request is mid-drawing while B's starts and A's Stop is pressed."""

        def generate(self, prompt: str, **kwargs):
            if "retriever" in prompt and kwargs.get("references"):
                a_drawing.set()
                assert gate.wait(60)
            return super().generate(prompt, **kwargs)

    runner = fake_runner(settings, tmp_path)
    runner.manager.models["generator"] = GatedGenerator()
    web = WebChat(settings, planner="fixed", rounds=3, runner=runner)
    tab_a, tab_b = fresh_page(web.rounds), fresh_page(web.rounds)
    outcomes: dict[str, tuple[str, object]] = {}

    def run_a() -> None:
        for kind, item in web.stream(tab_a, lambda session: session.send("a retriever and a cradle")):
            outcomes["a"] = (kind, item)

    other = threading.Thread(target=run_a)
    other.start()
    assert a_drawing.wait(60)
    stopped = False
    for kind, item in web.stream(tab_b, lambda session: session.send("a kettle on a stove")):
        if kind == "event" and not stopped:
            web.stop(tab_a)  # tab A's Stop button, pressed while both tabs' requests run
            stopped = True
            gate.set()
        outcomes["b"] = (kind, item)
    gate.set()
    other.join(120)
    assert tab_a["tab"] != tab_b["tab"]
    kind, result_a = outcomes["a"]
    assert kind == "result" and result_a["stopped"], result_a  # stopped mid-drawing: a stop, not an error
    assert "Stopped: the thread keeps everything" in web.result_messages(result_a)[0]["content"]
    kind, result_b = outcomes["b"]
    assert kind == "result" and not result_b.get("stopped") and result_b["status"] in ("matched", "budget_exhausted"), \
        result_b
    assert web.running == {}


@needs_gradio
def test_errors_are_one_line_and_nothing_outside_the_run_folders_is_served(settings, tmp_path: Path) -> None:
    from agent.frontends.web import WebChat, error_text, fresh_page

    web = WebChat(settings, planner="fixed", rounds=1, runner=fake_runner(settings, tmp_path))
    page = fresh_page(1)
    _, last = drain(web.stream(page, lambda session: session.send("   ")))
    assert last == ("error", "error: the message is empty; describe the picture, or say what to change")

    def broken(session):
        raise RuntimeError("the GPU caught fire")

    _, (kind, text) = drain(web.stream(page, broken))
    assert kind == "error" and text.startswith("error: RuntimeError: the GPU caught fire; the details are in ")
    assert "Traceback" not in text and "Traceback" in web.error_log.read_text()
    assert error_text(UserError("no such thread"), web.error_log) == "error: no such thread"
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (600, 300), "red").save(outside)
    assert not web.servable(outside) and web.servable(Path(settings.output_dir) / "run" / "c0.png")
    shown = web.picture(str(outside))  # a store picture (anywhere on disk) is re-encoded, never served by path
    assert isinstance(shown, Image.Image) and max(shown.size) == 256


@needs_gradio
def test_the_pages_drawing_options_reach_the_requests_and_a_bad_one_is_one_line(settings, tmp_path: Path) -> None:
    from agent.frontends.web import DEFAULT_SCHEDULER, WebChat, fresh_page, page_drawing

    runner = fake_runner(settings, tmp_path)
    web = WebChat(settings, planner="fixed", rounds=1, runner=runner)
    assert page_drawing(settings, "", None, DEFAULT_SCHEDULER, 1) == {}  # left as they came: the thread's own
    page = fresh_page(1)
    page["drawing"] = page_drawing(settings, " blurry ", 6, "Euler a", 2)
    assert page["drawing"] == {"negative_prompt": "blurry", "guidance": 6.0, "scheduler": "Euler a", "per_round": 2}
    _, (kind, result) = drain(web.stream(page, lambda session: session.send("a retriever and a cradle")))
    assert kind == "result" and result["drawing"] == {**page["drawing"], "loras": []}
    assert [c["round"] for c in result["candidates"]] == [1, 1]  # two drawings in the one round
    page["drawing"] = page_drawing(settings, "", None, "Euler b", 1)
    with pytest.raises(UserError, match="unknown scheduler 'Euler b'"):
        web.session(page)


# ----- the page in a real browser -----

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_MISSING = (None if CHROMIUM and Path(CHROMEDRIVER).exists() else
                   "Debian's chromium and chromium-driver are not installed (apt-get install -y chromium "
                   "chromium-driver)")


def status_of(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture
def serve_env(tiny_kit: dict[str, Path], tmp_path: Path) -> dict[str, str]:
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, name in enumerate(("cradle", "retriever", "rocket")):
        Image.new("RGB", (32, 32), (80 * i, 120, 40)).save(refs / f"{name}.png")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_TEST_", "IMGRAG_"))}
    env.update({"IMGRAG_HOME": str(tmp_path / "home"), "IMGRAG_TINY_KIT_DIR": str(tiny_kit["generator"].parent),
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "NO_COLOR": "1"})
    # A real store of those pictures (tests/chat_launcher.py no longer stubs the store), indexed by the tiny CLIP.
    subprocess.run([sys.executable, "-m", "agent.frontends.cli", "index", str(refs), "--profile", "tiny"],
            cwd=str(REPO),
                   env=env, check=True, capture_output=True)
    return env


def terminal_chat(env: dict[str, str], *lines: str, thread: str, new: bool = False) -> str:
    """``imgrag chat`` on piped input (its plain line reader), one request per line; returns its output. ``new``:
    ``thread`` names a new thread (``--new``)."""
    done = subprocess.run([sys.executable, "-m", "tests.chat_launcher", "--profile", "tiny", "--max-rounds", "1",
                           "--thread", thread, *(["--new"] if new else [])],
                          input="\n".join([*lines, "/quit"]) + "\n", cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stdout + done.stderr
    return done.stdout


def test_serve_without_the_web_extra_says_how_to_install_it(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['gradio'] = None; from agent.frontends.cli.app import main; "
            "main(['serve', '--profile', 'tiny'])")  # None in sys.modules: importing gradio fails, as uninstalled
    done = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=120,
                          env={**os.environ, "IMGRAG_HOME": str(tmp_path / "home")})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "error: imgrag serve needs Gradio: pip install 'imgrag[web]'" in done.stderr  # brackets kept


@needs_gradio
def test_serve_refuses_a_busy_port_in_one_line_and_warns_off_loopback(serve_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "agent.frontends.cli", "serve", "--profile", "tiny", "--host",
                "0.0.0.0",
                               "--port", str(port)], cwd=str(REPO), env=serve_env, capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "warning: serving on 0.0.0.0: anyone who can reach this address" in done.stderr
    assert f"error: cannot serve on 0.0.0.0:{port}: the port is already in use" in done.stderr
    assert "--port N" in done.stderr and "GRADIO_SERVER_PORT" not in done.stderr


@pytest.mark.slow
@needs_gradio
@pytest.mark.skipif(BROWSER_MISSING is not None, reason=BROWSER_MISSING or "")
def test_the_page_in_a_browser_continues_a_terminal_thread(serve_env: dict[str, str], tmp_path: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    terminal = terminal_chat(serve_env, "a dog and a cradle", thread="chat-from-terminal", new=True)
    assert "picture:" in terminal
    log = (tmp_path / "serve.log").open("w")
    try:  # the server is up once its port answers
        server, port = start_server(lambda port: [sys.executable, "-m", "tests.serve_launcher", "--profile", "tiny",
                                                  "--port", str(port), "--max-rounds", "2"],
                                    timeout=180, poll=0.5, cwd=str(REPO), env=serve_env, stdout=log,
                                    stderr=subprocess.STDOUT)
    except ServerDidNotStart as exc:
        log.close()
        pytest.fail(f"{exc}: {(tmp_path / 'serve.log').read_text()}")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(arg)
    driver = None
    try:
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        wait = WebDriverWait(driver, 300)  # generous: CI machines may be busy

        def text_of(element_id: str) -> str:
            return driver.find_element(By.ID, element_id).text

        def say(text: str) -> None:
            box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#message textarea"))
            box.send_keys(text)
            driver.find_element(By.ID, "send").click()

        # A new thread on the page: candidates with verdicts, references with scores, the best picture, and the
        # drawing's live preview; a negative prompt typed in the drawing options reaches the drawings.
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#drawing-options button"))
        driver.find_element(By.CSS_SELECTOR, "#drawing-options button").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#negative textarea").is_displayed())
        driver.find_element(By.CSS_SELECTOR, "#negative textarea").send_keys("blurry, watermark")
        say("a retriever and a cradle")
        wait.until(lambda d: "best:" in text_of("chat"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))
        assert "live preview, step 1/2" in text_of("preview")
        assert "the judge" in text_of("rounds") and "c1" in text_of("rounds")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#candidates img")) == 2
        assert len(driver.find_elements(By.CSS_SELECTOR, "#references img")) >= 1
        assert re.search(r"#1 \S+\.png · score -?\d\.\d{3}", text_of("references"))  # the real tiny CLIP's score
        assert driver.find_elements(By.CSS_SELECTOR, "#best img")
        assert "tiny profile" in text_of("chat") and "Traceback" not in driver.page_source
        driver.save_screenshot(str(tmp_path / "serve.png"))
        page_thread = text_of("thread").split()[1]
        assert page_thread.startswith("chat-") and page_thread != "chat-from-terminal"
        from imgrag.records.provenance import read_provenance

        drawn = Path(serve_env["IMGRAG_HOME"]) / "runs" / page_thread / "candidates" / "c0.png"
        assert read_provenance(drawn)["negative_prompt"] == "blurry, watermark"
        # The report link works; nothing outside the run folders is served, the thread database included.
        link = driver.find_element(By.CSS_SELECTOR, "#report a").get_attribute("href")
        assert status_of(link) == 200 and "report.html" in link
        home = Path(serve_env["IMGRAG_HOME"])
        for secret in ("/etc/passwd", home / "threads.sqlite", home / "runs" / ".." / "threads.sqlite"):
            assert status_of(f"http://127.0.0.1:{port}/gradio_api/file={secret}") == 403

        # The terminal's thread continues on the page, from its best picture, with the refined prompt.
        driver.get(f"http://127.0.0.1:{port}/?thread=chat-from")
        wait.until(lambda d: "chat-from-terminal" in text_of("thread"))
        assert "a dog and a cradle" in text_of("chat")
        say("make the cradle wooden")
        wait.until(lambda d: "a dog and a cradle; make the cradle wooden" in text_of("thread")
                   and "best:" in text_of("chat"))
        assert "2 request(s)" in text_of("thread")
        # A mistake is one line on the page, not a stack trace.
        say("use reference 9")
        wait.until(lambda d: "error: there is no reference 9" in text_of("chat"))
        assert "Traceback" not in driver.page_source
        driver.save_screenshot(str(tmp_path / "serve-terminal-thread.png"))
        # Undo takes the follow-up back (the thread returns to where the terminal's request ended); New thread.
        driver.find_element(By.ID, "undo").click()
        wait.until(lambda d: "Undid 'make the cradle wooden'" in text_of("chat"))
        assert "1 request(s)" in text_of("thread") and "make the cradle wooden" not in text_of("thread")
        driver.find_element(By.ID, "new").click()
        wait.until(lambda d: "New thread" in text_of("thread"))
    except Exception:
        if driver is not None:  # what the page showed, for the failure's reader
            driver.save_screenshot(str(tmp_path / "failure.png"))
            (tmp_path / "failure.html").write_text(driver.page_source, encoding="utf-8")
        raise
    finally:
        if driver is not None:
            driver.quit()
        stop(server, grace=30)
        log.close()
    # ... and the page's thread continues in the terminal.
    terminal = terminal_chat(serve_env, "make it at night", thread=page_thread)
    assert "prompt: a retriever and a cradle; make it at night" in terminal
    assert (tmp_path / "serve.png").stat().st_size > 10_000


@needs_gradio
def test_user_text_is_shown_as_text_on_the_page(settings, tmp_path: Path) -> None:
    """A prompt holding HTML, Markdown and a table's pipe reaches the page's panels as the characters typed."""
    from agent.frontends.web import WebChat, as_text, fresh_page

    prompt = "<img src=x onerror=alert(1)> **bold** [a](javascript:x) | pipe"
    assert as_text(prompt) == ("&lt;img src=x onerror=alert\\(1\\)&gt; \\*\\*bold\\*\\* \\[a\\]\\(javascript:x\\) "
                               "\\| pipe")
    assert as_text("two\nlines") == "two lines"
    web = WebChat(settings, planner="fixed", rounds=1, runner=fake_runner(settings, tmp_path))
    page = fresh_page(web.rounds)
    for _ in web.stream(page, lambda session: session.send(prompt)):
        pass
    header = web.thread_view(page)["header"]
    assert as_text(prompt) in header and "<img" not in header and "**bold**" not in header
