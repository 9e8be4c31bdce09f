"""Custom code of the VMAML-UNet bundle, referenced from the configs as ``scripts.<module>``."""
