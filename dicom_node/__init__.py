"""dicom-node: an AI inference DICOM node.

Receives studies over DICOM, runs ONNX models on the series a route sends
them to, and returns SEG, SR, SC and derived image series to the PACS.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
