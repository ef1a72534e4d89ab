"""Edge runtime (device side). Torch-free: only the ExecuTorch backend imports torch, lazily."""
