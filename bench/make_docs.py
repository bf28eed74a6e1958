"""Write docs/BENCHMARKS.md from the JSON of a full ``gradgate bench`` run.

Run the workloads first (the commands are listed in COMMANDS), writing JSON and
PNG into OUT, then: ``python bench/make_docs.py [OUT]``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from gradgate.tools import bench_autofreeze, bench_integrations, bench_rows
from gradgate.tools.bench import to_markdown

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "seed": "gradgate bench seed --epochs 5 --repeats 5 --json OUT/seed.json --plot OUT/seed.png",
    "reverse": "gradgate bench reverse --epochs 2 --repeats 5 --json OUT/reverse.json "
    "--plot OUT/reverse.png",
    "guard": "gradgate bench guard --epochs 2 --repeats 5 --json OUT/guard.json "
    "--plot OUT/guard.png",
    "cache": "gradgate bench cache --threads 1 --repeats 7 --samples 4096 --epochs 5 "
    "--json OUT/cache.json --plot OUT/cache.png",
    "bn_cnn": "gradgate bench bn_cnn --samples 1024 --epochs 3 --repeats 3 --json OUT/bn_cnn.json "
    "--plot OUT/bn_cnn.png",
    "bn_cnn_pass": "gradgate bench bn_cnn_pass --samples 1024 --epochs 1 --repeats 5 "
    "--json OUT/bn_cnn_pass.json --plot OUT/bn_cnn_pass.png",
    "text": "gradgate bench text --samples 384 --epochs 3 --repeats 3 --json OUT/text.json "
    "--plot OUT/text.png",
    "progressive": "gradgate bench progressive --epochs 10 --repeats 3 "
    "--json OUT/progressive.json --plot OUT/progressive.png",
    "checkpoint": "python bench/checkpoint_size.py OUT/checkpoint.json",
    "half_storage": "python bench/half_storage.py OUT/half_storage.json",
    "scale": "gradgate bench scale --threads 1 --sizes 10000 100000 1000000 --repeats 5 "
    "--json OUT/scale.json --plot OUT/scale.png",
    "autofreeze": "gradgate bench autofreeze --threads 1 --json OUT/autofreeze.json "
    "--plot OUT/autofreeze.png",
    "integrations": "gradgate bench integrations --repeats 3 --json OUT/integrations.json",
    "rows": "gradgate bench rows --repeats 5 --steps 5 --json OUT/rows.json",
}
# workloads whose JSON has a format of its own
RENDER = {
    "autofreeze": bench_autofreeze.to_markdown,
    "integrations": bench_integrations.to_markdown,
    "rows": bench_rows.to_markdown,
}
HEADER = """# Benchmarks

Measured with `gradgate bench`, always the same way: strategies interleaved
(A B C ... repeated), one warm-up round discarded, then the repetitions each command gives
(`--repeats`); median and min-max; ratios are
medians of per-repetition ratios, and every ratio reads one way: A/B is A's seconds (or
bytes) over B's, so above 1.00 A is slower (or larger). The one exception is the
`autofreeze` section's speed-ups (full's seconds over the strategy's, above 1.00 faster),
which its caption states. Peak RSS is `ru_maxrss` of a fresh process running one
strategy alone. Raw JSON and PNG plots are in `docs/bench/`; this page is written by
`python bench/make_docs.py OUT` from them (OUT: the folder the commands below wrote into;
`docs/bench` regenerates in place). The machine is the shared 2-core CI machine:
absolute seconds are noisy, ratios measured in one run are what to compare.
"""


def _table(result: dict[str, list[dict[str, object]]], command: str) -> str:
    rows = result["rows"]
    keys = list(rows[0])
    lines = [f"### `{result.get('name', 'table')}`", "", f"Command: `{command}`", ""]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(out: Path) -> None:
    """Assemble the page from ``out/*.json`` and the notes in ``bench/notes/``.

    Every workload of COMMANDS must be in ``out``: a partial folder is refused
    before anything is written, so a section of the page is never dropped.
    """
    missing = [name for name in COMMANDS if not (out / f"{name}.json").exists()]
    if missing:
        todo = "\n".join("  " + COMMANDS[n].replace("OUT", str(out)) for n in missing)
        raise SystemExit(
            f"bench/make_docs.py: {out} lacks {', '.join(f'{n}.json' for n in missing)}; "
            f"nothing was written. Run:\n{todo}"
        )
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in COMMANDS}
    parts = [HEADER]
    dest = ROOT / "docs" / "bench"
    dest.mkdir(parents=True, exist_ok=True)
    for name, command in COMMANDS.items():
        result = results[name]
        shown = command.replace("OUT", str(out))
        if name in RENDER:
            parts.append(RENDER[name](result, shown))
        elif "rows" in result:  # a plain table (bench/checkpoint_size.py)
            parts.append(_table(result, shown))
        else:
            parts.append(to_markdown(result, shown))
        note = ROOT / "bench" / "notes" / f"{name}.md"
        if note.exists():
            parts.append(note.read_text())
        for ext in ("json", "png"):
            # out may be docs/bench itself: the page regenerated from the JSON there
            if (out / f"{name}.{ext}").exists() and out.resolve() != dest.resolve():
                shutil.copy(out / f"{name}.{ext}", dest / f"{name}.{ext}")
        if (out / f"{name}.png").exists():
            parts.append(f"![{name}](bench/{name}.png)\n")
    (ROOT / "docs" / "BENCHMARKS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "bench-out"))
