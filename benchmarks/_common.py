"""What the benchmark scripts share: their common flags, and how and where they write results.

Why: each script is run on its own (`python benchmarks/NAME.py`), so each used to restate the
argparse preamble, the headless matplotlib set-up and the JSON + PNG writing; a change to one
(a default model, the results dir) then had to be made eleven times. Imported as `_common`: the
script's own directory is first on sys.path.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"  # committed next to benchmarks/README.md, which cites them
DEFAULT_MODEL = "models/smollm2-135m-instruct"


def parser(doc: str, model: str = DEFAULT_MODEL) -> argparse.ArgumentParser:
    """A benchmark's parser: the first line of its docstring as description, and --model."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default=model)
    return p


def pyplot():
    """matplotlib.pyplot on the Agg backend: the benchmarks draw PNGs on hosts without a display.
    Imported on first use, so a run that fails before plotting never loads matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_results(
    path: Path, result: dict, plot: Callable[[Path], None], indent: int = 2, default: Callable | None = None
) -> None:
    """The result as JSON at `path`, its figure drawn by plot(png) next to it, and where both went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent, default=default) + "\n")
    png = path.with_suffix(".png")
    plot(png)
    print(f"wrote {path} and {png}")
