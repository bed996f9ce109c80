"""Every tutorial notebook runs top to bottom without an error.

Each notebook in ``tutorials/`` is executed by nbclient in a fresh ``python3``
kernel whose working directory is ``tutorials/``, as when a reader opens it there.
The kernel runs an in-memory copy; the executed copy is written to a temporary
directory and the stored notebook, with its outputs, is never rewritten. The
notebooks run concurrently, one kernel per core, and assert their own results, so a
failing assertion in a cell fails the test.
"""

import asyncio
import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"

NOTEBOOKS = [
    "01_linear_regression.ipynb",
    "02_bayesian_mlp.ipynb",
    "03_foreign_model.ipynb",
    "04_bmr_vs_horseshoe.ipynb",
]

#: Seconds one notebook may take, all cells together (each is meant to take about a minute).
TIMEOUT = 300


def test_every_notebook_is_listed():
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == NOTEBOOKS
    readme = (TUTORIALS / "README.md").read_text(encoding="utf-8")
    for name in NOTEBOOKS:
        assert name in readme, f"tutorials/README.md does not list {name}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_with_outputs(name):
    """The stored notebook was executed in order and shows no error."""
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    nbformat.validate(nb)
    cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), name
    errors = [out for cell in cells for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"{name} is stored with an error output: {errors[0].get('ename')}"
    assert any("image/png" in out.get("data", {}) for cell in cells for out in cell.outputs), (
        f"{name} is stored without its figures"
    )


async def _execute(name: str, slots: asyncio.Semaphore) -> tuple[object, float]:
    """Execute notebook ``name`` in memory: (the executed notebook or the exception
    it raised, its seconds)."""
    nb = nbformat.reads((TUTORIALS / name).read_text(encoding="utf-8"), as_version=4)
    client = NotebookClient(
        nb,
        timeout=TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    # One thread: the many small tensor operations of SVI gain nothing from a second
    # one, and OpenMP threads that compete with other processes for two cores can slow
    # them down tenfold.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    async with slots:
        start = time.perf_counter()
        try:
            await client.async_execute(env=env)  # CellExecutionError if a cell fails
        except Exception as error:  # reported by the notebook's own test
            return error, time.perf_counter() - start
        return nb, time.perf_counter() - start


@pytest.fixture(scope="module")
def executed() -> dict[str, tuple[object, float, bool]]:
    """Every notebook executed, as many at a time as there are cores (each kernel
    runs on one thread): name → (the executed notebook or the exception it raised,
    its seconds, whether its stored file is unchanged afterwards)."""
    stored = {name: (TUTORIALS / name).read_bytes() for name in NOTEBOOKS}

    async def run_all():
        slots = asyncio.Semaphore(max(1, min(len(NOTEBOOKS), os.cpu_count() or 1)))
        return await asyncio.gather(*(_execute(name, slots) for name in NOTEBOOKS))

    runs = asyncio.run(run_all())
    return {
        name: (nb, seconds, (TUTORIALS / name).read_bytes() == stored[name])
        for name, (nb, seconds) in zip(NOTEBOOKS, runs)
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, executed, tmp_path):
    nb, seconds, unchanged = executed[name]
    if isinstance(nb, Exception):
        raise nb
    nbformat.write(nb, tmp_path / name)

    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors, f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    assert all(cell.execution_count for cell in nb.cells if cell.cell_type == "code")
    assert seconds < TIMEOUT, f"{name} took {seconds:.0f} s, more than {TIMEOUT} s"
    assert unchanged, f"executing {name} changed the stored file"
