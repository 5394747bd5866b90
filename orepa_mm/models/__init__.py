"""Model components (backbones) built on orepa_mm layers."""
