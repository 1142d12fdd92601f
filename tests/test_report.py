"""The HTML report: a run built by the real runner over scripted models, rendered and read back,
and rendered by headless Chromium (Debian's chromium package) to a screenshot."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agent.runner import Runner, open_checkpointer
from imgrag.errors import UserError
from imgrag.records.report import write_report
from imgrag.records.report_html import folder_kind
from imgrag.records.run_report import render_run
from imgrag.settings import load_settings
from tests.fakes import FakeEmbedder, FakeGenerator, FakeManager, FakeVerdict, MemoryStore, ScriptedJudge

NO_CRADLE = FakeVerdict(False, ["a wooden cradle"], "no cradle in sight", raw='{"match": false}')
NO_ROCKET = FakeVerdict(False, ["a rocket <on fire>"], "the cradle is there, the rocket is not")
MATCH = FakeVerdict(True, [], "all there")
PROMPT = 'a retriever beside a cradle & a rocket <script>alert("x")</script>'


def make_runner(tmp_path: Path, verdicts: list[FakeVerdict], profile: str = "default") -> Runner:
    settings = load_settings(profile, environ={"IMGRAG_HOME": str(tmp_path / "home")})
    models = {"generator": FakeGenerator(), "judge": ScriptedJudge(verdicts), "embedder": FakeEmbedder()}
    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    return Runner(settings, manager=FakeManager(models), reference_store=MemoryStore(refs),
                  checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))


@pytest.fixture
def three_round_run(tmp_path: Path) -> dict:
    runner = make_runner(tmp_path, [NO_CRADLE, NO_ROCKET, MATCH])
    result = runner.run(PROMPT, planner="fixed", max_rounds=3, seed=2, run_id="three-rounds")
    assert result["rounds"] == 3 and result["status"] == "matched"
    return result


def _data_uris(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)"', page)]


def test_run_report_shows_every_round_verdict_and_reference(three_round_run: dict) -> None:
    run_dir = Path(three_round_run["run_dir"])
    page = render_run(run_dir)
    for cid in ("c0", "c1", "c2"):
        assert f'id="cand-{cid}"' in page
    assert "Round 1 — candidate c0" in page and "Round 3 — candidate c2 (final)" in page
    # Verdicts and missing concepts, escaped.
    assert "no cradle in sight" in page and "a wooden cradle" in page
    assert "a rocket &lt;on fire&gt;" in page and "<on fire>" not in page
    assert page.count("no match") >= 2 and ">match<" in page
    # The prompt is escaped: no live script from the run's own text.
    assert "<script>" not in page and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    # Images: three candidates, the final one again, and reference thumbnails, all inlined PNG.
    images = _data_uris(page)
    assert len(images) >= 3 + 1 + 2
    assert all(img.startswith(b"\x89PNG") for img in images)
    # The references table names the retrieved ids with their scores; the trace has every tool step.
    assert "ref-cradle" in page and "0.9000" in page
    for tool in ("generate", "critique", "retrieve", "regenerate"):
        assert f"<b>{tool}</b>" in page
    assert "Model loads" in page and "generator" in page
    # Timings: every second of the run in a named row, the overhead included; the rows add up to the wall time.
    timings = page[page.index("<h2>Timings</h2>"):page.index("<h2>Model loads</h2>")]
    totals = [float(t) for t in re.findall(r'<td class="num">[^<]*</td><td class="num">([0-9.]+)</td>', timings)]
    assert "overhead (graph, checkpoints, trace)" in timings
    assert sum(totals) == pytest.approx(three_round_run["seconds"], abs=0.01)
    assert "Tiny profile" not in page  # a default-profile run carries no tiny banner


def test_tiny_profile_report_says_the_output_is_noise(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, [MATCH], profile="tiny")
    result = runner.run("a cat", planner="fixed", max_rounds=1)
    page = render_run(result["run_dir"])
    banner = re.search(r'<div class="banner">(.*?)</div>', page)
    assert banner and "noise" in banner.group(1) and "junk" in banner.group(1)
    assert page.index('class="banner"') < page.index("Rounds (")  # at the top, before any picture


def test_missing_candidate_file_and_killed_run_still_render(three_round_run: dict) -> None:
    run_dir = Path(three_round_run["run_dir"])
    (run_dir / "candidates" / "c1.png").unlink()
    (run_dir / "result.json").unlink()  # as if the process had been killed before the end
    with (run_dir / "trace.jsonl").open("a") as fh:
        fh.write('{"tool": "critique", "ar')  # a torn last line
    page = render_run(run_dir)
    assert "no result.json" in page
    assert 'id="cand-c0"' in page and 'id="cand-c2"' in page
    assert folder_kind(run_dir) == "run"


def test_batch_report_indexes_and_inlines_each_run(tmp_path: Path) -> None:
    runner = make_runner(tmp_path, [NO_CRADLE, MATCH])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cradle\na blue rocket\n")
    summary = runner.batch(prompts, planner="fixed", max_rounds=2)
    target = write_report(summary["batch_dir"])
    page = target.read_text()
    assert target == Path(summary["batch_dir"]) / "report.html"
    for item in summary["items"]:
        assert f'href="#run-{item["run_id"]}"' in page and f'id="run-{item["run_id"]}"' in page
    assert "a red cradle" in page and "a blue rocket" in page
    assert page.count('class="card') >= 3  # rounds of both runs


def test_report_command(three_round_run: dict, tmp_path: Path) -> None:
    from agent.frontends.cli.app import app

    cli = CliRunner()
    run_dir = three_round_run["run_dir"]
    res = cli.invoke(app, ["report", run_dir, "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["kind"] == "run" and Path(doc["report"]) == Path(run_dir) / "report.html"
    custom = tmp_path / "elsewhere" / "r.html"
    assert cli.invoke(app, ["report", run_dir, "-o", str(custom)]).exit_code == 0 and custom.stat().st_size > 1000
    # The page is HTML: a .pdf name is refused in one line, and nothing is written under it.
    pdf = cli.invoke(app, ["report", run_dir, "-o", str(tmp_path / "r.pdf")])
    assert pdf.exit_code == 1 and not (tmp_path / "r.pdf").exists()
    with pytest.raises(UserError, match=r"r\.pdf: the report is an HTML page; name the file \.html"):
        write_report(run_dir, tmp_path / "r.pdf")
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(UserError, match="neither a run folder"):
        folder_kind(empty)
    proc = subprocess.run([".venv/bin/imgrag" if Path(".venv/bin/imgrag").exists() else "imgrag", "report",
                           str(empty)], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "neither a run folder" in proc.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_chromium_renders_the_report(three_round_run: dict, tmp_path: Path) -> None:
    from PIL import Image, ImageStat

    page = write_report(three_round_run["run_dir"])
    shot = tmp_path / "report.png"
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
           f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 2000)
        rgb = im.convert("RGB")
    # A blank page is one colour; the report has text, badges and the candidates' colours.
    colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50
    assert max(ImageStat.Stat(rgb).stddev) > 20
    # The first candidate (FakeGenerator: seed 2 -> red 80, green 0, blue 99) is painted on the page.
    assert rgb.getcolors(maxcolors=1 << 20) and any(c == (80, 0, 99) for _, c in colours)


def test_tiny_profile_run_end_to_end_renders_every_round(tiny_settings, tmp_path: Path) -> None:
    """The real engine on the tiny kit (no fakes): a two-round run, its report, and Chromium's rendering."""
    from imgrag.management.engine import build_manager

    runner = Runner(tiny_settings, manager=build_manager(tiny_settings),
                    checkpointer=open_checkpointer(tmp_path / "threads.sqlite"))
    result = runner.run("a red cradle beside a dog", planner="fixed", max_rounds=2, seed=4)
    assert result["rounds"] == 2
    page_path = write_report(result["run_dir"])
    page = page_path.read_text()
    assert 'id="cand-c0"' in page and 'id="cand-c1"' in page
    assert "noise" in re.search(r'<div class="banner">(.*?)</div>', page).group(1)
    assert len(_data_uris(page)) >= 3  # two candidates and the final picture
    if CHROMIUM is None:
        return  # the page itself is checked; the screenshot needs Debian's chromium
    shot = tmp_path / "tiny.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    page_path.as_uri()], capture_output=True, timeout=90, check=True)
    from PIL import Image

    with Image.open(shot) as im:
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 200  # the noise pictures are there


