"""The image encoder (ResNet50 trunk, projector, text head) and loading published checkpoints."""
