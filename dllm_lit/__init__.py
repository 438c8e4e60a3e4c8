"""dllm_lit: block-parallel "EOS block + refine" decoding for Hugging Face causal LMs."""

from dllm_lit.decoding import generate_blocks, iterative_generate
from dllm_lit.ledger import BlockGeneration, RowResult
from dllm_lit.logprobs import TokenLogprob
from dllm_lit.settings import DecodeSettings

__all__ = ["BlockGeneration", "DecodeSettings", "RowResult", "TokenLogprob", "generate_blocks", "iterative_generate"]
__version__ = "0.1.0"
