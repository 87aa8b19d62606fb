"""Run the atheris fuzz targets: `python fuzz/run.py --seconds 60` gives each target a minute.

Each target runs in a process of its own (libFuzzer exits the process when it stops); a crash or a broken
property leaves the input in `--artifacts` and makes the exit code 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_one(name: str, seconds: int, corpus: Path, artifacts: Path) -> int:
    """Fuzz one target in a child process for `seconds`; its exit code."""
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--target",
        name,
        f"-max_total_time={seconds}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={artifacts}/{name}-",
        "-print_final_stats=1",
        str(corpus),
    ]
    print(f"== {name}: {seconds} s", flush=True)
    return subprocess.call(args)  # noqa: S603 -- this interpreter and this file


def fuzz_in_process(name: str, libfuzzer_args: list[str]) -> None:
    """Hand one target to atheris (called in the child process)."""
    import atheris

    sys.path.insert(0, str(HERE))
    from targets import TARGETS  # the instrumented imports happen here

    target = TARGETS[name]
    atheris.Setup([sys.argv[0], *libfuzzer_args], target)
    atheris.Fuzz()


def main() -> int:
    """Parse the command line and run the chosen targets one after another."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=60, help="fuzzing time per target (default 60)")
    parser.add_argument("--only", action="append", help="run only this target (repeatable)")
    parser.add_argument(
        "--corpus", type=Path, help="folder of corpora kept between runs (default: temporary)"
    )
    parser.add_argument("--artifacts", type=Path, default=Path("fuzz-artifacts"), help="where crashes go")
    parser.add_argument("--target", help=argparse.SUPPRESS)  # internal: the child process's target
    args, rest = parser.parse_known_args()
    if args.target:
        fuzz_in_process(args.target, rest)
        return 0
    sys.path.insert(0, str(HERE))
    names = args.only or ["path", "form", "answer", "signature", "license_file"]
    failed = []
    with tempfile.TemporaryDirectory(prefix="fuzz-corpus-") as scratch:
        for name in names:
            corpus = (args.corpus or Path(scratch)) / name
            if run_one(name, args.seconds, corpus, args.artifacts.resolve()) != 0:
                failed.append(name)
    print("failed: " + ", ".join(failed) if failed else "no crash and no broken property", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
