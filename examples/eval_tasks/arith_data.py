"""The tasks' data, read from beside this file, so they run from any working directory.

lm-eval imports this through ``custom_dataset: !function arith_data.load`` in the task files.
"""

from pathlib import Path

import datasets


def load(**kwargs) -> datasets.DatasetDict:
    """``arith.jsonl`` as the ``test`` split."""
    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("arith.jsonl"))})
