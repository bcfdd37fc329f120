"""The method: Grad-CAM that trains, GAIN's two streams, the losses, backbones and metrics (torch + timm only)."""
