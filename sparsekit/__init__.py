"""sparsekit: one-shot LLM pruning with kernels that make the pruned model smaller and faster."""

__version__ = "0.1.0"
