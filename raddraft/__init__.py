"""raddraft: a radiology AI gateway (DICOM in; drafted reports, SR, GSPS and HL7 out)."""

__version__ = "0.1.0"
