"""Evaluation: perplexity under the GPTQ protocol."""
