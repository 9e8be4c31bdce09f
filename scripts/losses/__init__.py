"""Losses of the VMAML-UNet bundle."""
