"""medcam: class activation maps for 3D medical-image segmentation networks."""
__version__ = "0.1.0"
