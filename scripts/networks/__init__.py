"""VMAML-UNet network components."""
