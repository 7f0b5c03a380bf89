"""moe-recipes: continual pre-training and instruction tuning of Mixture-of-Experts LLMs in HF format."""

__version__ = "0.1.0"
