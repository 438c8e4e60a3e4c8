"""Peak RSS of `dllm_lit predict` against the number of prompts: it should stay flat.

    python benchmarks/bench_memory.py --counts 200 1000 2000

Runs the real command (tiny-char model, short prompts, batch 16) once per count, in a fresh
process each, and reads the peak RSS from the command's own stderr summary.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[200, 1000, 2000])
    parser.add_argument("--model", default="tiny-char")
    args = parser.parse_args()
    print(f"\n`{' '.join(sys.argv)}`  \nmachine: {platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| prompts | peak RSS (GiB) | output rows |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.counts:
            prompts = Path(tmp, f"p{count}.txt")
            prompts.write_text("".join(f"{i}+{i * 7}=\n" for i in range(count)))
            out = Path(tmp, f"out{count}.jsonl")
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "dllm_lit.cli",
                    "predict",
                    f"--model.model_name_or_path={args.model}",
                    f"--data.prompts_file={prompts}",
                    "--data.batch_size=16",
                    "--model.add_eos_length=7",
                    "--model.max_new_tokens=8",
                    f"--writer.output_file={out}",
                    "--writer.max_display=0",
                    "--trainer.enable_progress_bar=false",
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            if done.returncode:
                sys.exit(done.stderr)
            rss = re.search(r"peak RSS ([\d.]+) GiB", done.stderr).group(1)
            print(f"| {count} | {rss} | {len(out.read_text().splitlines())} |", flush=True)


if __name__ == "__main__":
    main()
