"""Measuring models: size, perplexity, embedding similarity."""
