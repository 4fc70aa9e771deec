"""Every benchmark's JSON output: its arguments and its results, in a folder kept out of git."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def write_results(path: str | Path, args: argparse.Namespace, results: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"\nwrote {out}")
