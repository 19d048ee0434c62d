"""sats: semantic-asymmetry GTV segmentation of nasopharyngeal carcinoma on planning CT.

The package follows the pipeline, one module a stage:

``io`` / ``dicom`` (read and write images) -> ``dataset`` (nnU-Net raw layout, checks)
-> ``phantom`` (embedded synthetic data) -> ``evaluation`` (DSC, HD95, ASD, NSD).
"""

__version__ = "0.1.0"
