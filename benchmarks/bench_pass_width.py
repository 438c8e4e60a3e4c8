"""What one cached forward of the embedded SmolLM2 costs by its width (tokens fed), batch 1.

    python benchmarks/bench_pass_width.py

A lossless or block pass of width W feeds W tokens on top of a 300-token cache; its cost against a
one-token pass is what a wide pass must earn back in accepted tokens (median of 15 each).
"""

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import DynamicCache

from dllm_lit.models import load_model


def main() -> None:
    torch.manual_seed(0)
    model = load_model("smollm2").eval()
    context = 300
    rows = []
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=torch.randint(100, 40000, (1, context)), past_key_values=cache, use_cache=True)
        for width in (1, 2, 4, 8, 16, 32):
            times = []
            for _ in range(15):
                ids = torch.randint(100, 40000, (1, width))
                start = time.perf_counter()
                model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=width)
                times.append(time.perf_counter() - start)
                cache.crop(context)
            rows.append((width, statistics.median(times) * 1000))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| width | ms/forward | vs width 1 |\n|---|---|---|")
    for width, ms in rows:
        print(f"| {width} | {ms:.1f} | {ms / rows[0][1]:.2f}x |")


if __name__ == "__main__":
    main()
