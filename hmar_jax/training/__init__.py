"""Training: the HMAR trainer, the tokenizer trainer, the optimizer recipe and losses, the
data pipelines and token caches, metric writers and the end-of-training evaluation hooks."""
