"""Does a change keep mtkit's behaviour? Runs the same fixed-seed work with two checkouts and compares.

    git worktree add /tmp/before <commit>
    python3 scripts/same_behaviour.py /tmp/before .

Each checkout trains the demo model for 300 fp32 steps (seed 1, a loss logged every 10 steps, a
validation every 100) on one demo corpus, then translates the 1,000 demo test sentences with beam 5
and greedily, and scores the test split (`mtkit eval`: BLEU and chrF with their signatures).
Compared: the loss curve and validation scores (metrics.jsonl), every weight of last.pt and best.pt
(torch.equal), the translations (bytes) and the scores. About 3 minutes per checkout on 2 cores.

The bad-input table too: the *after* checkout's tests/test_bad_input*.py run against each
checkout's mtkit (a tree of the checkout's files with the after checkout's tests/), each recording
every command it ran and the answer (exit code, stdout, stderr: tests/conftest.py's `cli`, with
MTKIT_RECORD_CLI set); the answers must be the same, temporary paths aside. --no-table skips it
(about 4 more minutes per checkout).
Prints a table; the last line is one JSON object, "same": true when everything is equal.
"""

import argparse
import json
import os
import re
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
    subprocess.run([*mtkit, "eval", "configs/demo.yaml", *sets, "--precision", "fp32"], cwd=checkout, env=env,
                   check=True, capture_output=True)


TABLE = ["tests/test_bad_input.py", "tests/test_bad_input_commands.py", "tests/test_bad_input_options.py"]


def bad_input_table(checkout: Path, tests: Path, out: Path) -> dict:
    """{(test, command line): (exit code, stdout, stderr)} of every command the bad-input tests ran
    with `checkout`'s mtkit (the tests are `tests`' own), temporary paths made alike."""
    tree = out / "tree"
    tree.mkdir(parents=True)
    for item in checkout.iterdir():
        if item.name not in ("tests", ".git"):
            (tree / item.name).symlink_to(item)
    (tree / "tests").symlink_to(tests)
    record = out / "table.jsonl"
    env = {**os.environ, "PYTHONPATH": str(tree), "MTKIT_QUIET": "1", "MTKIT_RECORD_CLI": str(record)}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "--basetemp",
                    str(out / "pytest"), *TABLE], cwd=tree, env=env, capture_output=True)
    return read_table(record, out / "pytest")


def read_table(record: Path, basetemp: Path) -> dict:
    # Alike: the temporary folders, timings and speeds, ports taken at random, and the width of
    # tables that the temporary folders' names widen.
    alike = re.compile(re.escape(str(basetemp)) + r"|\b\d+\.\d+ ?(s|seconds|ms)\b|tgt_tok/s \d+"
                       r"|[\d,]+ \(training steps only\)|(?<=:)\d{4,5}\b|(?<=--port )\d{4,5}\b|[━─]+")
    table = {}
    for line in record.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        key = alike.sub("~", f"{row['test']} :: {' '.join(row['args'])}")
        table[key] = tuple(" ".join(alike.sub("~", str(v)).split()) for v in (row["code"], row["out"], row["err"]))
    return table


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
    scores = [{k: v for k, v in json.loads((d / "run/eval/test.json").read_text()).items() if k in ("bleu", "chrf")}
              for d in (a, b)]
    result["scores"] = scores[0] == scores[1] and len(scores[0]) == 2
    result["same"] = all(v for k, v in result.items() if k != "curve_points")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--no-table", action="store_true", help="skip the bad-input table")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mtkit-same-"))
    for side in ("before", "after"):
        run(getattr(args, side).resolve(), work / side, work / "corpus")
    result = compare(work / "before", work / "after")
    if not args.no_table:
        tables = [bad_input_table(getattr(args, side).resolve(), args.after.resolve() / "tests", work / f"table-{side}")
                  for side in ("before", "after")]
        differ = sorted(k for k in tables[0].keys() | tables[1].keys() if tables[0].get(k) != tables[1].get(k))
        for key in differ:
            print(f"bad-input row differs: {key}\n  before: {tables[0].get(key)}\n  after:  {tables[1].get(key)}")
        result["bad_input_rows"], result["bad_input_rows_differing"] = len(tables[1]), len(differ)
        result["bad_input_table"] = not differ and len(tables[1]) > 0
        result["same"] = result["same"] and result["bad_input_table"]
    for key, value in result.items():
        print(f"{key:>14}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
