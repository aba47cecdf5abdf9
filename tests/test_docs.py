"""The reading path: README.md, docs/*.md and the studies' index are what the JSON results say, and
every relative link, image and results file they name exists. Fast: no torch, no network."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "report.py"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "studies" / "README.md"]
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(!?)\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
RESULT_PATH = re.compile(r"benchmarks/(?:studies/)?results(?:/[^\s`'\"|,;()]*)?")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def load_report():
    spec = importlib.util.spec_from_file_location("report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in HEADING.findall(FENCE.sub("", path.read_text())):
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def dead_links(page: Path, root: Path = ROOT) -> list[str]:
    """Every relative link or image of ``page`` whose file (or heading anchor) is missing, and every
    concrete ``benchmarks/(studies/)results/...`` path it names that is absent."""
    text = FENCE.sub("", page.read_text())
    problems = []
    for bang, target in LINK.findall(CODE.sub("CODE", text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        what = "image" if bang else "link"
        if not dest.exists():
            problems.append(f"{page.relative_to(root)}: dead {what} {target}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{page.relative_to(root)}: no heading #{anchor} in {dest.relative_to(root)}")
    for path in RESULT_PATH.findall(page.read_text()):
        path = path.rstrip(".:")
        if re.search(r"[<>{}\[\]*A-Z]", path):  # a pattern (latency_<model>, experiment_NAME_...), not a file
            continue
        if not (root / path).exists():
            problems.append(f"{page.relative_to(root)}: names {path}, which is absent")
    return problems


def prose(text: str) -> str:
    """The page without its generated blocks and code: what a person wrote."""
    text = re.sub(r"<!-- report:(\w+)[^>]*-->.*?<!-- /report:\1 -->", "", text, flags=re.S)
    return CODE.sub("", FENCE.sub("", text))


def test_generated_markdown_matches_the_json():
    done = subprocess.run([sys.executable, str(REPORT), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout


def test_check_fails_and_names_the_page_when_a_number_is_edited(tmp_path):
    for rel in ("README.md", "docs", "benchmarks/report.py", "benchmarks/results", "benchmarks/studies"):
        src, dst = ROOT / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    page = tmp_path / "docs" / "results.md"
    text = page.read_text()
    block = re.search(r"<!-- report:methods -->.*?<!-- /report:methods -->", text, re.S)[0]
    edited = re.sub(r"\d+\.\d ± ", "99.9 ± ", block, count=1)
    assert edited != block
    page.write_text(text.replace(block, edited))
    done = subprocess.run([sys.executable, str(tmp_path / "benchmarks" / "report.py"), "--check"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "docs/results.md" in done.stderr and "methods" in done.stderr
    assert page.read_text() != text, "--check must not rewrite the page"
    subprocess.run([sys.executable, str(tmp_path / "benchmarks" / "report.py")], check=True, capture_output=True, timeout=120)
    assert page.read_text() == text, "a run without --check restores the block from the JSON"


def test_check_names_a_missing_result_file(tmp_path):
    for rel in ("README.md", "docs", "benchmarks/report.py", "benchmarks/results", "benchmarks/studies"):
        src, dst = ROOT / rel, tmp_path / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    (tmp_path / "benchmarks" / "results" / "live_pipeline.json").unlink()
    done = subprocess.run([sys.executable, str(tmp_path / "benchmarks" / "report.py"), "--check"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "live_pipeline.json" in done.stderr


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_images_and_result_files_exist(page):
    assert dead_links(page) == []


def test_the_link_check_catches_what_it_should(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "there.md").write_text("# A heading\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#a-heading) [web](https://example.org/x)\n"
                    "[dead](nowhere.md) ![missing](img.png) [bad anchor](there.md#nope)\n"
                    "`benchmarks/results/absent.json` `benchmarks/results/latency_<model>.json`\n"
                    "```\n[in code](ignored.md)\n```\n")
    found = dead_links(page, tmp_path)
    assert found == ["docs/page.md: dead link nowhere.md", "docs/page.md: dead image img.png",
                     "docs/page.md: no heading #nope in docs/there.md",
                     "docs/page.md: names benchmarks/results/absent.json, which is absent"]


def test_every_console_script_has_its_page():
    scripts = re.findall(r"^(cign-[a-z]+) = ", (ROOT / "pyproject.toml").read_text(), re.M)
    assert len(scripts) == 9
    readme = (ROOT / "README.md").read_text()
    for script in scripts:
        assert (ROOT / "docs" / f"{script}.md").is_file(), script
        assert f"](docs/{script}.md)" in readme, f"README does not link docs/{script}.md"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_issue_numbers_and_no_hand_typed_measurements(page):
    text = page.read_text()
    assert not re.search(r"\bissues? #?\d+", text, re.I), "issue numbers belong in the tracker, not the docs"
    typed = [m.group(0) for m in re.finditer(r"\d ?± ?\d|\d+\.\d+ ?%", prose(text))]
    assert typed == [], f"measured numbers outside generated blocks: {typed}"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_machine_label_is_the_runtimes():
    """report.py labels machines as cign_runtime.bench.cpu_label does (checked where that imports)."""
    bench = pytest.importorskip("cign_runtime.bench")
    report = load_report()
    for rel in ("benchmarks/results/default_run.json", "benchmarks/results/latency_paper_avx2.json",
                "benchmarks/results/train_cpu_guard.json"):
        env = report.machine_of(report.load(rel))
        assert report.cpu_label(env) == bench.cpu_label(env)
