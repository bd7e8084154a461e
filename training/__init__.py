"""Offline training pipeline: re-identification models on timm backbones with DenoiseRep."""
