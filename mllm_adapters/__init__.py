"""Adapters that plug pruners into Hugging Face multimodal models."""
