"""Does a change keep mtkit's behaviour? Runs the same fixed-seed work with two checkouts and compares.

    git worktree add /tmp/before <commit>
    python3 scripts/same_behaviour.py /tmp/before .

Each checkout trains the demo model for 300 fp32 steps (seed 1, a loss logged every 10 steps, a
validation every 100) on one demo corpus, then translates the 1,000 demo test sentences with beam 5
and greedily. Compared: the loss curve and validation scores (metrics.jsonl), every weight of last.pt
and best.pt (torch.equal), and the translations (bytes). About 3 minutes per checkout on 2 cores.
Prints a table; the last line is one JSON object, "same": true when everything is equal.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

STEPS = ["train.max_steps=300", "train.max_time=null", "train.precision=fp32", "experiment.seed=1",
         "train.log_every=10", "train.eval_every=100", "train.save_every=100"]


def run(checkout: Path, out: Path, corpus: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(checkout), "MTKIT_QUIET": "1"}
    mtkit = [sys.executable, "-m", "mtkit"]
    sets = [arg for s in [f"experiment.workdir={out / 'run'}", f"data.dir={corpus}", *STEPS] for arg in ("--set", s)]
    subprocess.run([*mtkit, "train", "configs/demo.yaml", *sets], cwd=checkout, env=env, check=True,
                   capture_output=True)
    for name, search in (("beam5", ["--beam", "5"]), ("greedy", ["--greedy"])):
        subprocess.run([*mtkit, "translate", str(out / "run/checkpoints/last.pt"), "-i", str(corpus / "test.en"),
                        "-o", str(out / f"{name}.txt"), "--precision", "fp32", *search],
                       cwd=checkout, env=env, check=True, capture_output=True)


def compare(a: Path, b: Path) -> dict:
    def curve(d: Path) -> list:
        events = [json.loads(line) for line in (d / "run/metrics.jsonl").read_text().splitlines()]
        return [(e["event"], e["step"], e.get("loss"), e.get("bleu"), e.get("lr")) for e in events
                if e["event"] in ("train", "valid")]

    result = {"curve_points": len(curve(a)), "curve": curve(a) == curve(b)}
    for name in ("last.pt", "best.pt"):
        wa, wb = (torch.load(d / "run/checkpoints" / name, weights_only=False)["model"] for d in (a, b))
        result[name] = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    for name in ("beam5.txt", "greedy.txt"):
        result[name] = (a / name).read_bytes() == (b / name).read_bytes()
    result["same"] = all(v for k, v in result.items() if k != "curve_points")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mtkit-same-"))
    for side in ("before", "after"):
        run(getattr(args, side).resolve(), work / side, work / "corpus")
    result = compare(work / "before", work / "after")
    for key, value in result.items():
        print(f"{key:>14}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
