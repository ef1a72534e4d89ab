"""fedhft: federated fine-tuning of pretrained language models on heterogeneous edge devices."""

__version__ = "0.1.0"
