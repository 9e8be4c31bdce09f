"""Entry point of the application folder, which MONAI Deploy's packager runs as ``python <app folder>``."""

from app import VMAMLUNetApp

if __name__ == "__main__":
    VMAMLUNetApp().run()
