"""Model adapters and model loading."""
