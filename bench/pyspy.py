"""Summarise a raw py-spy profile (``--py-spy``): where the send workers' time goes.

    python -m bench.pyspy /tmp/dispatcher-bench-*/py-spy-send0.txt [--top 25] [--under NAME]

Prints, in % of the samples that are inside ``--under`` (default: the send task),
the inclusive share of every frame (function + file) and the self share (the
innermost frame). Samples outside it (idle pool processes, the main process) are
left out, so the shares add up to the time spent sending.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

# py-spy raw lines: "frame;frame;...;frame COUNT", frames as "func (file:line)".
LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def short(frame: str) -> str:
    """``func (path:line)`` -> ``func (last two path parts)``: lines merged per function."""
    m = FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    parts = Path(m["file"]).parts[-2:]
    return f"{m['func']} ({'/'.join(parts)})"


def summarise(path: Path, under: str, top: int) -> str:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for raw in path.read_text().splitlines():
        m = LINE.match(raw)
        if not m:
            continue
        frames = [short(f) for f in m["stack"].split(";")]
        starts = [i for i, f in enumerate(frames) if f.startswith(under + " ")]
        if not starts:
            continue
        frames = frames[starts[0] :]
        n = int(m["count"])
        total += n
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n
    if not total:
        return f"no samples under {under!r}"
    lines = [f"{total} samples under {under}", "", "inclusive %  function"]
    lines += [f"{100 * n / total:10.1f}  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "self %  function"]
    lines += [f"{100 * n / total:6.1f}  {f}" for f, n in own.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("profile", type=Path)
    p.add_argument("--under", default="send_recipients", help="function to measure inside")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    print(summarise(args.profile, args.under, args.top))


if __name__ == "__main__":
    main()