# ----- every string from a run is text: a run folder whose prompt, captions and file names hold markup -----

HOSTILE = '<script>alert("x")</script>'
HOSTILE_FILE = "<img src=x onerror=alert(1)>.png"  # a legal file name on Linux: no slash


class _Tags(__import__("html.parser").parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.handlers: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)
        self.handlers += [name for name, _ in attrs if name.startswith("on")]


def _hostile_run(tmp_path: Path) -> Path:
    from PIL import Image

    run_dir = tmp_path / "runs" / "hostile"
    (run_dir / "candidates").mkdir(parents=True)
    cand = run_dir / "candidates" / HOSTILE_FILE
    ref = tmp_path / HOSTILE_FILE.replace(".png", "-ref.png")
    Image.new("RGB", (8, 8), (200, 10, 10)).save(cand, format="PNG")
    Image.new("RGB", (8, 8), (10, 200, 10)).save(ref, format="PNG")
    verdict = {"match": False, "missing": [HOSTILE], "reason": HOSTILE, "raw": HOSTILE, "parsed": True}
    result = {"run_id": "hostile", "status": "budget_exhausted", "prompt": HOSTILE, "planner": "fixed",
              "profile": "default", "rounds": 1, "final_candidate": "c0", "final_image": str(cand),
              "stop_reason": HOSTILE, "seconds": 1.0,
              "candidates": [{"id": "c0", "round": 1, "path": str(cand), "seed": 1, "prompt": HOSTILE + " more",
                              "verdict": None, "stale_verdict": verdict, "stale_prompt": HOSTILE,
                              "reference_ids": [HOSTILE], "ip_scale": 0.5, "clip_score": 0.1}],
              "references": {HOSTILE: {"path": str(ref), "caption": HOSTILE, "query": HOSTILE, "score": 0.5}},
              "model_loads": {HOSTILE: 1}}
    (run_dir / "result.json").write_text(json.dumps(result))
    (run_dir / "trace.jsonl").write_text(json.dumps({"event": "start", "prompt": HOSTILE, "note": HOSTILE}) + "\n"
                                         + json.dumps({"tool": "retrieve", "args": {"q": HOSTILE}, "ok": False,
                                                       "seconds": 0.1, "message": HOSTILE}) + "\n"
                                         + json.dumps({"planner": "agent", "tool": HOSTILE, "raw": HOSTILE}) + "\n")
    return run_dir


