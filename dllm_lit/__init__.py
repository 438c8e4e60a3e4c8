"""dllm_lit: block-parallel "EOS block + refine" decoding for Hugging Face causal LMs."""

from dllm_lit.decoding import BlockGeneration, RowResult, generate_blocks, iterative_generate

__all__ = ["BlockGeneration", "RowResult", "generate_blocks", "iterative_generate"]
__version__ = "0.1.0"
