"""dtrak-ray: D-TRAK data attribution for diffusion models, distributed with Ray."""

__version__ = "0.1.0"