def _assert_inert(page: str) -> None:
    parser = _Tags()
    parser.feed(page)
    assert "script" not in parser.tags and parser.handlers == []
    assert parser.tags <= {"html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "h3", "div", "span",
                           "b", "i", "p", "br", "ul", "li", "img", "figure", "figcaption", "code", "pre", "details",
                           "summary", "table", "thead", "tbody", "tr", "th", "td", "a",
                           "svg", "line", "text", "rect", "circle"}  # the eval page's plots
    assert "<script" not in page.lower() and "<img src=x" not in page


def test_markup_in_prompt_caption_and_file_names_renders_inert(tmp_path: Path) -> None:
    run_dir = _hostile_run(tmp_path)
    page = render_run(run_dir)
    _assert_inert(page)
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page  # shown, as text
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in page  # the file name of the candidate, as text
    # The same folder inside a batch page and an evaluation page.
    batch = tmp_path / "runs" / "batch-x"
    batch.mkdir()
    (batch / "summary.json").write_text(json.dumps({"file": HOSTILE, "items": [
        {"index": 0, "prompt": HOSTILE, "run_id": "hostile", "status": HOSTILE, "error": HOSTILE}]}))
    _assert_inert(write_report(batch).read_text())
    ev = tmp_path / "runs" / "eval-x"
    ev.mkdir()
    metric = {"key": "dino_gold", "title": HOSTILE, "measures": HOSTILE, "agent_selects_with": True}
    arm = {"run_id": HOSTILE, "status": HOSTILE, "error": HOSTILE, "image": None, "scores": {"dino_gold": 0.5}}
    (ev / "eval.json").write_text(json.dumps({
        "source": HOSTILE, "mode": HOSTILE, "arms": ["plain", HOSTILE], "baseline": "plain", "metrics": [metric],
        "scorers": {"dino_gold": HOSTILE}, "per_arm": {HOSTILE: {"model_loads": {HOSTILE: 1}}},
        "summary": {HOSTILE: {"dino_gold": {"n": 1, "mean": 0.5, "vs_plain": {"mean_diff": 0.1}}}},
        "items": [{"index": 0, "prompt": HOSTILE, "seed": HOSTILE, "class": HOSTILE, "gold": [],
                   "arms": {"plain": {**arm, "scores": {"dino_gold": 0.4}}, HOSTILE: arm}}]}))
    _assert_inert(write_report(ev).read_text())


def test_reference_thumbnails_are_labelled_by_caption_and_long_ids_stay_in_their_column(three_round_run: dict,
                                                                                           tmp_path: Path) -> None:
    run_dir = Path(three_round_run["run_dir"])
    page = render_run(run_dir)
    captions = re.findall(r"<figcaption>(.*?)<br>", page)
    assert captions and all(c.startswith("a photo of a ") for c in captions)  # the caption, not the query
    assert "retrieved for: a wooden cradle" in page  # the query is the tooltip, and a column of the table
    if CHROMIUM is None:
        return
    # A 64-character content-hash id: laid out by Chromium, no figure is wider than its thumbnail column.
    result = json.loads((run_dir / "result.json").read_text())
    long_id = "sha256-" + "0123456789abcdef" * 4
    result["references"] = {long_id if rid == "ref-cradle" else rid: ref for rid, ref in result["references"].items()}
    for c in result["candidates"]:
        c["reference_ids"] = [long_id if rid == "ref-cradle" else rid for rid in c.get("reference_ids") or []]
    (run_dir / "result.json").write_text(json.dumps(result))
    measure = ("<script>document.title = 'overflow:' + [...document.querySelectorAll('.refs figure')]"
               ".filter(f => f.scrollWidth > f.clientWidth + 1).length + '/' "
               "+ document.querySelectorAll('.refs figure').length;</script>")
    probe = tmp_path / "probe.html"
    probe.write_text(render_run(run_dir).replace("</body>", measure + "</body>"))
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000", "--dump-dom",
                           probe.as_uri()], capture_output=True, text=True, timeout=90)
    title = re.search(r"<title>overflow:(\d+)/(\d+)</title>", proc.stdout)
    assert title, proc.stderr[-2000:]
    assert int(title.group(2)) >= 2 and title.group(1) == "0"
