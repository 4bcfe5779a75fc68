"""Transport security for the DICOM port and for sending (TLS)."""
