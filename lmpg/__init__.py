"""lmpg: policy-gradient fine-tuning of causal language models."""
