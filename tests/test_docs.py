"""Every Python code block in ``docs/`` is executed.

Each page's ``.. code-block:: python`` and ``.. testcode::`` blocks run in order in
one fresh namespace, like the cells of a notebook, in a temporary working
directory, after ``pyro.clear_param_store()`` and a fixed seed. A block opts out
only through an explicit comment on the line before its directive::

    .. skip-exec: <reason>
    .. code-block:: python

Shell blocks (``bash``, ``console``, ``text``) are shown, never run.
"""

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

EXECUTED = ("python",)
SHOWN_ONLY = ("bash", "console", "text", "none")

_DIRECTIVE = re.compile(
    r"^(?P<indent>\s*)\.\. (?P<kind>code-block|code|sourcecode|testcode)::\s*(?P<lang>\S*)\s*$"
)
_SKIP = re.compile(r"^\s*\.\. skip-exec:(?P<reason>.*)$")
_OPTION = re.compile(r"^\s*:[\w-]+:")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the first line of code
    lang: str
    code: str
    skip_reason: str | None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _previous_nonblank(lines: list[str], i: int) -> str:
    for j in range(i - 1, -1, -1):
        if lines[j].strip():
            return lines[j]
    return ""


def extract_blocks(page: Path) -> list[Block]:
    """The code blocks of one ``.rst`` page, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i])
        if match is None:
            i += 1
            continue
        base = len(match["indent"])
        lang = "python" if match["kind"] == "testcode" else match["lang"]
        skip = _SKIP.match(_previous_nonblank(lines, i))
        i += 1
        while i < len(lines) and _OPTION.match(lines[i]) and _indent(lines[i]) > base:
            i += 1
        body: list[tuple[int, str]] = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
            body.append((i, lines[i]))
            i += 1
        while body and not body[-1][1].strip():
            body.pop()
        while body and not body[0][1].strip():
            body.pop(0)
        if not body:
            raise ValueError(f"{page}:{i}: empty {match['kind']} directive")
        width = min(_indent(text) for _, text in body if text.strip())
        code = "\n".join(text[width:] for _, text in body)
        reason = skip["reason"].strip() if skip else None
        blocks.append(Block(page, body[0][0] + 1, lang, code, reason))
    return blocks


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.relative_to(DOCS).parts)


def _python_pages() -> list[Path]:
    return [p for p in _pages() if any(b.lang in EXECUTED for b in extract_blocks(p))]


def _page_id(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


def test_extractor_reads_blocks_and_markers(tmp_path):
    page = tmp_path / "page.rst"
    page.write_text(
        "Title\n=====\n\n"
        ".. code-block:: python\n   :caption: first\n\n    a = 1\n\n    b = a + 1\n\nText.\n\n"
        ".. skip-exec: needs the future API\n"
        ".. code-block:: python\n\n    import not_yet_written\n\n"
        ".. code-block:: bash\n\n    pytest\n\n"
        "* item\n\n  .. code-block:: python\n\n     c = 3\n  back in the list\n",
        encoding="utf-8",
    )
    blocks = extract_blocks(page)
    assert [(b.lang, b.line, b.code, b.skip_reason) for b in blocks] == [
        ("python", 7, "a = 1\n\nb = a + 1", None),
        ("python", 16, "import not_yet_written", "needs the future API"),
        ("bash", 20, "pytest", None),
        ("python", 26, "c = 3", None),
    ]


def test_docs_have_executable_pages():
    ids = {_page_id(p) for p in _python_pages()}
    assert {"quickstart.rst", "howto/save_load.rst", "howto/pyromodule.rst"} <= ids


@pytest.mark.parametrize("page", _pages(), ids=_page_id)
def test_code_blocks_are_well_formed(page):
    for block in extract_blocks(page):
        where = f"{_page_id(page)}:{block.line}"
        assert block.lang in EXECUTED + SHOWN_ONLY, f"{where}: unknown language {block.lang!r}"
        if block.skip_reason is not None:
            assert block.lang in EXECUTED, f"{where}: skip-exec on a block that never runs"
            assert block.skip_reason, f"{where}: skip-exec needs a reason"
        if block.lang in EXECUTED:
            compile(block.code, where, "exec")
    # a marker that is not directly followed by a code block would be silently ignored
    lines = page.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if _SKIP.match(line):
            following = next((s for s in lines[i + 1 :] if s.strip()), "")
            assert _DIRECTIVE.match(following), f"{_page_id(page)}:{i + 1}: stray skip-exec"


@pytest.mark.parametrize("page", _python_pages(), ids=_page_id)
def test_page_code_runs(page, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import pyro
    import torch

    monkeypatch.chdir(tmp_path)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.manual_seed(0)
    namespace = {"__name__": "__docs__"}
    ran = 0
    for block in extract_blocks(page):
        if block.lang not in EXECUTED or block.skip_reason is not None:
            continue
        # pad so that tracebacks point at the line in the .rst file
        source = "\n" * (block.line - 1) + block.code
        exec(compile(source, str(page), "exec"), namespace)
        ran += 1
    assert ran > 0, f"{_page_id(page)}: every Python block is marked skip-exec"


def test_sphinx_build_has_no_warnings(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            str(DOCS),
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "index.html").is_file()
